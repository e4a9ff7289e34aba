"""kiln-data: text, JSONL and Parquet files -> tokenized WebDataset shards + manifest.

    kiln-data corpus/ notes.txt more.jsonl --out data/mycorpus
    kiln-data 'corpus/**/*.txt' --out data/bpe --tokenizer bpe --vocab-size 8192 --shard-size 64MB
    kiln-data rows.parquet --out data/llama --tokenizer path/to/tokenizer.json --shard-size 2M
    kiln-data verify data/mycorpus      # every shard's size and sha256 against its manifest

Inputs are files, directories (walked recursively) and glob patterns (quote them; kiln expands
them, '**' included). The same input and settings give byte-identical shards and manifest
whatever --workers is. Documents are shuffled across the output by default (seeded, --seed;
--no-shuffle keeps input order). Bad input stops the build with exit code 2, naming the file (and line),
unless --on-error skip. The tokenizer is saved beside the shards as tokenizer.json.
"""

from __future__ import annotations

import argparse
import sys

from kiln.data.build import (SHARD_SIZE_HELP, BuildReport, ShardSize, build_dataset, default_workers,
                             parse_shard_size, train_bpe_on_inputs)
from kiln.data.manifest import load_manifest, verify_shards
from kiln.data.tokenizer import DEFAULT_EOS, EOS_CANDIDATES, build_tokenizer
from kiln.errors import KilnError


def _shard_size(text: str) -> ShardSize:
    try:
        return parse_shard_size(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive whole number")
    return value


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln-data", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inputs", nargs="+",
                   help="text files, directories (walked recursively, hidden entries left out), "
                        "glob patterns such as 'corpus/**/*.txt', .jsonl/.ndjson and .parquet files")
    p.add_argument("--out", required=True, help="output directory (must not already hold a dataset)")
    tok = p.add_argument_group("tokenizer")
    tok.add_argument("--tokenizer", default="byte", metavar="{byte,bpe,PATH}",
                     help="byte: UTF-8 bytes + end-of-document (257 tokens); bpe: byte-level BPE "
                          "trained here on the inputs (--vocab-size); PATH: a Hugging Face "
                          "tokenizer.json. Nothing is downloaded. (default: byte)")
    tok.add_argument("--vocab-size", type=_positive_int, default=None,
                     help="vocabulary size of the trained bpe tokenizer, >= 258 (default: 8192)")
    tok.add_argument("--eos-token", default=None,
                     help=f"end-of-document token: the one bpe creates (default {DEFAULT_EOS}), or "
                          f"the one a tokenizer.json uses (default: the first of "
                          f"{', '.join(EOS_CANDIDATES)} it has)")
    shards = p.add_argument_group("shards")
    size = shards.add_mutually_exclusive_group()
    size.add_argument("--shard-size", type=_shard_size, default=None, metavar="SIZE",
                      help=SHARD_SIZE_HELP + " (default: 1M tokens)")
    size.add_argument("--shard-tokens", type=_positive_int, default=None, metavar="N",
                      help="tokens per shard; the same as --shard-size N")
    shards.add_argument("--val-fraction", type=float, default=0.01,
                        help="fraction of documents for the validation split (by a stable hash of "
                             "their id: path, path:line or path#row)")
    shards.add_argument("--max-tokens", type=_positive_int, default=None, help="stop after this many tokens")
    shards.add_argument("--shuffle", action=argparse.BooleanOptionalAction, default=True,
                        help="shuffle documents across the whole output (seeded, byte-identical for any "
                             "--workers, for corpora larger than memory); --no-shuffle keeps input order "
                             "(default: shuffle)")
    shards.add_argument("--seed", type=int, default=0, help="seed of the shuffle (default: 0)")
    shards.add_argument("--workers", type=_positive_int, default=default_workers(),
                        help="tokenizing processes; the output does not depend on it "
                             "(default: min(4, CPUs) = %(default)s)")
    inp = p.add_argument_group("input")
    inp.add_argument("--text-field", default="text", help="JSONL field holding the document text")
    inp.add_argument("--text-column", default="text", help="Parquet column holding the document text")
    inp.add_argument("--on-error", choices=["raise", "skip"], default="raise",
                     help="bad input (binary or non-UTF-8 files, lines that are not JSON or lack "
                          "the field, Parquet files without the column): stop with exit code 2 "
                          "(raise), or skip it and count it in the summary (skip)")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: only when stderr is a terminal)")
    args = p.parse_args(argv)
    if not 0 <= args.val_fraction < 1:
        p.error("--val-fraction must be in [0, 1)")
    if args.vocab_size is not None and args.tokenizer != "bpe":
        p.error("--vocab-size applies to --tokenizer bpe only")
    if args.tokenizer == "byte" and args.eos_token is not None:
        p.error("--eos-token does not apply to --tokenizer byte (its end-of-document token is 256)")
    if args.shard_tokens is not None:
        args.shard_size = ShardSize(args.shard_tokens, "tokens")
    return args


def _count(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:.1f}{unit}"
    return f"{n:.0f}"


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n:.0f} B"


def print_summary(r: BuildReport, out=None) -> None:
    out = out or sys.stdout  # looked up now, not at import: tests and callers may redirect it
    m = r.manifest
    for split in ("train", "val"):
        shards = m.splits.get(split, [])
        print(f"{split:>5}: {len(shards):4d} shards {m.documents(split):9,d} documents "
              f"{m.tokens(split):13,d} tokens {_bytes(sum(s.bytes for s in shards)):>10}", file=out)
    print(f"total: {r.documents:,} documents, {r.tokens:,} tokens, {r.shards} shards, {_bytes(r.bytes)} "
          f"from {r.input_files} input file(s) in {r.seconds:.1f} s ({_count(r.tokens_per_second)} "
          f"tokens/s, {r.workers} worker(s))", file=out)
    if r.skipped:
        print(f"skipped {len(r.skipped)} bad input(s):", file=out)
        for msg in r.skipped[:5]:
            print(f"  {msg}", file=out)
        if len(r.skipped) > 5:
            print(f"  ... and {len(r.skipped) - 5} more", file=out)
    else:
        print("skipped 0 inputs", file=out)
    order = f"shuffled (seed {m.build['seed']})" if m.build.get("shuffle") else "input order (--no-shuffle)"
    print(f"documents: {order}", file=out)
    print(f"tokenizer: {m.tokenizer['type']} ({m.tokenizer['vocab_size']:,} tokens); "
          f"fingerprint {m.fingerprint}", file=out)
    print(f"wrote {m.root}; train with: kiln-train data.path={m.root}", file=out)


def verify(argv: list[str]) -> int:
    """kiln-data verify DIR: exit 0 when every shard matches its manifest, 1 when one does not,
    2 when DIR is not a dataset (or a listed shard is missing)."""
    p = argparse.ArgumentParser(prog="kiln-data verify", description="Check every shard of a kiln-data "
                                "directory (size and sha256) against its manifest.json.")
    p.add_argument("dir", help="a directory kiln-data wrote")
    args = p.parse_args(argv)
    try:
        m = load_manifest(args.dir)
    except KilnError as e:
        print(f"kiln-data verify: {e}", file=sys.stderr)
        return 2
    checked, read, problems = verify_shards(m)
    for line in problems:
        print(f"bad shard: {line}", file=sys.stderr)
    if problems:
        print(f"kiln-data verify: {len(problems)} of {checked} shards do not match {m.root}/manifest.json; copy "
              f"them again from the dataset's origin, or rebuild it with kiln-data", file=sys.stderr)
        return 1
    print(f"{checked} shards, {_bytes(read)}: every size and sha256 matches {m.root}/manifest.json "
          f"(fingerprint {m.fingerprint})")
    return 0


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["verify"]:  # (to build from an input file named `verify`, pass ./verify)
        return verify(argv[1:])
    args = parse_args(argv)
    common = dict(text_field=args.text_field, text_column=args.text_column, on_error=args.on_error)
    try:
        if args.tokenizer == "bpe":
            tokenizer = train_bpe_on_inputs(args.inputs, args.vocab_size or 8192,
                                            eos_token=args.eos_token or DEFAULT_EOS,
                                            progress=args.progress, **common)
        else:
            tokenizer = build_tokenizer(args.tokenizer, eos_token=args.eos_token)
        report = build_dataset(args.inputs, args.out, tokenizer, val_fraction=args.val_fraction,
                               shard_size=args.shard_size, max_tokens=args.max_tokens,
                               workers=args.workers, progress=args.progress, shuffle=args.shuffle,
                               seed=args.seed, **common)
    except KilnError as e:
        print(f"kiln-data: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("kiln-data: interrupted; nothing was kept", file=sys.stderr)
        return 130
    print_summary(report)
    return 0


if __name__ == "__main__":
    sys.exit(main())
