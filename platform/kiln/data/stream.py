"""Streaming token batches from WebDataset shards.

Readers: every (rank, DataLoader worker) pair is one reader. Reader r of R reads shards
r, r+R, r+2R, ... of the shard list, so no two readers ever open the same shard and together
they cover all of them. Each reader loops over its shards forever (a fresh shuffle each pass),
so every rank can always produce exactly `trainer.max_steps` steps: no rank runs dry and
leaves the others hanging in a collective.

Within a reader, documents are joined with the tokenizer's end-of-document token and cut into
blocks of seq_len + 1 tokens (inputs and next-token targets), then mixed in a shuffle buffer.
"""

from __future__ import annotations

import random
from typing import Iterator

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info
from webdataset.tariterators import tarfile_samples

from kiln.errors import DataError


def assign_shards(urls: list[str], rank: int, world: int, worker: int, num_workers: int) -> list[str]:
    """The shards reader (rank, worker) reads: disjoint across readers, complete together."""
    readers = world * num_workers
    if len(urls) < readers:
        raise DataError(
            f"{len(urls)} shard(s) for {readers} readers ({world} ranks x {num_workers} DataLoader workers): "
            f"every reader needs its own shard. Lower data.num_workers, use fewer ranks, or rebuild the "
            f"data with smaller shards (kiln-data --shard-tokens)"
        )
    reader = rank * num_workers + worker
    return urls[reader::readers]


def read_documents(url: str, dtype: np.dtype) -> Iterator[np.ndarray]:
    """Token arrays of the documents in one shard, in order; errors name the shard."""
    try:
        for sample in tarfile_samples([{"url": url}]):
            payload = next((v for k, v in sample.items() if k.startswith("tokens.")), None)
            if payload is None:
                raise DataError(f"shard {url}: sample {sample.get('__key__')} has no tokens.* field")
            yield np.frombuffer(payload, dtype=dtype)
    except DataError:
        raise
    except Exception as e:  # tarfile / IO errors arrive with webdataset's context appended
        raise DataError(f"shard {url}: cannot be read ({type(e).__name__}: {e.args[0] if e.args else e})") from e


def pack(docs: Iterator[np.ndarray], block: int, eos_id: int) -> Iterator[np.ndarray]:
    """Concatenate documents (each followed by eos) and cut into blocks of `block` tokens."""
    buf = np.empty(0, dtype=np.int64)
    for doc in docs:
        buf = np.concatenate([buf, doc.astype(np.int64), np.array([eos_id], dtype=np.int64)])
        while len(buf) >= block:
            yield buf[:block]
            buf = buf[block:]


def shuffled(items: Iterator, size: int, rng: random.Random) -> Iterator:
    """Shuffle buffer: hold `size` items, emit a random one as each new one arrives."""
    if size <= 1:
        yield from items
        return
    buf = []
    for item in items:
        if len(buf) < size:
            buf.append(item)
            continue
        i = rng.randrange(size)
        buf[i], item = item, buf[i]
        yield item
    rng.shuffle(buf)
    yield from buf


def batched(blocks: Iterator[np.ndarray], batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(x, y) micro-batches of shape (B, T): y is x shifted by one token."""
    group = []
    for b in blocks:
        group.append(b)
        if len(group) == batch_size:
            arr = torch.from_numpy(np.stack(group))  # (B, T + 1)
            yield arr[:, :-1].contiguous(), arr[:, 1:].contiguous()
            group = []


class TrainStream(IterableDataset):
    """Endless micro-batches for one rank; split further across its DataLoader workers."""

    def __init__(self, urls: list[str], *, rank: int, world: int, num_workers: int, seq_len: int,
                 batch_size: int, eos_id: int, dtype: str, seed: int, shuffle_buffer: int):
        super().__init__()
        self.urls, self.rank, self.world, self.num_workers = list(urls), rank, world, max(num_workers, 1)
        self.seq_len, self.batch_size, self.eos_id = seq_len, batch_size, eos_id
        self.dtype = np.dtype(dtype)
        self.seed, self.shuffle_buffer = seed, shuffle_buffer

    def reader_shards(self) -> tuple[int, list[str]]:
        info = get_worker_info()
        worker = info.id if info is not None else 0
        return self.rank * self.num_workers + worker, assign_shards(
            self.urls, self.rank, self.world, worker, self.num_workers)

    def _documents(self, reader: int, shards: list[str]) -> Iterator[np.ndarray]:
        epoch = 0
        while True:
            order = list(shards)
            random.Random(f"{self.seed}/{reader}/{epoch}").shuffle(order)
            for url in order:
                yield from read_documents(url, self.dtype)
            epoch += 1

    def __iter__(self):
        reader, shards = self.reader_shards()
        blocks = pack(self._documents(reader, shards), self.seq_len + 1, self.eos_id)
        rng = random.Random(f"{self.seed}/{reader}/shuffle")
        yield from batched(shuffled(blocks, self.shuffle_buffer, rng), self.batch_size)


def train_loader(urls: list[str], *, rank: int, world: int, num_workers: int, seq_len: int,
                 batch_size: int, eos_id: int, dtype: str, seed: int, shuffle_buffer: int) -> Iterator:
    stream = TrainStream(urls, rank=rank, world=world, num_workers=num_workers, seq_len=seq_len,
                         batch_size=batch_size, eos_id=eos_id, dtype=dtype, seed=seed,
                         shuffle_buffer=shuffle_buffer)
    if num_workers == 0:
        return iter(stream)
    # batch_size=None: the stream already yields whole micro-batches. Workers take turns, so
    # the interleaving (and hence the batch order) is deterministic.
    loader = DataLoader(stream, batch_size=None, num_workers=num_workers, prefetch_factor=4)
    return iter(loader)


def val_batches(urls: list[str], *, rank: int, world: int, seq_len: int, batch_size: int,
                num_batches: int, eos_id: int, dtype: str) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The same `num_batches` micro-batches for this rank at every evaluation: the validation
    split read in order, block i going to rank i % world, wrapping around if it is short."""
    dt = np.dtype(dtype)

    def endless_docs():
        while True:
            for url in urls:
                yield from read_documents(url, dt)

    def mine():
        for i, block in enumerate(pack(endless_docs(), seq_len + 1, eos_id)):
            if i % world == rank:
                yield block

    it = batched(mine(), batch_size)
    for _ in range(num_batches):
        yield next(it)
