"""`python -m nanollama.train CONFIG [key=value ...]`: see nanollama/train/cli.py."""

import sys

from nanollama.train.cli import main

if __name__ == "__main__":
    sys.exit(main())
