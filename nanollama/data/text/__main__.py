"""`python -m nanollama.data.text prepare SOURCES --tokenizer T --out DIR` and
`python -m nanollama.data.text train-tokenizer SOURCES --kind sentencepiece|bpe --vocab N --out DIR`.

SOURCES are files, directories or globs (`stdlib:` for this Python's standard library). Bad input
(a missing file, an empty source, a bad record, a tokenizer that does not load, ids too large for
uint16) is one line and exit 2, with nothing written.
"""

from __future__ import annotations

import argparse
import os
import sys

from nanollama.data.source import DataError
from nanollama.data.text.shards import prepare
from nanollama.data.text.train_tokenizer import train_tokenizer


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2, like every other bad input
        print(f"error: {message} (see --help)", file=sys.stderr)
        sys.exit(2)


def main(argv: list[str] | None = None) -> int:
    p = _Parser(prog="python -m nanollama.data.text", description="Text corpora for data.source=text.")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    pr = sub.add_parser("prepare", help="tokenize corpora into token shards (data.prepared=DIR)")
    pr.add_argument("sources", nargs="+", help="files, directories or globs")
    pr.add_argument("--tokenizer", default="bytes", help="bytes | sentencepiece:PATH | hf:PATH | tiktoken:NAME")
    pr.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    pr.add_argument("--dtype", default="auto", help="auto | uint16 | uint32")
    pr.add_argument("--workers", type=int, default=min(8, os.cpu_count() or 1), help="tokenizing processes")
    pr.add_argument("--text-field", default="text", help="the JSONL key holding a document's text")
    pr.add_argument("--on-bad-record", choices=("skip", "fail"), default="fail")
    pr.add_argument("--shard-tokens", type=int, default=2**26, help="tokens per shard (about)")
    pr.add_argument("--force", action="store_true", help="replace an existing output directory")
    pr.add_argument("--progress-every", type=float, default=5.0, help="seconds between progress lines (stderr)")
    tt = sub.add_parser("train-tokenizer", help="train a SentencePiece or byte-level BPE tokenizer")
    tt.add_argument("sources", nargs="+", help="files, directories or globs")
    tt.add_argument("--kind", choices=("sentencepiece", "bpe"), required=True)
    tt.add_argument("--vocab", type=int, required=True, help="vocabulary size")
    tt.add_argument("--out", required=True, help="output directory (must not exist unless --force)")
    tt.add_argument("--text-field", default="text")
    tt.add_argument("--force", action="store_true")
    args = p.parse_args(argv)
    try:
        if args.command == "prepare":
            if args.workers < 1:
                raise DataError(f"--workers {args.workers}: must be >= 1")
            m = prepare(
                args.sources,
                args.tokenizer,
                args.out,
                text_field=args.text_field,
                dtype=args.dtype,
                workers=args.workers,
                on_bad_record=args.on_bad_record,
                shard_tokens=args.shard_tokens,
                force=args.force,
                progress_every=args.progress_every,
            )
            skipped = f", {m['bad_records']} bad records skipped" if m["bad_records"] else ""
            print(
                f"wrote {args.out}: {m['documents']} documents, {m['tokens']:,} tokens in {len(m['shards'])} "
                f"{m['dtype']} shards{skipped}; train with data.prepared={args.out} data.tokenizer={args.tokenizer}",
                file=sys.stderr,
            )
        else:
            spec = train_tokenizer(args.sources, args.kind, args.vocab, args.out, args.text_field, args.force)
            print(f"wrote {args.out}: train with data.tokenizer={spec}", file=sys.stderr)
    except DataError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:
        print(f"error: {e.filename or args.out}: {e.strerror or e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
