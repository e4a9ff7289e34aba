"""kiln-data: text files, directories and JSONL -> tokenized WebDataset shards + manifest.

    kiln-data corpus/ notes.txt more.jsonl --out data/mycorpus --tokenizer byte --val-fraction 0.01
"""

from __future__ import annotations

import argparse
import sys
import time

from kiln.data.build import build_shards
from kiln.data.tokenizer import TOKENIZERS, build_tokenizer
from kiln.errors import KilnError


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+", help="text files, directories (walked recursively), .jsonl files")
    p.add_argument("--out", required=True, help="output directory (must not already hold a dataset)")
    p.add_argument("--tokenizer", default="byte", choices=sorted(TOKENIZERS))
    p.add_argument("--val-fraction", type=float, default=0.01,
                   help="fraction of documents for the validation split (by a stable hash of their id)")
    p.add_argument("--shard-tokens", type=int, default=1_000_000, help="tokens per shard (target)")
    p.add_argument("--max-tokens", type=int, default=None, help="stop after this many tokens")
    p.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    p.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                   help="what to do with non-UTF-8 files and bad JSONL lines")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if args.shard_tokens < 1:
        p.error("--shard-tokens must be positive")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    start = time.perf_counter()
    try:
        m = build_shards(
            args.inputs, args.out, build_tokenizer(args.tokenizer), val_fraction=args.val_fraction,
            shard_tokens=args.shard_tokens, max_tokens=args.max_tokens, text_field=args.text_field,
            on_error=args.on_error,
        )
    except KilnError as e:
        print(f"kiln-data: {e}", file=sys.stderr)
        return 2
    secs = time.perf_counter() - start
    total = m.tokens("train") + m.tokens("val")
    for split in ("train", "val"):
        print(f"{split:>5}: {len(m.splits[split]):4d} shards {m.documents(split):9,d} documents "
              f"{m.tokens(split):13,d} tokens")
    skipped = getattr(m, "skipped", [])
    if skipped:
        print(f"skipped {len(skipped)} input(s), first: {skipped[0]}")
    print(f"wrote {m.root} ({total / max(secs, 1e-9):,.0f} tokens/s); train with: kiln-train data.path={m.root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
