"""A stalled data read fails the run, naming the shard, instead of hanging it: a remote shard
(here a pipe: command) that goes silent, and a DataLoader worker stuck in a local read (a FIFO
stands in for a hung mount). Nothing they started is left running."""

import os
from pathlib import Path

import numpy as np
import pytest

from kiln.data import stream
from kiln.data.build import build_shards
from kiln.data.manifest import load_manifest
from kiln.data.sources import fingerprint, resolve_source
from kiln.data.stream import ResumableLoader, StreamSpec
from kiln.data.tokenizer import ByteTokenizer
from kiln.errors import DataError

from conftest import stdlib_files


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("stall") / "d"
    build_shards([str(p) for p in stdlib_files(6)], out, ByteTokenizer(), val_fraction=0.0, shard_tokens=40_000)
    return out


def pipe_spec(shards: Path, command: str, read_timeout_s: float) -> StreamSpec:
    n = len(load_manifest(shards).splits["train"])
    src = resolve_source(f"pipe:{command} {shards}/train-{{000000..{n - 1:06d}}}.tar",
                         manifest=str(shards / "manifest.json"))
    return StreamSpec(sources=(src.to_stream(),), seq_len=32, batch_size=4, eos_id=256, seed=5, shuffle_window=1,
                      fingerprint=fingerprint([src]), read_timeout_s=read_timeout_s)


def running(marker: str) -> list[int]:
    found = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if marker in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                found.append(int(cmdline.parent.name))
        except OSError:
            pass
    return found


@pytest.mark.timeout(60)
def test_a_remote_shard_that_goes_silent_fails_naming_it(shards):
    # the first 3 KB of each shard, then silence: a server that stopped sending mid-shard
    spec = pipe_spec(shards, "sh -c 'head -c 3000 \"$0\"; exec sleep 617'", read_timeout_s=1)
    with pytest.raises(DataError) as e:
        loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
        for _ in range(50):
            next(loader)
    msg = str(e.value)
    assert "train-0000" in msg and "no data for 1 s" in msg and "data.read_timeout_s" in msg, msg
    assert running("sleep 617") == []  # the command and what it started were killed


@pytest.mark.timeout(60)
def test_bounded_remote_reads_read_whole_shards_and_report_a_failed_command(shards):
    local = resolve_source(str(shards))
    n_docs = sum(load_manifest(shards).splits["train"][i].documents for i in range(len(local.train)))
    from kiln.data.reader import read_documents

    docs = [d for u in local.train for d in read_documents(f"pipe:cat {u}", np.dtype("<u2"), read_timeout_s=60)]
    assert len(docs) == n_docs
    # The tar ends before the command does (the sleep makes that certain): its exit status is
    # still read, not lost when the reader closes a stream it has finished with.
    with pytest.raises(DataError, match=r"exit 3"):
        list(read_documents(f"pipe:cat {local.train[0]}; sleep 0.3; exit 3", np.dtype("<u2"), read_timeout_s=60))


@pytest.mark.timeout(60)
def test_a_reader_stuck_in_a_local_read_fails_naming_its_shard(tmp_path, monkeypatch):
    fifo = tmp_path / "train-000000.tar"
    os.mkfifo(fifo)  # opening it blocks until a writer comes: none ever does
    monkeypatch.setattr(stream, "BATCH_TIMEOUT_MARGIN_S", 1.0)  # the real wait would be 2 x 0.5 s + a minute
    spec = StreamSpec(sources=({"name": "data", "shards": (str(fifo),), "dtype": "<u2", "weight": 1.0},),
                      seq_len=32, batch_size=4, eos_id=256, seed=5, shuffle_window=1, read_timeout_s=0.5)
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=1)
    workers = list(loader._it._workers)
    with pytest.raises(DataError) as e:
        next(loader)
    msg = str(e.value)
    assert "rank 0: DataLoader worker 0 sent no batch for 2 s" in msg and str(fifo) in msg, msg
    loader.close()
    for w in workers:
        w.join(timeout=10)
        assert not w.is_alive()
