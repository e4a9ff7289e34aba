"""Streaming token batches from WebDataset shards, resumable token for token.

Readers: every (rank, DataLoader worker) pair is one reader. Within each source, reader r of
R reads shards r, r+R, r+2R, ... so no two readers ever open the same shard and together they
cover all of them. Each reader loops over its shards forever (a fresh order each pass), so
every rank can always produce exactly `trainer.max_steps` steps: no rank runs dry and leaves
the others hanging in a collective.

Resumption: each batch travels with its reader's state (reader.py). The loader remembers the
state of the last batch it *handed out* from every reader and which reader comes next, so
batches prefetched but never used are simply produced again after a restart.
"""

from __future__ import annotations

import atexit
import os
import signal
import threading
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from kiln.data.reader import DEFAULT_READ_TIMEOUT_S, MixedStream, WindowShuffle, read_documents
from kiln.errors import DataError

__all__ = ["StreamSpec", "ResumableLoader", "assign_shards", "read_documents", "pack", "val_batches",
           "train_loader"]

# 2: a cursor reads several shards at once (per-slot positions) and a packer packs several
# documents at once (per-lane addresses). 3: shuffle_documents (a shard's documents in a seeded
# order per pass). Older states (one of each, stored order) are still read.
STATE_VERSION = 3
READABLE_VERSIONS = (1, 2, 3)
# What a setting was before the state recorded it.
_BEFORE_RECORDED = {"open_shards": 1, "open_documents": 1}


def assign_shards(urls: list[str], rank: int, world: int, worker: int, num_workers: int) -> list[str]:
    """The shards reader (rank, worker) reads: disjoint across readers, complete together."""
    readers = world * num_workers
    if len(urls) < readers:
        raise DataError(
            f"{len(urls)} shard(s) for {readers} readers ({world} ranks x {num_workers} DataLoader workers): "
            f"every reader needs its own shard. Lower data.num_workers, use fewer ranks, or rebuild the "
            f"data with smaller shards (kiln-data --shard-size)"
        )
    return urls[rank * num_workers + worker::readers]


@dataclass(frozen=True)
class StreamSpec:
    """What every reader of a run shares. sources: [{"name", "shards", "dtype", "weight"}]."""

    sources: tuple
    seq_len: int
    batch_size: int
    eos_id: int
    seed: int
    shuffle_window: int
    on_error: str = "raise"
    fingerprint: str = ""
    open_shards: int = 1  # shards each reader reads at once (data.open_shards)
    open_documents: int = 1  # documents each reader packs blocks from at once (data.open_documents)
    read_timeout_s: float | None = DEFAULT_READ_TIMEOUT_S  # data.read_timeout_s

    def identity(self) -> dict:
        """What must match for a saved stream position to mean the same thing again."""
        return {"fingerprint": self.fingerprint, "seq_len": self.seq_len, "batch_size": self.batch_size,
                "seed": self.seed, "shuffle_window": self.shuffle_window, "open_shards": self.open_shards,
                "open_documents": self.open_documents, "shuffle_documents": self.documents_shuffled(),
                "weights": [s["weight"] for s in self.sources]}

    def documents_shuffled(self) -> list[bool]:
        """Per source: its shards' documents read in a seeded order per pass (Source.to_stream
        decides it; a source given without the key is read in stored order)."""
        return [bool(s.get("shuffle_documents", False)) for s in self.sources]


class TrainStream(IterableDataset):
    """Endless (blocks, meta) micro-batches for one rank; DataLoader workers split it further.

    blocks is a (B, seq_len + 1) numpy array in the shards' compact integer type: a worker
    sends it to the training process as a few KB of pickled bytes, where torch tensors would
    each cost a shared-memory segment and a file-descriptor handshake. ResumableLoader turns
    it into int64 (x, y)."""

    def __init__(self, spec: StreamSpec, *, rank: int, world: int, num_workers: int,
                 rotation: int = 0, reader_states: dict | None = None):
        super().__init__()
        self.spec, self.rank, self.world = spec, rank, world
        self.roles = max(num_workers, 1)
        self.rotation, self.reader_states = rotation, reader_states or {}

    def role(self) -> int:
        info = get_worker_info()
        return ((info.id if info is not None else 0) + self.rotation) % self.roles

    def reader_shards(self, role: int) -> list[list[str]]:
        return [assign_shards(list(s["shards"]), self.rank, self.world, role, self.roles)
                for s in self.spec.sources]

    def __iter__(self):
        spec, role = self.spec, self.role()
        reader = self.rank * self.roles + role
        sources = [dict(s, shards=mine) for s, mine in zip(spec.sources, self.reader_shards(role))]

        def make_stream(state):
            return MixedStream(sources, reader=reader, seed=spec.seed, block=spec.seq_len + 1,
                               eos_id=spec.eos_id, on_error=spec.on_error, state=state,
                               open_shards=spec.open_shards, open_documents=spec.open_documents,
                               shuffle_documents=spec.documents_shuffled(), read_timeout_s=spec.read_timeout_s)

        shuffle = WindowShuffle(make_stream, window=spec.shuffle_window, seed=spec.seed, reader=reader,
                                state=self.reader_states.get(role))
        while True:
            blocks = np.stack([shuffle.next_block() for _ in range(spec.batch_size)])
            meta = {"role": role, "state": shuffle.state(), "stats": shuffle.stream.stats(),
                    "source_counts": list(shuffle.stream.source_counts)}
            yield blocks, meta


class ResumableLoader:
    """Iterator of (x, y) for one rank, with `state_dict()` to save its exact position."""

    def __init__(self, spec: StreamSpec, *, rank: int, world: int, num_workers: int,
                 state: dict | None = None, prefetch_factor: int = 4, pin_memory: bool = False):
        self.spec, self.rank, self.world, self.num_workers = spec, rank, world, num_workers
        self.pin_memory = pin_memory  # page-locked batches: the host-to-GPU copy runs asynchronously
        self.roles = max(num_workers, 1)
        if state is not None:
            check_resumable(state, spec, world, num_workers)
        self.readers = {int(k): v for k, v in (state or {}).get("readers", {}).items()}
        self.next_role = (state or {}).get("next_role", 0)
        self._stats: dict[int, dict] = {}
        self._counts: dict[int, list] = {}
        dataset = TrainStream(spec, rank=rank, world=world, num_workers=num_workers,
                              rotation=self.next_role, reader_states=self.readers)
        self.dataset = dataset
        self.batch_timeout_s = batch_timeout(spec.read_timeout_s)
        if num_workers == 0:
            self._it = iter(dataset)
        else:
            # batch_size=None: the stream yields whole micro-batches. Workers are read in turn
            # (in order), which is what makes "the next reader" well defined.
            # collate_fn passes the numpy batch through as it is (see TrainStream).
            self._it = iter(DataLoader(dataset, batch_size=None, num_workers=num_workers,
                                       prefetch_factor=prefetch_factor, worker_init_fn=_ignore_stop_signals,
                                       collate_fn=_as_is, timeout=self.batch_timeout_s))
            # Readers ignore SIGTERM (see _ignore_stop_signals), so they must be shut down by us,
            # before multiprocessing's exit hook would try to terminate them with that signal.
            atexit.register(self.close)

    def close(self) -> None:
        """Stop the DataLoader's reader processes (idempotent)."""
        it = getattr(self, "_it", None)
        if it is not None and hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()

    def kill_readers(self) -> None:
        """Kill readers stuck in a read (a clean shutdown would wait for them, and they outlive
        SIGTERM for a while: _ignore_stop_signals), then shut the loader down. Their pids leave
        torch's SIGCHLD watch first, or it would report the kills as a crash."""
        workers = getattr(self._it, "_workers", [])
        if getattr(self._it, "_worker_pids_set", False):
            torch.utils.data._utils.signal_handling._remove_worker_pids(id(self._it))
            self._it._worker_pids_set = False
        for w in workers:
            if w.is_alive():
                w.kill()
                w.join(timeout=5)
        self.close()

    def skip(self, n: int) -> None:
        """Read past the next n micro-batches (the loss-spike guard skips the data of a spike)."""
        for _ in range(n):
            next(self)

    def __iter__(self):
        return self

    def __next__(self) -> tuple[torch.Tensor, torch.Tensor]:
        try:
            blocks, meta = next(self._it)
        except RuntimeError as e:
            if "timed out" not in str(e):
                raise
            self.kill_readers()  # stuck in a read: nothing to wait for, nor to shut down cleanly
            shards = [u for urls in self.dataset.reader_shards(self.next_role) for u in urls]
            shown = ", ".join(shards[:3]) + (f" and {len(shards) - 3} more" if len(shards) > 3 else "")
            raise DataError(f"rank {self.rank}: DataLoader worker {self.next_role} sent no batch for "
                            f"{self.batch_timeout_s:g} s (twice data.read_timeout_s, plus a minute); it reads "
                            f"{shown}: check the storage they are on (a hung mount?), or raise "
                            f"data.read_timeout_s") from None
        role = int(meta["role"])
        self.readers[role] = meta["state"]
        self._stats[role] = meta["stats"]
        self._counts[role] = list(meta["source_counts"])
        self.next_role = (role + 1) % self.roles
        x = torch.from_numpy(np.ascontiguousarray(blocks[:, :-1], dtype=np.int64))  # (B, T) inputs
        y = torch.from_numpy(np.ascontiguousarray(blocks[:, 1:], dtype=np.int64))  # (B, T) targets
        if self.pin_memory:  # without it, .to(device, non_blocking=True) copies synchronously
            x, y = x.pin_memory(), y.pin_memory()
        return x, y

    def state_dict(self) -> dict:
        return {"version": STATE_VERSION, "rank": self.rank, "world": self.world,
                "num_workers": self.num_workers, "next_role": self.next_role,
                "readers": {str(k): v for k, v in self.readers.items()}, **self.spec.identity()}

    def stats(self) -> dict:
        """Skipped shards/samples, and blocks drawn per source, summed over this rank's readers."""
        out: dict = {}
        for s in self._stats.values():
            for k, v in s.items():
                out[k] = out.get(k, 0) + v
        counts = [sum(c[i] for c in self._counts.values()) for i in range(len(self.spec.sources))]
        out["source_blocks"] = counts
        return out


def batch_timeout(read_timeout_s: float | None) -> float:
    """How long to wait for a DataLoader worker's next batch (0: for ever): longer than one
    bounded read, so a stalled remote shard fails with its own, more precise error first."""
    return 2 * read_timeout_s + BATCH_TIMEOUT_MARGIN_S if read_timeout_s else 0


BATCH_TIMEOUT_MARGIN_S = 60.0


def _as_is(batch):
    return batch


READER_SIGTERM_GRACE_S = 90.0


def _ignore_stop_signals(_worker_id: int) -> None:
    """Preemption (SIGTERM to the whole process group, as Slurm sends it) is the training
    process's to handle: it checkpoints, then shuts its readers down itself. A reader dying on the
    signal first would crash the run instead. So a reader outlives SIGTERM, but only for a grace
    period: should the training process never shut it down (a stuck queue at exit, say), it
    leaves on its own rather than hanging the exit forever."""

    def on_term(signum, frame):
        if not getattr(on_term, "armed", False):
            on_term.armed = True
            t = threading.Timer(READER_SIGTERM_GRACE_S, lambda: os._exit(0))
            t.daemon = True
            t.start()

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


def check_resumable(state: dict, spec: StreamSpec, world: int, num_workers: int) -> None:
    """A saved position only means something for the same data and the same reader layout.
    Re-partitioning shards across a different number of readers cannot reproduce the
    uninterrupted order, so kiln refuses rather than silently repeating or skipping documents."""
    deliberately = ("to continue anyway, set data.resume_stream=false: the data stream starts over "
                    "(documents already seen may be seen again)")
    if state.get("version") not in READABLE_VERSIONS:
        raise DataError(f"saved data-stream state has version {state.get('version')}, expected {STATE_VERSION}; "
                        + deliberately)
    if state.get("fingerprint") != spec.fingerprint:
        raise DataError(
            f"the data changed since the checkpoint: dataset fingerprint {state.get('fingerprint')!r} was "
            f"saved, the configured data has {spec.fingerprint!r}. Point data.path/data.mixture at the "
            f"original data, or " + deliberately)
    if (state.get("world"), state.get("num_workers")) != (world, num_workers):
        raise DataError(
            f"the data stream was saved with {state.get('world')} rank(s) x {state.get('num_workers')} "
            f"DataLoader worker(s) per rank, this run has {world} x {num_workers}. Resume with "
            f"launcher.num_workers={state.get('world')} data.num_workers={state.get('num_workers')}, or "
            + deliberately)
    config_key = {"seq_len": "data.seq_len", "batch_size": "trainer.micro_batch_size", "seed": "trainer.seed",
                  "shuffle_window": "data.shuffle_buffer", "open_shards": "data.open_shards",
                  "open_documents": "data.open_documents", "shuffle_documents": "data.shuffle_documents"}
    for key, value in spec.identity().items():
        if key == "shuffle_documents":  # before version 3: stored order
            saved = state.get(key, [False] * len(spec.sources))
        else:
            saved = state.get(key, _BEFORE_RECORDED.get(key))
        if key != "fingerprint" and saved != value:
            where = config_key.get(key, "the mixture weights")
            shown = str(saved[0]).lower() if key == "shuffle_documents" and len(set(saved)) == 1 else saved
            setting = f" ({where}={shown})" if key in config_key else ""
            raise DataError(f"the data stream was saved with {key}={saved}, this run has {value}; "
                            f"restore it{setting}, or " + deliberately)


def train_loader(urls: list[str], *, rank: int, world: int, num_workers: int, seq_len: int, batch_size: int,
                 eos_id: int, dtype: str, seed: int, shuffle_buffer: int, on_error: str = "raise",
                 state: dict | None = None, open_shards: int = 1) -> ResumableLoader:
    """One source, convenience form."""
    spec = StreamSpec(sources=({"name": "data", "shards": tuple(urls), "dtype": dtype, "weight": 1.0},),
                      seq_len=seq_len, batch_size=batch_size, eos_id=eos_id, seed=seed,
                      shuffle_window=shuffle_buffer, on_error=on_error, open_shards=open_shards)
    return ResumableLoader(spec, rank=rank, world=world, num_workers=num_workers, state=state)


# The evaluation set (and the plain packer it uses) lives in validation.py; re-exported here for
# existing importers.
from kiln.data.validation import pack, val_batches  # noqa: E402
