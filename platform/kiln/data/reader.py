"""One reader's endless, *resumable* stream of token blocks.

WebDataset cannot save and restore a reader's position, so kiln keeps the position itself, at
every level, as small plain data that a checkpoint can hold:

    ShardCursor   where we are in one source's shards, read several at once: pass (epoch), per
                  open shard its index and documents already taken, merge draws so far
    BlockPacker   the cursor plus the documents being packed (several at once, "lanes"): for each,
                  where it lies and how many of its tokens were emitted
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
import itertools
import os
import random
import tarfile
import warnings
from typing import Iterator
from urllib.parse import urlparse

import numpy as np
from webdataset import utils as wds_utils
from webdataset import tariterators
from webdataset.tariterators import base_plus_ext

from kiln.data.stall import open_remote
from kiln.errors import DataError


def _seeded(*parts) -> random.Random:
    return random.Random("/".join(str(p) for p in parts))


def _draw(*parts) -> int:
    """A 64-bit counter-based draw: a pure function of its parts, so a stream that draws with it
    needs no RNG state, only its counters."""
    h = hashlib.blake2b("/".join(str(p) for p in parts).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little")


# ---------------------------------------------------------------------------- reading a shard
#
# Local shards are read by a lean ustar reader (below) that yields exactly the samples
# webdataset's `tarfile_samples` yields for them, several times faster. It only handles what
# kiln-data writes and any plain tar like it: regular-file members with checksummed headers,
# complete data, and an end-of-archive block. At the first thing it does not handle (a corrupt
# or truncated header or member, another member type, a name webdataset treats specially, a
# duplicate field) it hands the shard to webdataset, which re-reads it and, after the samples
# already yielded, does exactly what it always did: raises, ends, or skips, with the same
# errors. Remote shards (http, pipe:, ...) always stream through webdataset.

_CHUNK = 1 << 20
DEFAULT_READ_TIMEOUT_S = 300.0  # data.read_timeout_s
_COMPRESSED = (b"\x1f\x8b\x08", b"BZh", b"\x5d\x00\x00\x80", b"\xfd7zXZ", b"\x28\xb5\x2f\xfd")
_REGULAR = (tarfile.REGTYPE, tarfile.AREGTYPE)
# Header bytes other than name, size and checksum (the same for every member kiln-data writes)
# that are known to parse, with their byte sum: the checksum then only needs to add the rest.
_plain_fields: dict[bytes, int] = {}


def _is_local_file(url: str) -> bool:
    """A plain path that webdataset's gopen would open() itself (no scheme, no rewriting)."""
    return (url != "-" and urlparse(url).scheme == "" and "GOPEN_REWRITE" not in os.environ
            and not getattr(wds_utils, "enforce_security", False))


def _plain_member(hdr: bytes) -> tuple[str, int] | None:
    """(name, size) of a regular-file header that Python's tarfile reads exactly so, or None
    for anything else (the caller then falls back to webdataset and tarfile themselves)."""
    if hdr[124] in (0o200, 0o377):  # base-256 size: leave it to tarfile
        return None
    try:
        chksum = tarfile.nti(hdr[148:156])
        size = tarfile.nti(hdr[124:136])
    except tarfile.HeaderError:
        return None
    rest = hdr[100:124] + hdr[136:148] + hdr[156:512]
    rest_sum = _plain_fields.get(rest)
    if rest_sum is None:
        if hdr[156:157] not in _REGULAR or hdr[345] != 0:  # another type, or a ustar name prefix
            return None
        try:
            for a, b in ((100, 108), (108, 116), (116, 124), (136, 148), (329, 337), (337, 345)):
                tarfile.nti(hdr[a:b])
        except tarfile.HeaderError:
            return None
        rest_sum = sum(rest)
        if len(_plain_fields) < 256:
            _plain_fields[rest] = rest_sum
    # tarfile's unsigned header checksum: every byte but the checksum field's, plus 8 spaces
    if chksum != 256 + sum(hdr[0:100]) + sum(hdr[124:136]) + rest_sum:
        return None
    name = tarfile.nts(hdr[0:100], tarfile.ENCODING, "surrogateescape")
    if name.endswith("/") or name.startswith("__"):  # a directory; webdataset's metadata names
        return None
    return name, size


def _local_tar_samples(url: str):
    """Samples of a local tar as webdataset groups them ({"__key__", "__url__", field: bytes}).
    A sample is yielded only once the next member has been read whole (or the archive ended),
    as webdataset does. Returns (finished, samples yielded): finished is False where it stopped
    at something it leaves to webdataset."""
    try:
        f = open(url, "rb", buffering=0)
    except OSError:
        return False, 0
    with f:
        data, pos, eof = b"", 0, False

        def have(n: int) -> bool:
            nonlocal data, pos, eof
            while len(data) - pos < n and not eof:
                more = f.read(max(_CHUNK, n - (len(data) - pos)))
                if more:
                    data, pos = data[pos:] + more, 0
                else:
                    eof = True
            return len(data) - pos >= n

        count, current = 0, None
        try:
            if not have(tarfile.BLOCKSIZE) or data.startswith(_COMPRESSED):
                return False, 0
            while True:
                if not have(tarfile.BLOCKSIZE):
                    return False, count
                hdr = data[pos:pos + tarfile.BLOCKSIZE]
                if hdr[0] == 0 and hdr.count(0) == tarfile.BLOCKSIZE:  # end of archive: tarfile stops
                    if current is None:
                        return False, count
                    yield current
                    return True, count + 1
                member = _plain_member(hdr)
                if member is None:
                    return False, count
                name, size = member
                padded = -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
                if not have(tarfile.BLOCKSIZE + padded):
                    return False, count
                start = pos + tarfile.BLOCKSIZE
                payload = data[start:start + size]
                pos = start + padded
                key, suffix = base_plus_ext(name)
                if key is None:
                    return False, count
                suffix = suffix.lower()
                if suffix.startswith("__"):
                    return False, count
                if current is None or key != current["__key__"]:
                    if current is not None:
                        yield current
                        count += 1
                    current = {"__key__": key, "__url__": url}
                elif suffix in current:  # webdataset raises on a duplicate field
                    return False, count
                current[suffix] = payload
        except OSError:
            return False, count


def _tar_samples(url: str, read_timeout_s: float | None = None) -> Iterator[dict]:
    """The samples of one shard, as webdataset's `tarfile_samples` yields them (errors too).
    A shard that streams from a process (curl, a pipe: command) fails after read_timeout_s
    without a byte (kiln/data/stall.py)."""
    finished, done, stream = False, 0, None
    if _is_local_file(url):
        finished, done = yield from _local_tar_samples(url)
        if finished:
            return
        samples = tariterators.tarfile_samples([{"url": url}])
    else:
        stream = open_remote(url, read_timeout_s)
        samples = tariterators.group_by_keys(tariterators.tar_file_expander([{"url": url, "stream": stream}]))
    try:
        for _ in range(done):  # already yielded, identically, by the local reader
            if next(samples, None) is None:  # only if the file changed meanwhile
                return
        yield from samples
        if stream is not None:  # the tar ends before the stream does: read on to EOF, where
            while stream.read(1 << 16):  # a failed command's exit status is checked (stall.py)
                pass
    finally:
        if stream is not None:  # now, not at garbage collection: a stalled command is killed
            stream.close()


def document_index(url: str, itemsize: int, expected: int | None = None) -> np.ndarray | None:
    """Where each document's tokens lie in a local shard: an (n, 2) array of (offset, size), read
    from the member headers alone (a seek past each member's data), so documents can be read in
    any order. None for anything the lean reader would hand to webdataset (a remote or compressed
    shard, another member type, a duplicate field, a member past the end of the file), a sample
    without a decodable tokens.* field, or fewer documents than the manifest lists: such a shard
    is read in stored order, where those problems are reported as they always were."""
    if not _is_local_file(url):
        return None
    try:
        fd = os.open(url, os.O_RDONLY)
    except OSError:
        return None
    try:
        end, off = os.fstat(fd).st_size, 0
        found: list[tuple[int, int]] = []
        key, fields, tokens = None, set(), None
        while True:
            hdr = os.pread(fd, tarfile.BLOCKSIZE, off)
            if len(hdr) < tarfile.BLOCKSIZE or (off == 0 and hdr.startswith(_COMPRESSED)):
                return None
            if hdr.count(0) == tarfile.BLOCKSIZE:  # end of archive
                break
            member = _plain_member(hdr)
            if member is None:
                return None
            name, size = member
            start = off + tarfile.BLOCKSIZE
            off = start + -(-size // tarfile.BLOCKSIZE) * tarfile.BLOCKSIZE
            if off > end:
                return None
            k, suffix = base_plus_ext(name)
            if k is None or suffix.lower().startswith("__"):
                return None
            suffix = suffix.lower()
            if k != key:
                if key is not None:
                    if tokens is None:
                        return None
                    found.append(tokens)
                key, fields, tokens = k, set(), None
            elif suffix in fields:
                return None
            fields.add(suffix)
            if tokens is None and suffix.startswith("tokens."):
                if size % itemsize:
                    return None
                tokens = (start, size)
        if key is None or tokens is None:
            return None
        found.append(tokens)
    except OSError:
        return None
    finally:
        os.close(fd)
    if expected is not None and len(found) < expected:
        return None
    return np.asarray(found, dtype=np.int64)


def indexed_documents(url: str, index: np.ndarray, order, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The documents at these positions of `index` (see document_index), in this order."""
    fd = os.open(url, os.O_RDONLY)
    try:
        for i in order:
            offset, size = index[i]
            payload = os.pread(fd, int(size), int(offset))
            if len(payload) != size:
                raise DataError(f"shard {url} changed while it was being read (document {i + 1} is cut short); "
                                f"rebuild or restore it")
            yield np.frombuffer(payload, dtype=dtype)
    finally:
        os.close(fd)


def read_documents(url: str, dtype: np.dtype, on_error: str = "raise",
                   stats: dict | None = None, expected: int | None = None,
                   read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S) -> Iterator[np.ndarray]:
    """Token arrays of the documents in one shard, in order. Errors name the shard; with
    on_error="skip" a bad sample is skipped, a bad shard is cut short, both counted in `stats`
    and warned about once per shard. `expected` (the manifest's document count) catches a tar
    truncated exactly at a block boundary, which the tar format itself cannot tell from its end."""
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

    samples = _tar_samples(url, read_timeout_s)
    seen = 0
    try:  # the local reader's file closes when the shard is done with, not at garbage collection
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
    finally:
        samples.close()


class ShardCursor:
    """Endless documents from this reader's shards of one source, read several shards at once.

    Each pass deals the reader's shards, in a fresh seeded order, into `open_shards` slots
    (slot k reads order[k], order[k + K], ...). The pass's documents are a random merge of the
    slots: each document comes from a slot drawn with probability proportional to the documents
    it has left (the manifest's counts), so all slots run out together and every stretch of the
    stream mixes K shards, wherever they lie in the corpus. A pass still reads every document of
    the reader's shards exactly once. The draw is counter-based (a hash of seed, reader, source,
    pass and draw number), so the state stays a few integers per slot.

    With `shuffle_documents`, each local shard's documents are read in a fresh seeded order per
    pass (their places come from the tar headers, see document_index): shards written in input
    order (a book's chapters in sequence, one source's files together) then mix as well as
    shuffled ones. Remote shards stream, so they keep their stored order."""

    def __init__(self, shards: list[str], dtype: np.dtype, seed: int, reader: int, source: int,
                 on_error: str = "raise", state: dict | None = None, expected: dict | None = None,
                 open_shards: int = 1, shuffle_documents: bool = False,
                 read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S):
        if not shards:
            raise DataError(f"reader {reader} has no shards in source {source}")
        self.shards, self.dtype, self.on_error = shards, dtype, on_error
        self.read_timeout_s = read_timeout_s
        self.expected = expected or {}  # url -> documents the manifest lists
        self.seed, self.reader, self.source = seed, reader, source
        self.shuffle_documents = shuffle_documents
        self._shard_id = {u: i for i, u in enumerate(shards)}
        self.k = max(1, min(int(open_shards), len(shards)))
        state = _upgrade_cursor_state(state or {})
        self.epoch = state.get("epoch", 0)
        self.slots = [dict(s) for s in state.get("slots", [])] or self._fresh_slots()
        if len(self.slots) != self.k:
            raise DataError(f"reader {reader}: the saved stream position reads {len(self.slots)} shard(s) at once, "
                            f"this run {self.k} (data.open_shards); restore data.open_shards or set "
                            f"data.resume_stream=false")
        self.draws = state.get("draws", 0)
        self.last = state.get("last", 0)  # the slot the last document came from
        self.stats = dict(state.get("stats", {}))
        self._pass_docs = state.get("pass_docs", 0)
        self._open: list[Iterator[np.ndarray] | None] = [None] * self.k
        self._lists_epoch, self._lists, self._left = None, [], []

    def _fresh_slots(self) -> list[dict]:
        return [{"index": 0, "offset": 0} for _ in range(self.k)]

    def order(self, epoch: int) -> list[str]:
        order = list(self.shards)
        _seeded(self.seed, "shards", self.source, self.reader, epoch).shuffle(order)
        return order

    def _slot_lists(self) -> list[list[str]]:
        """This pass's shards per slot, and per slot the documents left from each index on."""
        if self._lists_epoch != self.epoch:
            order = self.order(self.epoch)
            self._lists = [order[k::self.k] for k in range(self.k)]
            counted = self.expected and all(u in self.expected for u in self.shards)
            self._left = []
            for urls in self._lists:
                sizes = [self.expected[u] if counted else 1 for u in urls]  # no counts: shards left
                self._left.append(list(itertools.accumulate(reversed(sizes)))[::-1] + [0])
            self._counted = counted
            self._lists_epoch = self.epoch
        return self._lists

    def state(self) -> dict:
        return {"epoch": self.epoch, "slots": [dict(s) for s in self.slots], "draws": self.draws,
                "last": self.last, "pass_docs": self._pass_docs, "stats": dict(self.stats)}

    def current_url(self, slot: int | None = None) -> str:
        k = self.last if slot is None else slot
        return self._slot_lists()[k][self.slots[k]["index"]]

    def _choose(self) -> int | None:
        """The slot of the next document (None: the pass is done)."""
        lists = self._slot_lists()
        weights = []
        for k, slot in enumerate(self.slots):
            if slot["index"] >= len(lists[k]):
                weights.append(0)
            else:
                left = self._left[k][slot["index"]] - (slot["offset"] if self._counted else 0)
                weights.append(max(left, 1))  # a shard shorter than its count stays choosable
        total = sum(weights)
        if total == 0:
            return None
        if self.k == 1:
            return 0
        target = _draw(self.seed, self.reader, self.source, self.epoch, self.draws) % total
        for k, w in enumerate(weights):
            if target < w:
                return k
            target -= w
        return len(weights) - 1

    def _laid_out(self, url: str, epoch: int) -> tuple[np.ndarray, list[int]] | None:
        """(document index, this pass's reading order) of a shard read out of order, or None:
        the shard is read in stored order."""
        if not self.shuffle_documents:
            return None
        index = document_index(url, self.dtype.itemsize, self.expected.get(url))
        if index is None:
            return None
        order = list(range(len(index)))
        _seeded(self.seed, "documents", self.source, self.reader, epoch, self._shard_id[url]).shuffle(order)
        return index, order

    def _reader_at(self, k: int, skip: int, url: str | None = None,
                   stats: dict | None = None) -> Iterator[np.ndarray]:
        url = url or self.current_url(k)
        laid = self._laid_out(url, self.epoch)
        if laid is not None:
            index, order = laid
            return indexed_documents(url, index, order[skip:], self.dtype)
        docs = read_documents(url, self.dtype, self.on_error, self.stats if stats is None else stats,
                              self.expected.get(url), self.read_timeout_s)
        for _ in range(skip):  # resume mid-shard: skip what was already taken
            if next(docs, None) is None:
                break
        return docs

    def next_doc(self) -> np.ndarray:
        while True:
            k = self._choose()
            if k is None:  # every slot has run out: the pass is done, reshuffle for the next
                if self._pass_docs == 0:
                    raise DataError(
                        f"reader {self.reader}: none of its {len(self.shards)} shard(s) of source "
                        f"{self.source} yielded a document (all unreadable?), e.g. {self.shards[0]}")
                self.epoch, self.draws, self._pass_docs = self.epoch + 1, 0, 0
                self.slots = self._fresh_slots()
                continue
            self.draws += 1
            slot = self.slots[k]
            if self._open[k] is None:
                self._open[k] = self._reader_at(k, slot["offset"])
            doc = next(self._open[k], None)
            if doc is None:  # the slot's shard is exhausted: on to its next one
                self._open[k] = None
                slot["index"], slot["offset"] = slot["index"] + 1, 0
                continue
            slot["offset"] += 1
            self._pass_docs += 1
            self.last = k
            return doc

    def last_address(self) -> list[int]:
        """Where the last document taken lies: [pass, slot, index in the slot's list, position]."""
        slot = self.slots[self.last]
        return [self.epoch, self.last, slot["index"], slot["offset"] - 1]

    def read_addresses(self, addresses: list[list[int]]) -> list[np.ndarray]:
        """The documents at these addresses (see last_address), each shard read once, in order;
        the cursor's own position is untouched."""
        by_shard: dict[tuple, list[int]] = {}
        for n, (epoch, k, index, position) in enumerate(addresses):
            by_shard.setdefault((epoch, k, index), []).append(n)
        out: list = [None] * len(addresses)
        for (epoch, k, index), ns in by_shard.items():
            url = self.order(epoch)[k::self.k][index]
            want = {addresses[n][3]: [] for n in ns}
            for n in ns:
                want[addresses[n][3]].append(n)
            last = max(want)
            laid = self._laid_out(url, epoch)
            if laid is not None:  # straight to each document
                doc_index, order = laid
                positions = sorted(p for p in want if p < len(order))
                for position, doc in zip(positions, indexed_documents(url, doc_index, [order[p] for p in positions],
                                                                     self.dtype)):
                    for n in want[position]:
                        out[n] = doc
                continue
            for position, doc in enumerate(self._reader_at(k, 0, url, stats={})):
                for n in want.get(position, ()):
                    out[n] = doc
                if position == last:
                    break
        missing = [addresses[n] for n in range(len(addresses)) if out[n] is None]
        if missing:
            epoch, k, index, position = missing[0]
            raise DataError(f"shard {self.order(epoch)[k::self.k][index]} changed since the stream position was "
                            f"saved: it no longer holds document {position + 1}; set data.resume_stream=false")
        return out


def _upgrade_cursor_state(state: dict) -> dict:
    """Stream states saved before shards were read several at a time (one cursor: epoch,
    index, offset) are a single slot's position."""
    if "slots" in state or "index" not in state:
        return state
    return {"epoch": state["epoch"], "slots": [{"index": state["index"], "offset": state["offset"]}],
            "draws": 0, "last": 0, "pass_docs": state.get("pass_docs", 0),
            "stats": state.get("stats", {})}


def block_dtype(dtypes, eos_id: int) -> np.dtype:
    """The dtype blocks are packed in: the shards' own integer type where the eos id fits in it
    (2 bytes a token for most vocabularies, 4x less to copy and to send between processes than
    int64), int64 otherwise. Consumers widen to int64 (ResumableLoader does)."""
    dt = np.result_type(*[np.dtype(d) for d in dtypes]).newbyteorder("=")
    if dt.kind in "ui" and np.iinfo(dt).min <= eos_id <= np.iinfo(dt).max:
        return dt
    return np.dtype(np.int64)


class BlockPacker:
    """Documents joined by eos, cut into blocks of `block` tokens, from `lanes` documents at once.

    Each lane packs its own run of documents (a document's tokens, its eos, the lane's next
    document...); every block is cut from one lane drawn at random (counter-based). With many
    lanes, consecutive blocks come from many documents, so a shuffle window of W blocks holds
    blocks of at least `lanes` documents even when documents are far longer than the window
    (books, code files), where one lane would fill the window from a handful of them.

    State: per lane the address of its document (pass, slot, shard index, position in the shard)
    and how many of its tokens were emitted; restoring re-reads those documents, one sequential
    read per shard. A few integers per lane, however long the documents."""

    def __init__(self, cursor: ShardCursor, block: int, eos_id: int, state: dict | None = None,
                 dtype=np.int64, lanes: int = 1, seed: int = 0, reader: int = 0, source: int = 0):
        self.cursor, self.block, self.eos_id = cursor, block, eos_id
        self.dtype = np.dtype(dtype)
        self.seed, self.reader, self.source = seed, reader, source
        state = state or {}
        saved_lanes = state.get("lanes")
        if saved_lanes is not None and len(saved_lanes) != lanes:
            raise DataError(f"reader {reader}: the saved stream position packs {len(saved_lanes)} document(s) at "
                            f"once, this run {lanes} (data.open_documents); restore data.open_documents or set "
                            f"data.resume_stream=false")
        self.lanes = max(1, int(lanes))
        self.drawn = state.get("drawn", 0)
        # per lane: [document, tokens emitted, address]; None: take the next document
        self._lane: list[list | None] = [None] * self.lanes
        saved = cursor.state()
        if saved_lanes is not None:
            wanted = [(i, a[:4], a[4]) for i, a in enumerate(saved_lanes) if a is not None]
            docs = cursor.read_addresses([a for _, a, _ in wanted])
            for (i, addr, pos), doc in zip(wanted, docs):
                self._lane[i] = [doc, pos, addr]
        elif state.get("carry_len"):  # a version 1 state: one lane, its carry the last document's tail
            address = cursor.last_address()
            (doc,) = cursor.read_addresses([address])
            self._lane[0] = [doc, len(doc) + 1 - state["carry_len"], address]
        cursor.stats = saved["stats"]  # re-reading must not count skipped data twice

    def state(self) -> dict:
        lanes = [None if lane is None else [*lane[2], lane[1]] for lane in self._lane]
        return {"cursor": self.cursor.state(), "lanes": lanes, "drawn": self.drawn}

    def _choose(self) -> int:
        """A lane drawn uniformly: blocks spread evenly over the open documents. (Drawing by the
        tokens a document has left lets one long document fill most of a window: measured 0.06
        nats behind uniform sampling on shuffled shards, against 0.001 with this draw.)"""
        if self.lanes == 1:
            return 0
        return _draw(self.seed, self.reader, self.source, "lane", self.drawn) % self.lanes

    def next_block(self) -> np.ndarray:
        i = self._choose()
        self.drawn += 1
        block, out = self.block, np.empty(self.block, dtype=self.dtype)
        lane, filled = self._lane[i], 0
        while True:
            if lane is None:
                doc = self.cursor.next_doc()
                lane = [doc, 0, self.cursor.last_address()]
            doc, pos = lane[0], lane[1]
            take = min(len(doc) - pos, block - filled)
            if take:
                out[filled:filled + take] = doc[pos:pos + take]
                filled += take
                lane[1] = pos + take
            if filled == block:  # full; the eos (at least) stays in the lane
                break
            out[filled] = self.eos_id  # the document is done: its eos, then the lane's next one
            filled += 1
            lane = None
            if filled == block:
                break
        self._lane[i] = lane
        return out


def mixture_choice(seed: int, reader: int, i: int, cumulative: list[float]) -> int:
    """Source of block i: a counter-based draw, so the mixture itself carries no RNG state."""
    u = _draw(seed, reader, i) / 2**64
    for s, edge in enumerate(cumulative):
        if u < edge:
            return s
    return len(cumulative) - 1


class MixedStream:
    """Blocks drawn from several sources with fixed weights."""

    def __init__(self, sources: list[dict], *, reader: int, seed: int, block: int, eos_id: int,
                 on_error: str, state: dict | None = None, open_shards: int = 1, open_documents: int = 1,
                 shuffle_documents: list[bool] | None = None, read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S):
        """shuffle_documents: per source, whether its shards' documents are read in a seeded order."""
        state = state or {}
        saved = state.get("sources", [{} for _ in sources])
        shuffle_documents = shuffle_documents or [False] * len(sources)
        dtype = block_dtype([src["dtype"] for src in sources], eos_id)
        self.packers = []
        for s, (src, st) in enumerate(zip(sources, saved)):
            cursor = ShardCursor(src["shards"], np.dtype(src["dtype"]), seed, reader, s, on_error,
                                 st.get("cursor"), src.get("documents"), open_shards, shuffle_documents[s],
                                 read_timeout_s)
            self.packers.append(BlockPacker(cursor, block, eos_id, st, dtype=dtype, lanes=open_documents,
                                            seed=seed, reader=reader, source=s))
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
