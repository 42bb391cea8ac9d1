"""`python -m nanollama.train CONFIG [key=value ...]`: see nanollama/train/cli.py."""

import sys

from nanollama.train import signals

signals.install_early()  # before the slow imports: a SIGTERM from now on is a clean exit 75

from nanollama.train.cli import main  # noqa: E402

if __name__ == "__main__":
    code = main()
    signals.ignore_late_stops()  # the exit code is decided: a repeated stop request must not replace it
    sys.exit(code)
