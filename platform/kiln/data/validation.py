"""The evaluation set: fixed micro-batches of the validation split, a slice of it per rank.

The loop builds them once per run and keeps them (eval_batches x micro_batch x (seq_len + 1)
tokens per rank), so every evaluation of a run, and of a run resumed with the same number of
ranks, measures the same blocks. How the split is sliced across ranks:

- at least as many validation shards as ranks: rank r reads only shards r, r + world, ... in
  order, so a rank's reading does not grow with the number of ranks;
- fewer shards, local: the split's documents (found from the tar headers) are cut into world
  contiguous slices and rank r reads only slice r: its reading does not grow with the ranks either;
- fewer shards, remote (streamed): the split is read in order and block i goes to rank i % world;
  a rank reads the first world x (its blocks) blocks, once per run.

Either way the ranks' blocks are disjoint, and a split shorter than what is asked wraps around.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from kiln.data.reader import DEFAULT_READ_TIMEOUT_S, document_index, indexed_documents, read_documents
from kiln.errors import DataError


def pack(docs: Iterator[np.ndarray], block: int, eos_id: int) -> Iterator[np.ndarray]:
    """Concatenate documents (each followed by eos) and cut into blocks of `block` tokens."""
    buf = np.empty(0, dtype=np.int64)
    for doc in docs:
        buf = np.concatenate([buf, doc.astype(np.int64), np.array([eos_id], dtype=np.int64)])
        while len(buf) >= block:
            yield buf[:block]
            buf = buf[block:]


def val_batches(urls: list[str], *, rank: int, world: int, seq_len: int, batch_size: int,
                num_batches: int, eos_id: int, dtype: str, on_error: str = "raise",
                read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """This rank's `num_batches` validation micro-batches (x, y), the same on every call."""
    dt = np.dtype(dtype)
    own_shards = len(urls) >= world
    mine_urls = urls[rank::world] if own_shards else list(urls)
    sliced = None if own_shards else document_slice(urls, rank, world, dt)
    own_shards = own_shards or sliced is not None

    def read_mine():
        if sliced is None:
            for url in mine_urls:
                yield from read_documents(url, dt, on_error, read_timeout_s=read_timeout_s)
            return
        for url, index, positions in sliced:
            yield from indexed_documents(url, index, positions, dt)

    def endless_docs():
        while True:
            n = 0
            for doc in read_mine():
                n += 1
                yield doc
            if n == 0:
                raise DataError(f"the validation shards yielded no documents: {mine_urls[:3]}")

    def mine():
        blocks = pack(endless_docs(), seq_len + 1, eos_id)
        if own_shards:
            yield from blocks
            return
        for i, block in enumerate(blocks):
            if i % world == rank:
                yield block

    blocks = mine()
    for _ in range(num_batches):
        arr = torch.from_numpy(np.stack([next(blocks) for _ in range(batch_size)]))
        yield arr[:, :-1].contiguous(), arr[:, 1:].contiguous()


def document_slice(urls: list[str], rank: int, world: int, dtype: np.dtype) -> list | None:
    """Rank `rank`'s contiguous world-th of the split's documents, as [(url, index, positions)],
    or None where a shard cannot be laid out (remote, compressed...) or there are fewer
    documents than ranks."""
    indexes = [document_index(url, dtype.itemsize) for url in urls]
    if any(ix is None for ix in indexes):
        return None
    total = sum(len(ix) for ix in indexes)
    if total < world:
        return None
    lo, hi = rank * total // world, (rank + 1) * total // world
    out, first = [], 0
    for url, ix in zip(urls, indexes):
        a, b = max(lo, first), min(hi, first + len(ix))
        if a < b:
            out.append((url, ix, range(a - first, b - first)))
        first += len(ix)
    return out


def eval_set(urls: list[str], *, rank: int, world: int, seq_len: int, batch_size: int, num_batches: int,
             eos_id: int, dtype: str, on_error: str = "raise", device: torch.device | None = None,
             read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """val_batches read once and kept (on `device`): what the loop evaluates on every time."""
    return [(x.to(device), y.to(device)) if device is not None else (x, y)
            for x, y in val_batches(urls, rank=rank, world=world, seq_len=seq_len, batch_size=batch_size,
                                    num_batches=num_batches, eos_id=eos_id, dtype=dtype, on_error=on_error,
                                    read_timeout_s=read_timeout_s)]
