"""`python -m nanollama.train CONFIG [key=value ...]`: see nanollama/train/cli.py."""

import gc
import logging
import os
import sys

from nanollama.train import signals

signals.install_early()  # before the slow imports: a SIGTERM from now on is a clean exit 75

from nanollama.train.cli import main  # noqa: E402


def _exit(code: int) -> None:
    """Leave with `code` without the interpreter's finalisation.

    By now the trainer has closed everything it opened (checkpoint writes committed, process group
    destroyed, lock released). What finalisation would still do is destroy C++ objects that Python
    references kept alive, such as gloo groups held by the device mesh, while the interpreter is
    half torn down: CI saw a rank abort there once ("terminate called without an active
    exception", exit -6 instead of 75). Garbage is collected first, while everything is alive.
    """
    gc.collect()
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    code = main()
    signals.ignore_late_stops()  # the exit code is decided: a repeated stop request must not replace it
    _exit(code)
