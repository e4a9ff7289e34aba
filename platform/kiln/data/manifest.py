"""manifest.json: what `kiln-data` wrote (tokenizer, token dtype, shards with their counts and
sha256, how it was built) and the dataset's fingerprint.

It is written last and atomically, so a directory with a manifest is a complete dataset.
"""

from __future__ import annotations

import hashlib
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
    build: dict = field(default_factory=dict)  # settings and counts, for people; never read back

    @property
    def fingerprint(self) -> str:
        """sha256 naming this exact data: the tokenizer entry (which holds the sha256 of a saved
        tokenizer.json) and every shard's sha256, split by split, in order. Paths, sources and
        build settings are left out, so the same data built anywhere has the same fingerprint;
        any change to a shard or to the tokenizer changes it."""
        identity = {
            "tokenizer": self.tokenizer,
            "token_dtype": self.token_dtype,
            "shards": {split: [s.sha256 for s in shards] for split, shards in sorted(self.splits.items())},
        }
        canonical = json.dumps(identity, sort_keys=True, separators=(",", ":"))
        return hashlib.sha256(canonical.encode("utf-8")).hexdigest()

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
            "fingerprint": self.fingerprint,
            "totals": {
                split: {"shards": len(shards), "documents": self.documents(split), "tokens": self.tokens(split)}
                for split, shards in self.splits.items()
            },
            "splits": {split: [vars(s) for s in shards] for split, shards in self.splits.items()},
            "sources": self.sources,
            "build": self.build,
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
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{mpath} is not valid JSON ({e}); rebuild it: {how}") from None
    if not isinstance(raw, dict) or raw.get("format") != FORMAT:
        found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
        raise DataError(f"{mpath} has format {found!r}, expected {FORMAT!r}; {how}")
    try:
        splits = {
            split: [ShardInfo(**s) for s in shards] for split, shards in raw.get("splits", {}).items()
        }
        raw["tokenizer"], raw["token_dtype"]  # noqa: B018 (required: checked here, used below)
    except (TypeError, KeyError, AttributeError) as e:
        raise DataError(f"{mpath} is not a kiln-data manifest ({type(e).__name__}: {e}); {how}") from None
    if not splits.get("train"):
        raise DataError(f"data.path={root} has no training shards (manifest lists none); {how}")
    missing = [s.file for shards in splits.values() for s in shards if not (root / s.file).is_file()]
    if missing:
        raise DataError(
            f"data.path={root}: {len(missing)} shard(s) listed in {MANIFEST} are missing, "
            f"first {missing[0]}; restore them or rebuild the dataset with kiln-data"
        )
    manifest = Manifest(
        root=root,
        tokenizer=raw["tokenizer"],
        token_dtype=raw["token_dtype"],
        splits=splits,
        sources=raw.get("sources", []),
        build=raw.get("build", {}),
    )
    # Manifests written before fingerprints existed have none; their fingerprint is computed.
    stored = raw.get("fingerprint")
    if stored is not None and stored != manifest.fingerprint:
        raise DataError(f"{mpath}: its fingerprint does not match its tokenizer and shard checksums, "
                        f"so it was edited by hand; restore it or rebuild: {how}")
    return manifest


def verify_shards(m: Manifest) -> tuple[int, int, list[str]]:
    """Every shard's size and sha256 against the manifest (reads every byte, unlike the size check
    kiln-train makes before launch). Returns (shards, bytes read, one line per bad shard)."""
    checked, read, problems = 0, 0, []
    for shards in m.splits.values():
        for s in shards:
            path = m.root / s.file
            size = path.stat().st_size
            checked += 1
            if size != s.bytes:
                problems.append(f"{path}: {size:,} bytes, the manifest lists {s.bytes:,}")
                continue
            digest = hashlib.sha256()
            with open(path, "rb") as f:
                for block in iter(lambda: f.read(1 << 20), b""):
                    digest.update(block)
            read += size
            if digest.hexdigest() != s.sha256:
                problems.append(f"{path}: sha256 {digest.hexdigest()[:16]}..., the manifest lists {s.sha256[:16]}...")
    return checked, read, problems

