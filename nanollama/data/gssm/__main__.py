"""`python -m nanollama.data.gssm CONFIG [key=value ...] --out DIR --train N --test M [--hidden]`.

Samples the GSSM of a training config (its data.gssm, data.graph_seed, data.seq_len and seed; the
other sections are ignored) into train and test token files for data.source=files.
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field

from nanollama.config import ConfigError, load, to_dict
from nanollama.data.gssm.files import write_dataset
from nanollama.data.gssm.graph import GSSM
from nanollama.data.gssm.reader import DataError
from nanollama.data.gssm.source import GSSMDataConfig


@dataclass
class WriterConfig:
    """The part of a training config the writer reads."""

    seed: int = 0
    data: GSSMDataConfig = field(default_factory=GSSMDataConfig)


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    """The CLI: sample a run config's GSSM into train/test token files."""
    p = _Parser(
        prog="python -m nanollama.data.gssm",
        description="Write GSSM token files (train and test splits, manifest.json) for data.source=files.",
    )
    p.add_argument("config", help="training config YAML (its data.gssm, data.graph_seed, data.seq_len are used)")
    p.add_argument("overrides", nargs="*", help="dotted key=value overrides, e.g. data.seq_len=256")
    p.add_argument("--out", required=True, help="output directory (created; must not exist unless --force)")
    p.add_argument("--train", type=int, required=True, help="number of train sequences")
    p.add_argument("--test", type=int, required=True, help="number of test sequences")
    p.add_argument("--seed", type=int, default=None, help="sampling seed (default: the config's seed)")
    p.add_argument("--hidden", action="store_true", help="also write the hidden states")
    p.add_argument("--force", action="store_true", help="replace an existing output directory")
    p.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines (stderr)")
    args = p.parse_intermixed_args(argv)

    try:
        cfg = load(WriterConfig, args.config, args.overrides, only=("seed", "data"))
        gssm = GSSM(cfg.data.gssm, seed=cfg.data.graph_seed)
        seed = cfg.seed if args.seed is None else args.seed
        manifest = write_dataset(
            args.out,
            gssm,
            cfg.data.seq_len,
            args.train,
            args.test,
            seed,
            hidden=args.hidden,
            force=args.force,
            config=to_dict(cfg),
            progress_every=args.progress_every,
        )
    except (ConfigError, DataError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    print(
        f"wrote {args.out}: train {args.train} x {cfg.data.seq_len + 1} and test {args.test} x "
        f"{cfg.data.seq_len + 1} tokens ({manifest['splits']['train']['tokens']['dtype']}); "
        f"test Bayes-optimal NLL {manifest['test_bayes_nll']:.4f} nats/token",
        file=sys.stderr,
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
