"""`python -m nanollama.evaluate RUN_DIR`: see nanollama/evaluate/checkpoints.py."""

import sys

from nanollama.evaluate.checkpoints import main

if __name__ == "__main__":
    sys.exit(main())
