"""One reader's endless, *resumable* stream of token blocks.

WebDataset cannot save and restore a reader's position, so kiln keeps the position itself, at
every level, as small plain data that a checkpoint can hold:

    ShardCursor   where we are in one source's shards: pass (epoch), index in that pass's
                  shuffled shard order, documents already taken from the current shard
    BlockPacker   the cursor plus the carry-over: tokens read but not yet emitted in a block
    MixedStream   one packer per source, and how many blocks were drawn (the source of block i
                  is a pure function of (seed, reader, i), so the mixture needs no other state)
    WindowShuffle blocks are shuffled in windows of W: the state is the stream's state at the
                  window's start plus how many of the window's blocks were emitted; resuming
                  re-reads that window and skips what was emitted

Restoring a state and reading on yields exactly the blocks an uninterrupted reader would have
produced, token for token.
"""

from __future__ import annotations

import hashlib
import random
import warnings
from typing import Iterator

import numpy as np

from kiln.errors import DataError


def _seeded(*parts) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


def read_documents(url: str, dtype: np.dtype, on_error: str = "raise",
                   stats: dict | None = None, expected: int | None = None) -> Iterator[np.ndarray]:
    """Token arrays of the documents in one shard, in order. Errors name the shard; with
    on_error="skip" a bad sample is skipped, a bad shard is cut short, both counted in `stats`
    and warned about once per shard. `expected` (the manifest's document count) catches a tar
    truncated exactly at a block boundary, which the tar format itself cannot tell from its end."""
    from webdataset.tariterators import tarfile_samples

    warned = False

    def problem(msg: str, kind: str) -> None:
        nonlocal warned
        if on_error != "skip":
            raise DataError(f"shard {url}: {msg} (set data.on_error=skip to skip bad shards and samples)")
        if stats is not None:
            stats[kind] = stats.get(kind, 0) + 1
        if not warned:
            warnings.warn(f"kiln: skipping bad data in shard {url}: {msg}", stacklevel=2)
            warned = True

    samples = tarfile_samples([{"url": url}])
    seen = 0
    while True:
        try:
            sample = next(samples)
            seen += 1
        except StopIteration:
            if expected is not None and seen < expected:
                problem(f"truncated: it holds {seen} of the {expected} documents its manifest lists",
                        "skipped_shards")
            return
        except Exception as e:  # truncated/corrupt tar, unreadable URL (webdataset appends context)
            detail = str(e.args[0] if e.args else e).split(" @ ")[0]  # drop webdataset's stream repr
            problem(f"cannot be read ({type(e).__name__}: {detail})", "skipped_shards")
            return
        payload = next((v for k, v in sample.items() if k.startswith("tokens.")), None)
        if payload is None or len(payload) % dtype.itemsize:
            problem(f"sample {sample.get('__key__')!r} has no decodable tokens.* field", "skipped_samples")
            continue
        yield np.frombuffer(payload, dtype=dtype)


class ShardCursor:
    """Endless documents from this reader's shards of one source; a new shard order each pass."""

    def __init__(self, shards: list[str], dtype: np.dtype, seed: int, reader: int, source: int,
                 on_error: str = "raise", state: dict | None = None, expected: dict | None = None):
        if not shards:
            raise DataError(f"reader {reader} has no shards in source {source}")
        self.shards, self.dtype, self.on_error = shards, dtype, on_error
        self.expected = expected or {}  # url -> documents the manifest lists
        self.seed, self.reader, self.source = seed, reader, source
        state = state or {}
        self.epoch = state.get("epoch", 0)
        self.index = state.get("index", 0)
        self.offset = state.get("offset", 0)
        self.stats = dict(state.get("stats", {}))
        self._docs: Iterator[np.ndarray] | None = None
        self._pass_docs = state.get("pass_docs", 0)

    def order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        _seeded(self.seed, "shards", self.source, self.reader, epoch).shuffle(order)
        return order

    def state(self) -> dict:
        return {"epoch": self.epoch, "index": self.index, "offset": self.offset,
                "pass_docs": self._pass_docs, "stats": dict(self.stats)}

    def current_url(self) -> str:
        return self.order(self.epoch)[self.index]

    def _open(self) -> None:
        url = self.current_url()
        self._docs = read_documents(url, self.dtype, self.on_error, self.stats, self.expected.get(url))
        for _ in range(self.offset):  # resume mid-shard: skip what was already taken
            if next(self._docs, None) is None:
                break

    def next_doc(self) -> np.ndarray:
        while True:
            if self._docs is None:
                self._open()
            doc = next(self._docs, None)
            if doc is not None:
                self.offset += 1
                self._pass_docs += 1
                return doc
            # shard exhausted: move on, reshuffling at the end of each pass
            self._docs, self.offset = None, 0
            self.index += 1
            if self.index == len(self.shards):
                if self._pass_docs == 0:
                    raise DataError(
                        f"reader {self.reader}: none of its {len(self.shards)} shard(s) of source "
                        f"{self.source} yielded a document (all unreadable?), e.g. {self.shards[0]}")
                self.epoch, self.index, self._pass_docs = self.epoch + 1, 0, 0


class BlockPacker:
    """Documents joined by eos, cut into blocks of `block` tokens.

    The carry-over (tokens read but not yet emitted) is always a suffix of the last document
    taken plus its eos, so the state stores only its length; restoring re-reads that document.
    This keeps the state a few integers however long the documents are."""

    def __init__(self, cursor: ShardCursor, block: int, eos_id: int, state: dict | None = None):
        self.cursor, self.block, self.eos_id = cursor, block, eos_id
        self.carry = np.empty(0, dtype=np.int64)
        carry_len = (state or {}).get("carry_len", 0)
        if carry_len:
            saved = cursor.state()
            cursor.offset -= 1  # step back onto the document the carry came from
            cursor._pass_docs -= 1
            doc = self._with_eos(cursor.next_doc())
            cursor.stats = saved["stats"]  # re-reading must not count skipped data twice
            self.carry = doc[len(doc) - carry_len:]

    def _with_eos(self, doc: np.ndarray) -> np.ndarray:
        out = np.empty(len(doc) + 1, dtype=np.int64)
        out[:-1] = doc
        out[-1] = self.eos_id
        return out

    def state(self) -> dict:
        return {"cursor": self.cursor.state(), "carry_len": len(self.carry)}

    def next_block(self) -> np.ndarray:
        parts, have = [self.carry], len(self.carry)
        while have < self.block:
            doc = self._with_eos(self.cursor.next_doc())
            parts.append(doc)
            have += len(doc)
        buf = np.concatenate(parts) if len(parts) > 1 else self.carry
        self.carry = buf[self.block:]
        return buf[: self.block]


def mixture_choice(seed: int, reader: int, i: int, cumulative: list[float]) -> int:
    """Source of block i: a counter-based draw, so the mixture itself carries no RNG state."""
    h = hashlib.blake2b(f"{seed}/{reader}/{i}".encode(), digest_size=8).digest()
    u = int.from_bytes(h, "little") / 2**64
    for s, edge in enumerate(cumulative):
        if u < edge:
            return s
    return len(cumulative) - 1


class MixedStream:
    """Blocks drawn from several sources with fixed weights."""

    def __init__(self, sources: list[dict], *, reader: int, seed: int, block: int, eos_id: int,
                 on_error: str, state: dict | None = None):
        state = state or {}
        saved = state.get("sources", [{} for _ in sources])
        self.packers = []
        for s, (src, st) in enumerate(zip(sources, saved)):
            cursor = ShardCursor(src["shards"], np.dtype(src["dtype"]), seed, reader, s, on_error,
                                 st.get("cursor"), src.get("documents"))
            self.packers.append(BlockPacker(cursor, block, eos_id, st))
        total = sum(src["weight"] for src in sources)
        acc, self.cumulative = 0.0, []
        for src in sources:
            acc += src["weight"] / total
            self.cumulative.append(acc)
        self.seed, self.reader = seed, reader
        self.drawn = state.get("drawn", 0)
        self.source_counts = list(state.get("source_counts", [0] * len(sources)))

    def state(self) -> dict:
        return {"drawn": self.drawn, "source_counts": list(self.source_counts),
                "sources": [p.state() for p in self.packers]}

    def next_block(self) -> np.ndarray:
        s = 0 if len(self.packers) == 1 else mixture_choice(self.seed, self.reader, self.drawn, self.cumulative)
        self.drawn += 1
        self.source_counts[s] += 1
        return self.packers[s].next_block()

    def stats(self) -> dict:
        out: dict = {}
        for p in self.packers:
            for k, v in p.cursor.stats.items():
                out[k] = out.get(k, 0) + v
        return out


class WindowShuffle:
    """Shuffle blocks within consecutive windows of `window` blocks (1 = no shuffling)."""

    def __init__(self, make_stream, *, window: int, seed: int, reader: int, state: dict | None = None):
        self.make_stream, self.window = make_stream, max(window, 1)
        self.seed, self.reader = seed, reader
        state = state or {}
        self.window_index = state.get("window_index", 0)
        self.window_start = state.get("window_start")  # stream state when this window began
        self.emitted = state.get("emitted", 0)
        self.stream = make_stream(self.window_start)
        self.buffer: list[np.ndarray] | None = None
        if self.window_start is not None:  # resuming: rebuild the window, skip what was emitted
            self._fill()

    def _fill(self) -> None:
        self.buffer = [self.stream.next_block() for _ in range(self.window)]
        _seeded(self.seed, "window", self.reader, self.window_index).shuffle(self.buffer)

    def next_block(self) -> np.ndarray:
        if self.buffer is None or self.emitted == self.window:
            if self.buffer is not None:
                self.window_index += 1
            self.window_start = self.stream.state()
            self.emitted = 0
            self._fill()
        block = self.buffer[self.emitted]
        self.emitted += 1
        return block

    def state(self) -> dict:
        return {"window_index": self.window_index, "window_start": self.window_start,
                "emitted": self.emitted}
