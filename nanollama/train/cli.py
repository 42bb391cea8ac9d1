"""Entry point: `python -m nanollama.train CONFIG [key=value ...]`.

Relaunching the same command with the same run_dir resumes from its latest checkpoint.
Exit codes: 0 done, 2 bad config or arguments, a run directory in use, no intact checkpoint, or a
full disk, 3 non-finite loss, 75 preempted (SIGTERM/SIGUSR1), 130 interrupted (Ctrl-C); the last
three leave a checkpoint to resume from (none is written when stopped during start-up: nothing new).
"""

from __future__ import annotations

import sys

from nanollama import config
from nanollama.data.source import DataError
from nanollama.train import signals
from nanollama.train.checkpoint import CheckpointError
from nanollama.train.config import TrainConfig
from nanollama.train.trainer import StoppedAtStartup, Trainer
from nanollama.utils import exit_codes

USAGE = "usage: python -m nanollama.train CONFIG [key=value ...]   (e.g. optim.lr=3e-3 steps=50 run_dir=runs/try1)"


def parse(argv: list[str]) -> TrainConfig:
    """The resolved config for a command line; raises ConfigError on anything wrong."""
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        raise config.ConfigError("", f"the first argument must be a config file\n{USAGE}")
    return config.load(TrainConfig, argv[0], argv[1:])


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE)
        return 0
    # The process's StopRequest (installed at its start by __main__): a signal from here on, start-up
    # included, ends in a clean exit 75 / 130.
    with signals.current() as stop:
        try:
            cfg = parse(argv)
            return Trainer(cfg, stop).fit()
        except (config.ConfigError, DataError, CheckpointError) as e:
            print(f"error: {e}", file=sys.stderr)
            return exit_codes.BAD_INPUT
        except StoppedAtStartup as e:
            return e.code
        except KeyboardInterrupt:  # a second Ctrl-C: at once, without a checkpoint
            print("interrupted", file=sys.stderr)
            return exit_codes.INTERRUPTED
