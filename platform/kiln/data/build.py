"""Writing tokenized WebDataset shards plus a manifest from the documents `inputs` reads.

Each sample in a shard is one document: `<key>.tokens.u16` (or .u32) holds its token ids as
little-endian integers, 2 bytes a token for vocabularies up to 65,536. Tars are written with
fixed metadata (mtime 0, uid 0) so the same input gives byte-identical shards.

Parallelism without losing determinism: the main process reads documents in input order and
sends them in batches to `workers` tokenizing processes; results come back in submission order
and the main process alone writes shards. So shards, keys and the manifest depend only on the
input and the settings, never on `workers` or on which process finished first.

Shuffling (the default): real corpora arrive ordered (by source, date, file name), and a model
trained on shards in that order learns worse than one fed uniform samples. Documents are
therefore shuffled across the whole output with a seeded two-level shuffle that needs memory for
one bucket only: each document is scattered (by a hash of the seed and its input position) to
one of N spill files on disk, then each bucket is read back, permuted (seeded) and written out
in turn. N is set by the input's size, never by --workers, so the output stays byte-identical.
"""

from __future__ import annotations

import hashlib
import io
import multiprocessing as mp
import os
import random
import re
import shutil
import sys
import tarfile
import time
from collections import deque
from contextlib import closing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from kiln.data.inputs import Document, InputPolicy, expand_inputs, iter_documents, total_bytes
from kiln.data.manifest import MANIFEST, Manifest, ShardInfo
from kiln.data.tokenizer import DEFAULT_EOS, HFTokenizer, train_bpe
from kiln.errors import DataError

# A batch is what one tokenizing process gets at a time: big enough to amortize the transfer,
# small enough that several are in flight per worker and memory stays bounded.
BATCH_DOCS = 256
BATCH_CHARS = 1 << 20
IN_FLIGHT_PER_WORKER = 4


def default_workers() -> int:
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        cpus = os.cpu_count() or 1
    return max(1, min(4, cpus))


# ---------------------------------------------------------------------------- shard sizes

@dataclass(frozen=True)
class ShardSize:
    """A shard's target size: `amount` tokens or bytes (the size of the .tar file)."""

    amount: int
    unit: str  # "tokens" or "bytes"

    def __str__(self) -> str:
        return f"{self.amount}tok" if self.unit == "tokens" else f"{self.amount}B"


SHARD_SIZE_HELP = (
    "target shard size, in tokens or in bytes; the unit decides. Tokens: a number with an "
    "optional k/M/G multiplier and optional 'tok' suffix (500000, 500k, 2M, 2Mtok). Bytes: a "
    "number whose unit ends in B (512KB, 64MB, 1GB are powers of 1000; 64MiB, 1GiB powers of "
    "1024). A shard closes once it holds at least the token target; it closes before its .tar "
    "would grow past the byte target (unless one document alone is larger)."
)
_SIZE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([kmgt]?)(i?b|tok|tokens)?\s*$", re.IGNORECASE)
_POWERS = {"": 0, "k": 1, "m": 2, "g": 3, "t": 4}


def parse_shard_size(text: str | int) -> ShardSize:
    if isinstance(text, int):
        text = str(text)
    m = _SIZE.match(text)
    if not m:
        raise ValueError(f"shard size {text!r} is not a size; write tokens as 500000, 500k, 2M or "
                         f"2Mtok, or bytes as 512KB, 64MB or 64MiB")
    number, mult, unit = m.group(1), m.group(2).lower(), (m.group(3) or "").lower()
    if unit.endswith("b"):
        base = 1024 if unit == "ib" else 1000
        if unit == "ib" and not mult:
            raise ValueError(f"shard size {text!r}: 'iB' needs a multiplier (KiB, MiB, GiB)")
        kind = "bytes"
    else:
        base, kind = 1000, "tokens"
    amount = int(float(number) * base ** _POWERS[mult])
    if amount < 1:
        raise ValueError(f"shard size {text!r} must be at least 1 {kind[:-1]}")
    return ShardSize(amount, kind)


# ---------------------------------------------------------------------------- writing

def token_field(vocab_size: int) -> tuple[str, np.dtype]:
    if vocab_size <= 2**16:
        return "tokens.u16", np.dtype("<u2")
    return "tokens.u32", np.dtype("<u4")


def is_validation(doc_id: str, val_fraction: float) -> bool:
    h = int.from_bytes(hashlib.sha1(doc_id.encode()).digest()[:4], "little")
    return h / 2**32 < val_fraction


def _padded(n: int, block: int) -> int:
    return -(-n // block) * block


class _ShardWriter:
    """Writes one split's shards, rolling to a new tar at the target size."""

    def __init__(self, out: Path, split: str, field: str, dtype: np.dtype, size: ShardSize):
        self.out, self.split, self.field, self.dtype, self.size = out, split, field, dtype, size
        self.shards: list[ShardInfo] = []
        self.created: list[Path] = []  # removed again if the build fails
        self._tar: tarfile.TarFile | None = None
        self._docs = self._tokens = 0

    def _size_with(self, payload_bytes: int) -> int:
        """The .tar's size if closed after adding one more member of `payload_bytes`: a 512-byte
        header, the payload padded to 512, two zero blocks, all padded to tarfile's record size."""
        end = self._tar.offset + tarfile.BLOCKSIZE + _padded(payload_bytes, tarfile.BLOCKSIZE)
        return _padded(end + 2 * tarfile.BLOCKSIZE, tarfile.RECORDSIZE)

    def add(self, key: str, tokens: np.ndarray) -> None:
        payload = tokens.astype(self.dtype, copy=False).tobytes()
        if (self.size.unit == "bytes" and self._tar is not None
                and self._size_with(len(payload)) > self.size.amount):
            self._close()
        if self._tar is None:
            self._open()
        info = tarfile.TarInfo(f"{key}.{self.field}")
        info.size, info.mtime, info.mode = len(payload), 0, 0o644
        self._tar.addfile(info, io.BytesIO(payload))
        self._docs += 1
        self._tokens += len(tokens)
        if self.size.unit == "tokens" and self._tokens >= self.size.amount:
            self._close()

    def _name(self) -> str:
        return f"{self.split}-{len(self.shards):06d}.tar"

    def _open(self) -> None:
        self._path = self.out / (self._name() + ".tmp")
        self.created.append(self._path)
        self._tar = tarfile.open(self._path, "w", format=tarfile.USTAR_FORMAT)

    def _close(self) -> None:
        self._tar.close()
        final = self.out / self._name()
        os.replace(self._path, final)
        self.created.append(final)
        data = final.read_bytes()
        self.shards.append(ShardInfo(final.name, self._docs, self._tokens, len(data),
                                     hashlib.sha256(data).hexdigest()))
        self._tar, self._docs, self._tokens = None, 0, 0

    def finish(self) -> list[ShardInfo]:
        if self._tar is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.close()
        for p in self.created:
            p.unlink(missing_ok=True)


# ---------------------------------------------------------------------------- shuffling

# Documents per shuffle bucket are held in memory one bucket at a time: at most about this many
# bytes of tokens (an upper bound from the input's size: a token is at least one input byte).
SHUFFLE_BUCKET_BYTES = 512 << 20
_RECORD = np.dtype("<i8")  # spill record header: input position, token count


def shuffle_buckets(input_bytes: int, max_tokens: int | None, itemsize: int) -> int:
    upper = input_bytes if not max_tokens else min(input_bytes, max_tokens + (1 << 20))
    return max(1, -(-upper * itemsize // SHUFFLE_BUCKET_BYTES))


def _bucket_of(seed: int, index: int, buckets: int) -> int:
    h = hashlib.blake2b(f"{seed}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") % buckets


class _SpillShuffle:
    """Two-level shuffle of one split's documents: scatter to bucket files, then permute each
    bucket in memory and hand its documents to the shard writer (see the module docstring)."""

    def __init__(self, tmp: Path, split: str, dtype: np.dtype, buckets: int, seed: int):
        self.split, self.dtype, self.seed = split, dtype, seed
        self.paths = [tmp / f"{split}-{b:05d}.spill" for b in range(buckets)]
        self.files: list = [None] * buckets

    def add(self, index: int, tokens: np.ndarray) -> None:
        b = _bucket_of(self.seed, index, len(self.paths))
        if self.files[b] is None:
            self.files[b] = open(self.paths[b], "wb")
        f = self.files[b]
        f.write(np.array([index, len(tokens)], dtype=_RECORD).tobytes())
        f.write(tokens.astype(self.dtype, copy=False).tobytes())

    def drain(self, writer: "_ShardWriter") -> None:
        for b, path in enumerate(self.paths):
            f = self.files[b]
            if f is None:
                continue
            f.close()
            data, pos, docs = path.read_bytes(), 0, []
            while pos < len(data):
                index, n = np.frombuffer(data, dtype=_RECORD, count=2, offset=pos)
                pos += 2 * _RECORD.itemsize
                end = pos + int(n) * self.dtype.itemsize
                docs.append((int(index), np.frombuffer(data, dtype=self.dtype, count=int(n), offset=pos)))
                pos = end
            random.Random(f"kiln-data/{self.seed}/{self.split}/{b}").shuffle(docs)
            for index, tokens in docs:
                writer.add(f"{index:09d}", tokens)
            del data, docs
            path.unlink()
            self.files[b] = None

    def abort(self) -> None:
        for f, path in zip(self.files, self.paths):
            if f is not None:
                f.close()
            path.unlink(missing_ok=True)


class _InOrder:
    """The --no-shuffle sink: documents go straight to the shard writer in input order."""

    def __init__(self, writer: "_ShardWriter"):
        self.writer = writer

    def add(self, index: int, tokens: np.ndarray) -> None:
        self.writer.add(f"{index:09d}", tokens)

    def drain(self, writer) -> None:
        pass

    def abort(self) -> None:
        pass


# ---------------------------------------------------------------------------- tokenizing

def _batches(docs: Iterable[Document]) -> Iterator[list[Document]]:
    batch, chars = [], 0
    for doc in docs:
        batch.append(doc)
        chars += len(doc.text)
        if len(batch) >= BATCH_DOCS or chars >= BATCH_CHARS:
            yield batch
            batch, chars = [], 0
    if batch:
        yield batch


_worker_tokenizer = None


def _init_worker(tokenizer) -> None:
    global _worker_tokenizer
    # Each worker is one core: keep `tokenizers` from starting a thread per core in every worker.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _worker_tokenizer = tokenizer


def _encode_in_worker(texts: list[str]) -> list[np.ndarray]:
    return _worker_tokenizer.encode_batch(texts)


def encode_documents(docs: Iterable[Document], tokenizer, workers: int = 1
                     ) -> Iterator[tuple[Document, np.ndarray]]:
    """(document, token ids) in input order, tokenized by `workers` processes."""
    batches = _batches(docs)
    if workers <= 1:
        for batch in batches:
            yield from zip(batch, tokenizer.encode_batch([d.text for d in batch]))
        return
    # spawn, not fork: forking a process that already runs threads (tokenizers' Rust pool after
    # BPE training, torch, Ray) can deadlock; spawn is also what macOS uses.
    ctx = mp.get_context("spawn")
    with ctx.Pool(workers, initializer=_init_worker, initargs=(tokenizer,)) as pool:
        # apply_async with a bounded queue rather than imap: imap would read the whole corpus
        # ahead into memory. Taking results oldest-first keeps input order.
        pending: deque = deque()
        for batch in batches:
            pending.append((batch, pool.apply_async(_encode_in_worker, ([d.text for d in batch],))))
            if len(pending) >= workers * IN_FLIGHT_PER_WORKER:
                batch, result = pending.popleft()
                yield from zip(batch, result.get())
        while pending:
            batch, result = pending.popleft()
            yield from zip(batch, result.get())


# ---------------------------------------------------------------------------- building

@dataclass
class BuildReport:
    """What a build did: the manifest it wrote plus counts for the closing summary."""

    manifest: Manifest
    workers: int
    seconds: float
    input_files: int
    skipped: list[str] = field(default_factory=list)

    @property
    def documents(self) -> int:
        return sum(self.manifest.documents(s) for s in self.manifest.splits)

    @property
    def tokens(self) -> int:
        return sum(self.manifest.tokens(s) for s in self.manifest.splits)

    @property
    def shards(self) -> int:
        return sum(len(v) for v in self.manifest.splits.values())

    @property
    def bytes(self) -> int:
        return sum(s.bytes for v in self.manifest.splits.values() for s in v)

    @property
    def tokens_per_second(self) -> float:
        return self.tokens / max(self.seconds, 1e-9)


def _progress_bar(total: int, desc: str, progress: bool | None):
    from tqdm import tqdm  # here: only kiln-data's progress bar needs it

    # progress=None: a bar only when stderr is a terminal, so logs and CI output stay clean.
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024,
                file=sys.stderr, disable=None if progress is None else not progress,
                dynamic_ncols=True)


def _resolve_size(shard_size, shard_tokens) -> ShardSize:
    if shard_size is not None and shard_tokens is not None:
        raise ValueError("give shard_size or shard_tokens, not both")
    if shard_tokens is not None:
        return ShardSize(int(shard_tokens), "tokens")
    if shard_size is None:
        return ShardSize(1_000_000, "tokens")
    return shard_size if isinstance(shard_size, ShardSize) else parse_shard_size(shard_size)


def _input_files(inputs: list[str]) -> list[Path]:
    files = expand_inputs(inputs)
    if not files:
        raise DataError(f"no input files in {' '.join(inputs)} (the directories are empty or hold "
                        f"only hidden files); pass text, .jsonl or .parquet files")
    return files


def _no_documents(inputs: list[str], files: list[Path], skipped: list[str]) -> DataError:
    why = f"{len(skipped)} skipped as bad input, first: {skipped[0]}" if skipped else "all empty"
    return DataError(f"inputs {' '.join(inputs)} ({len(files)} file(s)) hold no documents ({why}); "
                     f"pass files with text in them")


def build_dataset(
    inputs: list[str],
    out: str | os.PathLike,
    tokenizer,
    *,
    val_fraction: float = 0.01,
    shard_size: ShardSize | str | None = None,
    shard_tokens: int | None = None,
    max_tokens: int | None = None,
    text_field: str = "text",
    text_column: str = "text",
    on_error: str = "raise",
    sources: list[str] | None = None,
    workers: int = 1,
    progress: bool | None = False,
    shuffle: bool = True,
    seed: int = 0,
) -> BuildReport:
    """Tokenize `inputs` into shards under `out` and write its manifest last. `shard_size` is a
    ShardSize or its text ("2M", "64MB"); `shard_tokens` is the older spelling of a token target.
    shuffle: documents shuffled across the output (seeded by `seed`); False keeps input order.
    On failure everything this call wrote is removed again."""
    start = time.perf_counter()
    size = _resolve_size(shard_size, shard_tokens)
    out = Path(out).expanduser().resolve()
    if (out / MANIFEST).exists():
        raise DataError(f"{out} already holds a dataset ({MANIFEST}); choose another --out or delete it")
    files = _input_files(inputs)
    out.mkdir(parents=True, exist_ok=True)

    field_name, dtype = token_field(tokenizer.vocab_size)
    writers = {s: _ShardWriter(out, s, field_name, dtype, size) for s in ("train", "val")}
    policy = InputPolicy(on_error)
    input_bytes = total_bytes(files)
    bar = _progress_bar(input_bytes, "tokenizing", progress)
    saved_tokenizer: Path | None = None
    spill = out / ".shuffle-tmp"
    if shuffle:
        spill.mkdir(exist_ok=True)
        buckets = shuffle_buckets(input_bytes, max_tokens, dtype.itemsize)
        sinks = {s: _SpillShuffle(spill, s, dtype, buckets, seed) for s in writers}
    else:
        sinks = {s: _InOrder(w) for s, w in writers.items()}
    try:
        docs = iter_documents(files, policy, text_field=text_field, text_column=text_column,
                              progress=bar.update)
        total = val_docs = train_docs = 0
        pending: tuple[str, np.ndarray] | None = None  # latest train document, written one step late
        with closing(encode_documents(docs, tokenizer, workers)) as encoded:
            for i, (doc, tokens) in enumerate(encoded):
                if len(tokens) == 0:
                    continue
                if val_fraction > 0 and is_validation(doc.id, val_fraction):
                    sinks["val"].add(i, tokens)
                    val_docs += 1
                else:
                    if pending is not None:
                        sinks["train"].add(*pending)
                        train_docs += 1
                    pending = (i, tokens)
                total += len(tokens)
                if i % 64 == 0:
                    bar.set_postfix_str(f"{i + 1:,} docs, {total:,} tokens", refresh=False)
                if max_tokens and total >= max_tokens:
                    break
        bar.set_postfix_str(f"{train_docs + val_docs + (pending is not None):,} docs, {total:,} tokens")
        if pending is not None:
            # A small corpus may hash no document into val: give it the last one, so that eval
            # loss always exists, unless that would leave training with nothing.
            to_val = val_fraction > 0 and val_docs == 0 and train_docs > 0
            sinks["val" if to_val else "train"].add(*pending)
        if shuffle:
            bar.set_description_str("shuffling")
        for s, w in writers.items():
            sinks[s].drain(w)
        splits = {s: w.finish() for s, w in writers.items()}
        if not splits["train"]:
            raise _no_documents(inputs, files, policy.skipped)
        blob = tokenizer.file_bytes()
        if blob is not None:  # saved beside the shards: the data is unusable without it
            saved_tokenizer = out / tokenizer.to_manifest()["file"]
            tmp = saved_tokenizer.with_name(saved_tokenizer.name + ".tmp")
            tmp.write_bytes(blob)
            os.replace(tmp, saved_tokenizer)
        build = {"shard_size": str(size), "val_fraction": val_fraction, "max_tokens": max_tokens,
                 "text_field": text_field, "text_column": text_column, "on_error": on_error,
                 "input_files": len(files), "skipped_inputs": len(policy.skipped),
                 "shuffle": shuffle, "seed": seed}
        manifest = Manifest(out, tokenizer.to_manifest(), dtype.name, splits,
                            sources or [str(p) for p in inputs], build)
        manifest.write()
    except BaseException:  # KeyboardInterrupt too: never leave half a dataset behind
        for w in writers.values():
            w.abort()
        for sink in sinks.values():
            sink.abort()
        if saved_tokenizer is not None:
            saved_tokenizer.unlink(missing_ok=True)
        raise
    finally:
        bar.close()
        if shuffle:
            shutil.rmtree(spill, ignore_errors=True)
    return BuildReport(manifest, workers, time.perf_counter() - start, len(files), policy.skipped)


def build_shards(inputs: list[str], out: str | os.PathLike, tokenizer, **kwargs) -> Manifest:
    """build_dataset, returning only the manifest (with the skipped-input messages attached as
    `.skipped`, as callers of this older entry point expect)."""
    report = build_dataset(inputs, out, tokenizer, **kwargs)
    report.manifest.skipped = report.skipped  # type: ignore[attr-defined]
    return report.manifest


def train_bpe_on_inputs(
    inputs: list[str],
    vocab_size: int,
    *,
    eos_token: str = DEFAULT_EOS,
    text_field: str = "text",
    text_column: str = "text",
    on_error: str = "raise",
    progress: bool | None = False,
) -> HFTokenizer:
    """Train byte-level BPE on every document of `inputs`, read in the same order and with the
    same bad-input policy as the build that follows, so it sees exactly the documents that build
    will tokenize (reports of skipped input come from the build)."""
    files = _input_files(inputs)
    policy = InputPolicy(on_error)
    seen = 0

    def texts() -> Iterator[str]:
        nonlocal seen
        for doc in iter_documents(files, policy, text_field=text_field, text_column=text_column,
                                  progress=bar.update):
            seen += 1
            yield doc.text

    with _progress_bar(total_bytes(files), "training BPE", progress) as bar:
        tok = train_bpe(texts(), vocab_size, eos_token=eos_token)
    if not seen:
        raise _no_documents(inputs, files, policy.skipped)
    return tok
