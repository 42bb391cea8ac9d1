"""Entry point: `python -m nanollama.train CONFIG [key=value ...]`.

Relaunching the same command with the same run_dir resumes from its latest checkpoint.
Exit codes: 0 done, 2 bad config or arguments, 3 non-finite loss, 75 preempted (SIGTERM/SIGUSR1),
130 interrupted (Ctrl-C); the last three leave a checkpoint to resume from.
"""

from __future__ import annotations

import sys

from nanollama import config
from nanollama.data.source import DataError
from nanollama.train.config import TrainConfig
from nanollama.train.trainer import Trainer
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
    try:
        cfg = parse(argv)
        trainer = Trainer(cfg)
    except (config.ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return exit_codes.BAD_INPUT
    return trainer.fit()
