"""`python -m nanollama.probe RUN_DIR`: see nanollama/probe/cli.py."""

import sys

from nanollama.probe.cli import main

if __name__ == "__main__":
    sys.exit(main())
