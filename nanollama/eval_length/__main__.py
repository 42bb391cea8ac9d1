"""`python -m nanollama.eval_length RUN_DIR --lengths ... --scaling ...`: see nanollama/evaluate/length.py."""

import sys

from nanollama.evaluate.length import main

if __name__ == "__main__":
    sys.exit(main())
