"""Entry point: `python -m nanollama.train CONFIG [key=value ...]` (or `config=CONFIG` anywhere).

Relaunching the same command with the same run_dir resumes from its latest checkpoint.
Exit codes: 0 done, 2 bad config or arguments, a run directory in use, no intact checkpoint, or a
full disk, 3 non-finite loss, 75 preempted (SIGTERM/SIGUSR1), 130 interrupted (Ctrl-C); the last
three leave a checkpoint to resume from (none is written when stopped during start-up: nothing new).
"""

from __future__ import annotations

import sys

from nanollama import config, data, models
from nanollama.data.source import DataError
from nanollama.train import signals
from nanollama.train.checkpoint import CheckpointError
from nanollama.train.config import TrainConfig
from nanollama.train.help import describe
from nanollama.train.trainer import StoppedAtStartup, Trainer
from nanollama.utils import exit_codes

USAGE = (
    "usage: python -m nanollama.train CONFIG [key=value ...]   (or config=CONFIG anywhere; "
    "e.g. optim.lr=3e-3 steps=50 run_dir=runs/try1; --help lists the keys)"
)


def split_args(argv: list[str]) -> tuple[str | None, list[str]]:
    """(config path, overrides): the path is the first argument, or a `config=PATH` argument anywhere."""
    named = [a for a in argv if a.startswith("config=")]
    rest = [a for a in argv if not a.startswith("config=")]
    if len(named) > 1:
        raise config.ConfigError("config", f"given {len(named)} times; give one config file")
    if named:
        if rest and "=" not in rest[0] and not rest[0].startswith("-"):
            raise config.ConfigError("config", f"given twice: {rest[0]} and {named[0]}; give one config file")
        path = named[0].partition("=")[2]
        if not path:
            raise config.ConfigError("config", "config= needs a path to a YAML file")
        return path, rest
    if not argv or "=" in argv[0] or argv[0].startswith("-"):
        return None, list(argv)
    return argv[0], list(argv[1:])


def parse(argv: list[str]) -> TrainConfig:
    """The resolved config for a command line; raises ConfigError on anything wrong."""
    path, overrides = split_args(argv)
    if path is None:
        raise config.ConfigError("", f"the first argument must be a config file\n{USAGE}")
    return config.load(TrainConfig, path, overrides)


def help_text(argv: list[str] = ()) -> str:
    """Every key with its default and meaning, generated from the config dataclasses (see help.describe).

    `model.arch=NAME` / `data.source=NAME` among `argv` show that variant's keys instead of the default's.
    """
    picks = dict(a.partition("=")[::2] for a in argv if a.startswith(("model.arch=", "data.source=")))
    rows = describe(TrainConfig)
    for section, key, lookup in (("model", "arch", models.config_class), ("data", "source", data.config_class)):
        name = picks.get(f"{section}.{key}")
        if name is None:
            continue
        try:
            cls = lookup(name)
        except ValueError as e:
            raise config.ConfigError(f"{section}.{key}", str(e)) from None
        inner = [r for r in describe(cls, section) if r[0] != f"{section}.{key}"]
        start = next(i for i, r in enumerate(rows) if r[0] == section)
        end = start + 1
        while end < len(rows) and rows[end][0].startswith(section + "."):
            end += 1
        rows[start + 1 : end] = [(f"{section}.{key}", name, "")] + inner
    width = max(len(k) for k, _, _ in rows)
    dwidth = min(max(len(d) for _, d, _ in rows), 24)
    lines = [USAGE, "", "keys (default, meaning); a YAML file sets the same keys as nested sections:"]
    for key, default, meaning in rows:
        lines.append(f"  {key:<{width}}  {default:<{dwidth}}  {meaning}".rstrip())
    lines += [
        "",
        f"model.arch picks the model section's keys (known: {', '.join(models.archs())}), data.source the data "
        f"section's (known: {', '.join(data.names())}); see another's keys with e.g. "
        "`python -m nanollama.train --help model.arch=NAME data.source=NAME`.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        try:
            print(help_text([a for a in argv if a not in ("-h", "--help")]))
        except config.ConfigError as e:
            print(f"error: {e}", file=sys.stderr)
            return exit_codes.BAD_INPUT
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
