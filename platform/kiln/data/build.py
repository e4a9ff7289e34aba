"""Turn text files, directories and JSONL into tokenized WebDataset shards plus a manifest.

Each sample in a shard is one document: `<key>.tokens.u16` (or .u32) holds its token ids as
little-endian integers, 2 bytes a token for vocabularies up to 65,536. Tars are written with
fixed metadata (mtime 0, uid 0) so the same input gives byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kiln.data.manifest import Manifest, ShardInfo
from kiln.errors import DataError

JSONL_SUFFIXES = {".jsonl", ".ndjson"}


@dataclass
class Document:
    id: str  # "path" or "path:line", stable across runs: decides the train/val split
    text: str


def token_field(vocab_size: int) -> tuple[str, np.dtype]:
    if vocab_size <= 2**16:
        return "tokens.u16", np.dtype("<u2")
    return "tokens.u32", np.dtype("<u4")


def expand_inputs(inputs: Iterable[str]) -> list[Path]:
    """Files as given, directories walked recursively; sorted so the order never depends on the OS."""
    files: list[Path] = []
    for raw in inputs:
        p = Path(raw).expanduser()
        if p.is_dir():
            files.extend(sorted(f for f in p.rglob("*") if f.is_file()))
        elif p.is_file():
            files.append(p)
        else:
            raise DataError(f"input {raw} does not exist; pass text files, directories or .jsonl files")
    return files


def iter_documents(files: Iterable[Path], text_field: str = "text", on_error: str = "raise",
                   skipped: list | None = None) -> Iterator[Document]:
    """Yield documents; a file that is not UTF-8 or a bad JSONL line raises (naming file and line)
    or, with on_error="skip", is recorded in `skipped` and passed over."""

    def bad(msg: str):
        if on_error == "skip":
            if skipped is not None:
                skipped.append(msg)
            return
        raise DataError(msg + " (use --on-error skip to skip such input)")

    for f in files:
        try:
            text = f.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            bad(f"{f}: not UTF-8 text (byte {e.start})")
            continue
        if f.suffix in JSONL_SUFFIXES:
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    obj = json.loads(line)
                except json.JSONDecodeError as e:
                    bad(f"{f}:{lineno}: not JSON ({e.msg})")
                    continue
                if not isinstance(obj, dict) or not isinstance(obj.get(text_field), str):
                    bad(f"{f}:{lineno}: no string field {text_field!r}")
                    continue
                if obj[text_field]:
                    yield Document(f"{f}:{lineno}", obj[text_field])
        elif text:
            yield Document(str(f), text)


def is_validation(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:4], "little")
    return h / 2**32 < val_fraction


class _ShardWriter:
    """Writes one split's shards, rolling to a new tar once `shard_tokens` is reached."""

    def __init__(self, out: Path, split: str, field: str, dtype: np.dtype, shard_tokens: int):
        self.out, self.split, self.field, self.dtype = out, split, field, dtype
        self.shard_tokens = shard_tokens
        self.shards: list[ShardInfo] = []
        self._tar: tarfile.TarFile | None = None
        self._docs = self._tokens = 0

    def add(self, key: str, tokens: np.ndarray) -> None:
        if self._tar is None:
            self._open()
        payload = tokens.astype(self.dtype, copy=False).tobytes()
        info = tarfile.TarInfo(f"{key}.{self.field}")
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        self._tar.addfile(info, io.BytesIO(payload))
        self._docs += 1
        self._tokens += len(tokens)
        if self._tokens >= self.shard_tokens:
            self._close()

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._path = self.out / (self._name() + ".tmp")
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)

    def _close(self) -> None:
        self._tar.close()
        final = self.out / self._name()
        os.replace(self._path, final)
        data = final.read_bytes()
        self.shards.append(ShardInfo(final.name, self._docs, self._tokens, len(data),
                                     hashlib.sha256(data).hexdigest()))
        self._tar, self._docs, self._tokens = None, 0, 0

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards


def build_shards(
    inputs: list[str],
    out: str | os.PathLike,
    tokenizer,
    val_fraction: float = 0.01,
    shard_tokens: int = 1_000_000,
    max_tokens: int | None = None,
    text_field: str = "text",
    on_error: str = "raise",
    sources: list[str] | None = None,
) -> Manifest:
    out = Path(out).expanduser().resolve()
    out.mkdir(parents=True, exist_ok=True)
    if (out / "manifest.json").exists():
        raise DataError(f"{out} already holds a dataset (manifest.json); choose another --out or delete it")
    files = expand_inputs(inputs)
    if not files:
        raise DataError(f"no input files found in {inputs}")
    field, dtype = token_field(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out, s, field, dtype, shard_tokens) for s in ("train", "val")}
    skipped: list[str] = []
    total = 0
    val_docs = train_docs = 0
    pending: tuple[str, np.ndarray] | None = None  # latest train document, written one step late
    for i, doc in enumerate(iter_documents(files, text_field, on_error, skipped)):
        tokens = tokenizer.encode(doc.text)
        if len(tokens) == 0:
            continue
        if val_fraction > 0 and is_validation(doc.id, val_fraction):
            writers["val"].add(f"{i:09d}", tokens)
            val_docs += 1
        else:
            if pending is not None:
                writers["train"].add(*pending)
                train_docs += 1
            pending = (f"{i:09d}", tokens)
        total += len(tokens)
        if max_tokens and total >= max_tokens:
            break
    if pending is not None:
        # A small corpus may hash no document into val: give it the last one, so that eval
        # loss always exists, unless that would leave training with nothing.
        to_val = val_fraction > 0 and val_docs == 0 and train_docs > 0
        writers["val" if to_val else "train"].add(*pending)
    splits = {s: w.finish() for s, w in writers.items()}
    if not splits["train"]:
        raise DataError(f"inputs {inputs} produced no training documents (all empty or skipped)")
    manifest = Manifest(out, tokenizer.to_manifest(), dtype.name, splits, sources or [str(p) for p in inputs])
    manifest.write()
    manifest.skipped = skipped  # type: ignore[attr-defined]
    return manifest
