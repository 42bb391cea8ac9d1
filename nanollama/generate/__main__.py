"""`python -m nanollama.generate RUN_DIR --prompt ...`: see nanollama/generate/cli.py."""

import sys

from nanollama.generate.cli import main

if __name__ == "__main__":
    sys.exit(main())
