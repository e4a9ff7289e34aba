"""The embedded default dataset: this Python's own standard-library source, byte-tokenized.

It exists on every machine with Python, needs no download, and is built once per machine
(under a file lock, so parallel runs and sweep trials wait for one build instead of racing).
"""

from __future__ import annotations

import sys
import sysconfig
from pathlib import Path

from filelock import FileLock

from kiln.data.build import build_shards
from kiln.data.manifest import MANIFEST
from kiln.data.tokenizer import ByteTokenizer

# About 8M byte tokens: far more than the demo consumes, small enough to build in seconds.
DEFAULT_MAX_TOKENS = 8_000_000
DEFAULT_SHARD_TOKENS = 250_000
DEFAULT_VAL_FRACTION = 0.05
VERSION = "v2"  # v2: documents shuffled by kiln-data


def stdlib_source_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = [
        p for p in sorted(root.rglob("*.py"))
        if "site-packages" not in p.parts and "dist-packages" not in p.parts
    ]
    return files


def default_dataset_dir(cache_dir: str) -> Path:
    v = sys.version_info
    return Path(cache_dir).expanduser() / "data" / f"python{v.major}.{v.minor}-stdlib-byte-{VERSION}"


def ensure_default_dataset(cache_dir: str, log=print) -> Path:
    out = default_dataset_dir(cache_dir)
    if (out / MANIFEST).is_file():
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if (out / MANIFEST).is_file():  # another process built it while we waited
            return out
        if out.exists():  # a build that died part-way: start it over
            for f in out.iterdir():
                f.unlink()
        files = stdlib_source_files()
        log(f"building the default corpus from {len(files)} Python stdlib files -> {out}")
        m = build_shards(
            [str(f) for f in files], out, ByteTokenizer(),
            val_fraction=DEFAULT_VAL_FRACTION, shard_tokens=DEFAULT_SHARD_TOKENS,
            max_tokens=DEFAULT_MAX_TOKENS, on_error="skip",
            sources=[f"{Path(sysconfig.get_paths()['stdlib'])}/**/*.py"],
        )
        log(f"default corpus: {len(m.splits['train'])} train / {len(m.splits['val'])} val shards, "
            f"{m.tokens('train'):,} train tokens")
    return out
