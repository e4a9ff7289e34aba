"""Shards: what is written is exactly what is read; readers split shards disjointly."""

import hashlib
import json
from itertools import combinations

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from conftest import stdlib_files
from kiln.data.build import build_shards
from kiln.data.manifest import load_manifest
from kiln.data.stream import StreamSpec, TrainStream, assign_shards, pack, read_documents, train_loader, val_batches
from kiln.data.tokenizer import ByteTokenizer
from kiln.errors import DataError


def write_corpus(root):
    root.mkdir(parents=True, exist_ok=True)
    (root / "a.txt").write_text("hello world\n")
    (root / "b.md").write_text("Ünïcödé text ✓ — two\nlines")
    (root / "docs.jsonl").write_text(
        json.dumps({"text": "first json doc"}) + "\n\n" + json.dumps({"text": "second", "id": 2}) + "\n")
    return ["hello world\n", "Ünïcödé text ✓ — two\nlines", "first json doc", "second"]


def test_round_trip_returns_exactly_the_tokens_written(tmp_path):
    texts = write_corpus(tmp_path / "in")
    tok = ByteTokenizer()
    m = build_shards([str(tmp_path / "in")], tmp_path / "out", tok, val_fraction=0.0, shard_tokens=20,
                     shuffle=False)  # input order, to compare with the texts as written
    assert len(m.splits["train"]) >= 2, "small shard size should give several shards"
    read = [doc for url in m.urls("train") for doc in read_documents(url, np.dtype(m.token_dtype))]
    assert [tok.decode(d) for d in read] == texts
    assert [d.tolist() for d in read] == [tok.encode(t).tolist() for t in texts]
    # The manifest's counts and checksums describe the files on disk.
    again = load_manifest(tmp_path / "out")
    assert again.documents("train") == 4
    assert again.tokens("train") == sum(len(t.encode()) for t in texts)
    for s in again.splits["train"]:
        assert hashlib.sha256((tmp_path / "out" / s.file).read_bytes()).hexdigest() == s.sha256


def test_same_input_gives_byte_identical_shards(tmp_path):
    files = [str(p) for p in stdlib_files(10)]
    a = build_shards(files, tmp_path / "a", ByteTokenizer(), val_fraction=0.2, shard_tokens=30_000)
    b = build_shards(files, tmp_path / "b", ByteTokenizer(), val_fraction=0.2, shard_tokens=30_000)
    assert [s.sha256 for s in a.splits["train"]] == [s.sha256 for s in b.splits["train"]]
    assert [s.sha256 for s in a.splits["val"]] == [s.sha256 for s in b.splits["val"]]
    assert a.splits["val"], "a val split must exist"


def test_val_split_never_empty_for_tiny_corpus(tmp_path):
    write_corpus(tmp_path / "in")
    m = build_shards([str(tmp_path / "in")], tmp_path / "out", ByteTokenizer(), val_fraction=0.01)
    assert m.documents("val") >= 1 and m.documents("train") >= 1


def test_bad_jsonl_line_names_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"text": "ok"}\nnot json\n')
    with pytest.raises(DataError, match=r"bad.jsonl:2: not JSON"):
        build_shards([str(bad)], tmp_path / "out", ByteTokenizer())


def test_non_utf8_file_raises_or_is_skipped(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "good.txt").write_text("fine text")
    (tmp_path / "in" / "blob.bin").write_bytes(b"\xff\xfe\x00binary")
    with pytest.raises(DataError, match="blob.bin: not UTF-8"):
        build_shards([str(tmp_path / "in")], tmp_path / "out1", ByteTokenizer())
    m = build_shards([str(tmp_path / "in")], tmp_path / "out2", ByteTokenizer(), on_error="skip",
                     val_fraction=0.0)
    assert m.documents("train") == 1 and len(m.skipped) == 1


@pytest.mark.parametrize("n,world,workers", [(16, 2, 2), (7, 3, 2), (4, 4, 1), (29, 2, 3), (5, 1, 1)])
def test_assignment_is_disjoint_and_complete(n, world, workers):
    urls = [f"s{i}" for i in range(n)]
    parts = [assign_shards(urls, r, world, w, workers) for r in range(world) for w in range(workers)]
    for a, b in combinations(parts, 2):
        assert not set(a) & set(b)
    assert sorted(u for p in parts for u in p) == sorted(urls)
    assert all(parts), "every reader has at least one shard"


def test_more_readers_than_shards_is_an_error():
    with pytest.raises(DataError, match="3 shard"):
        assign_shards(["a", "b", "c"], 1, 2, 1, 2)


class _ShardProbe(TrainStream):
    """Yields the shards each DataLoader worker would read, instead of tokens."""

    def __iter__(self):
        role = self.role()
        yield self.rank * self.roles + role, self.reader_shards(role)[0]


def test_dataloader_workers_split_each_ranks_shards(small_dataset):
    m = load_manifest(small_dataset)
    urls = m.urls("train")
    seen = {}
    for rank in range(2):
        spec = StreamSpec(sources=({"name": "d", "shards": tuple(urls), "dtype": "uint16", "weight": 1.0},),
                          seq_len=8, batch_size=1, eos_id=256, seed=0, shuffle_window=0)
        probe = _ShardProbe(spec, rank=rank, world=2, num_workers=2)
        for reader, shards in DataLoader(probe, batch_size=None, num_workers=2):
            seen[reader] = shards
    assert sorted(seen) == [0, 1, 2, 3]
    for a, b in combinations(seen.values(), 2):
        assert not set(a) & set(b)
    assert sorted(u for s in seen.values() for u in s) == sorted(urls)


def test_stream_packs_documents_with_eos_and_never_ends(tmp_path):
    (tmp_path / "in").mkdir()
    (tmp_path / "in" / "a.txt").write_text("abcdefg")
    (tmp_path / "in" / "b.txt").write_text("hijk")
    m = build_shards([str(tmp_path / "in")], tmp_path / "out", ByteTokenizer(), val_fraction=0.0)
    it = train_loader(m.urls("train"), rank=0, world=1, num_workers=0, seq_len=4, batch_size=2,
                      eos_id=256, dtype=m.token_dtype, seed=0, shuffle_buffer=0)
    stream = np.array(list(b"abcdefg") + [256] + list(b"hijk") + [256])  # 13 tokens a pass
    got = []
    for _ in range(6):  # 6 batches x 2 blocks x 5 tokens = 60 tokens: more than four passes
        x, y = next(it)
        assert x.shape == (2, 4) and x.dtype == torch.int64
        assert torch.equal(x[:, 1:], y[:, :-1])
        got.extend(torch.cat([x, y[:, -1:]], dim=1).reshape(-1).tolist())
    expected = np.tile(stream, 5)[:60].tolist()
    assert got == expected


def test_pack_is_exact():
    docs = [np.array([1, 2, 3]), np.array([4]), np.array([5, 6, 7, 8, 9])]
    blocks = [b.tolist() for b in pack(iter(docs), 4, 0)]
    assert blocks == [[1, 2, 3, 0], [4, 0, 5, 6], [7, 8, 9, 0]]


def test_validation_batches_are_fixed_and_split_by_rank(small_dataset):
    m = load_manifest(small_dataset)
    kw = dict(seq_len=32, batch_size=4, num_batches=3, eos_id=256, dtype=m.token_dtype)
    r0 = list(val_batches(m.urls("val"), rank=0, world=2, **kw))
    r0_again = list(val_batches(m.urls("val"), rank=0, world=2, **kw))
    r1 = list(val_batches(m.urls("val"), rank=1, world=2, **kw))
    assert len(r0) == 3
    assert all(torch.equal(a[0], b[0]) for a, b in zip(r0, r0_again))
    assert not torch.equal(r0[0][0], r1[0][0])


def test_kiln_data_cli(tmp_path, capsys):
    from kiln.cli.data import main

    write_corpus(tmp_path / "in")
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out"), "--val-fraction", "0"]) == 0
    out = capsys.readouterr().out
    assert "train:" in out and "kiln-train data.path=" in out
    manifest = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert manifest["tokenizer"] == {"type": "byte", "vocab_size": 257, "eos_id": 256}
    assert manifest["totals"]["train"]["documents"] == 4
    assert main([str(tmp_path / "in"), "--out", str(tmp_path / "out")]) == 2  # never overwrites
    assert "already holds a dataset" in capsys.readouterr().err
