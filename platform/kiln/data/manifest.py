"""manifest.json: what `kiln-data` wrote (tokenizer, token dtype, shards with their counts).

It is written last and atomically, so a directory with a manifest is a complete dataset.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from kiln.errors import DataError

MANIFEST = "manifest.json"
FORMAT = "kiln-shards/1"


@dataclass
class ShardInfo:
    file: str
    documents: int
    tokens: int
    bytes: int
    sha256: str


@dataclass
class Manifest:
    root: Path
    tokenizer: dict
    token_dtype: str
    splits: dict[str, list[ShardInfo]] = field(default_factory=dict)
    sources: list[str] = field(default_factory=list)

    def urls(self, split: str) -> list[str]:
        return [str(self.root / s.file) for s in self.splits.get(split, [])]

    def tokens(self, split: str) -> int:
        return sum(s.tokens for s in self.splits.get(split, []))

    def documents(self, split: str) -> int:
        return sum(s.documents for s in self.splits.get(split, []))

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "tokenizer": self.tokenizer,
            "token_dtype": self.token_dtype,
            "totals": {
                split: {"shards": len(shards), "documents": self.documents(split), "tokens": self.tokens(split)}
                for split, shards in self.splits.items()
            },
            "splits": {split: [vars(s) for s in shards] for split, shards in self.splits.items()},
            "sources": self.sources,
        }

    def write(self) -> Path:
        path = self.root / MANIFEST
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=2) + "\n")
        os.replace(tmp, path)  # atomic: readers see the old manifest or the new one, never half
        return path


def load_manifest(path: str | os.PathLike) -> Manifest:
    """Read <path>/manifest.json; every failure names the path and says how to make shards."""
    root = Path(path).expanduser().resolve()
    how = f"create shards with `kiln-data INPUT... --out {root}` and set data.path to that directory"
    if not root.is_dir():
        raise DataError(f"data.path={root} does not exist or is not a directory; {how}")
    mpath = root / MANIFEST
    if not mpath.is_file():
        raise DataError(f"data.path={root} has no shards (no {MANIFEST}); {how}")
    try:
        raw = json.loads(mpath.read_text())
    except json.JSONDecodeError as e:
        raise DataError(f"{mpath} is not valid JSON ({e}); rebuild it: {how}") from e
    if raw.get("format") != FORMAT:
        raise DataError(f"{mpath} has format {raw.get('format')!r}, expected {FORMAT!r}; {how}")
    splits = {
        split: [ShardInfo(**s) for s in shards] for split, shards in raw.get("splits", {}).items()
    }
    if not splits.get("train"):
        raise DataError(f"data.path={root} has no training shards (manifest lists none); {how}")
    missing = [s.file for shards in splits.values() for s in shards if not (root / s.file).is_file()]
    if missing:
        raise DataError(
            f"data.path={root}: {len(missing)} shard(s) listed in {MANIFEST} are missing, "
            f"first {missing[0]}; restore them or rebuild the dataset with kiln-data"
        )
    return Manifest(
        root=root,
        tokenizer=raw["tokenizer"],
        token_dtype=raw["token_dtype"],
        splits=splits,
        sources=raw.get("sources", []),
    )
