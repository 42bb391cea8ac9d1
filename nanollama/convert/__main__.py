"""`python -m nanollama.convert RUN_DIR --to-hf OUT [--checkpoint STEP]`: see nanollama/convert/cli.py."""

import sys

from nanollama.convert.cli import main

if __name__ == "__main__":
    sys.exit(main())
