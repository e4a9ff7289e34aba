"""Sampling quality: kiln-data shuffles documents (seeded, deterministic, for any --workers, in
buckets larger corpora spill to), and the training stream mixes widely even over shards written
in input order, while staying exactly resumable with a state that does not grow with the window."""

import json
import re

import numpy as np
import pytest
import torch

import kiln.data.build as build_mod
from conftest import stdlib_files
from kiln.cli.data import main as kiln_data
from kiln.config.schema import DataConfig
from kiln.data.build import build_dataset
from kiln.data.manifest import load_manifest
from kiln.data.reader import ShardCursor
from kiln.data.sources import fingerprint, resolve_source
from kiln.data.stream import ResumableLoader, StreamSpec, assign_shards, read_documents
from kiln.data.tokenizer import ByteTokenizer
from kiln.errors import ConfigError


def docs_of(root, split="train"):
    m = load_manifest(root)
    return [tuple(d.tolist()) for u in m.urls(split) for d in read_documents(u, np.dtype(m.token_dtype))]


def tree_bytes(root):
    return {p.name: p.read_bytes() for p in sorted(root.iterdir())}


@pytest.fixture(scope="module")
def inputs():
    return [str(p) for p in stdlib_files(40)]


def build(inputs, out, **kw):
    kw.setdefault("val_fraction", 0.1)
    kw.setdefault("shard_size", "30k")
    return build_dataset(inputs, out, ByteTokenizer(), **kw).manifest


# ------------------------------------------------------------------------------------ kiln-data


def test_shuffle_is_a_seeded_permutation_of_the_input_order(tmp_path, inputs):
    ordered = build(inputs, tmp_path / "ordered", shuffle=False)
    a = build(inputs, tmp_path / "a", seed=0)
    b = build(inputs, tmp_path / "b", seed=0)
    c = build(inputs, tmp_path / "c", seed=1)
    for split in ("train", "val"):
        assert sorted(docs_of(a.root, split)) == sorted(docs_of(ordered.root, split)), split
    assert docs_of(ordered.root) != docs_of(a.root), "the default build kept input order"
    assert tree_bytes(a.root) == tree_bytes(b.root), "the same seed must give byte-identical output"
    assert docs_of(c.root) != docs_of(a.root), "another seed must give another order"
    # --no-shuffle is the input order itself: keys (input positions) increase
    train = b"".join((ordered.root / s.file).read_bytes() for s in ordered.splits["train"])
    keys = [int(k) for k in re.findall(rb"(\d{9})\.tokens", train)]
    assert keys == sorted(keys)
    assert a.build["shuffle"] is True and a.build["seed"] == 0 and ordered.build["shuffle"] is False
    assert json.loads((a.root / "manifest.json").read_text())["build"]["seed"] == 0


def test_shuffle_spreads_documents_over_the_output(tmp_path):
    """The first shard of a shuffled build holds documents from all over the input."""
    (tmp_path / "docs.jsonl").write_text("".join(json.dumps({"text": f"document {i} " * 20}) + "\n"
                                                 for i in range(1000)))
    m = build([str(tmp_path / "docs.jsonl")], tmp_path / "d", val_fraction=0.0, shard_size="20k")
    assert len(m.splits["train"]) >= 10
    first = sorted(int(k) for k in re.findall(rb"(\d{9})\.tokens", (m.root / m.splits["train"][0].file).read_bytes()))
    assert first[0] < 200 and first[-1] > 800, first


def test_bucketed_shuffle_of_a_larger_than_memory_corpus_is_identical_for_any_workers(tmp_path, inputs,
                                                                                       monkeypatch):
    """Buckets small enough that the corpus spills to several: still every document once, the
    same bytes for 1 and 3 tokenizing processes, and no spill files left behind."""
    monkeypatch.setattr(build_mod, "SHUFFLE_BUCKET_BYTES", 64 << 10)
    total = sum(p.stat().st_size for p in stdlib_files(40))
    assert build_mod.shuffle_buckets(total, None, 2) >= 8
    w1 = build(inputs, tmp_path / "w1", workers=1)
    w3 = build(inputs, tmp_path / "w3", workers=3)
    ordered = build(inputs, tmp_path / "ordered", shuffle=False)
    assert tree_bytes(w1.root) == tree_bytes(w3.root)
    assert sorted(docs_of(w1.root)) == sorted(docs_of(ordered.root))
    assert not (w1.root / ".shuffle-tmp").exists()


def test_cli_no_shuffle_and_seed(tmp_path, inputs, capsys):
    assert kiln_data([*inputs[:10], "--out", str(tmp_path / "o"), "--no-shuffle", "--workers", "1"]) == 0
    assert "input order (--no-shuffle)" in capsys.readouterr().out
    assert kiln_data([*inputs[:10], "--out", str(tmp_path / "s"), "--seed", "7", "--workers", "1"]) == 0
    assert "shuffled (seed 7)" in capsys.readouterr().out
    assert load_manifest(tmp_path / "s").build["seed"] == 7


def test_failed_shuffled_build_leaves_nothing(tmp_path, inputs, monkeypatch):
    def boom(self, writer):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod._SpillShuffle, "drain", boom)
    with pytest.raises(KeyboardInterrupt):
        build(inputs[:10], tmp_path / "d")
    assert list((tmp_path / "d").iterdir()) == []


# ------------------------------------------------------------------------------------ the stream


@pytest.fixture(scope="module")
def marked(tmp_path_factory):
    """An ordered corpus whose blocks say where they came from: 1,200 documents
    'd00042 d00042 ...' (629 bytes each) in input order, 12 per shard (100 shards)."""
    root = tmp_path_factory.mktemp("marked")
    lines = [json.dumps({"text": " ".join([f"d{i:05d}"] * 90)}) for i in range(1200)]
    (root / "docs.jsonl").write_text("\n".join(lines) + "\n")
    m = build_dataset([str(root / "docs.jsonl")], root / "d", ByteTokenizer(), val_fraction=0.0,
                      shard_size=f"{12 * 629}tok", shuffle=False).manifest
    assert len(m.splits["train"]) == 100
    return root / "d"


def spec_for(root, *, seq_len=63, batch=8, shuffle_documents=False, **kw):
    src = resolve_source(str(root))
    return StreamSpec(sources=(src.to_stream(shuffle_documents),), seq_len=seq_len, batch_size=batch, eos_id=256, seed=5,
                      fingerprint=fingerprint([src]), **kw)


def defaults() -> dict:
    d = DataConfig()
    return {"shuffle_window": d.shuffle_buffer, "open_shards": d.open_shards, "open_documents": d.open_documents,
            "shuffle_documents": d.shuffle_documents}


def early_documents(loader, batches: int) -> list[int]:
    ids = []
    for _ in range(batches):
        x, _ = next(loader)
        for row in x:
            ids += [int(m) for m in re.findall(rb"d(\d{5})", bytes(t for t in row.tolist() if t < 256))]
    return ids


def test_early_batches_of_an_ordered_corpus_draw_from_all_over_it(marked):
    """With kiln's defaults, the first 16 batches (128 blocks, ~1/10 of the corpus) come from many
    shards spread over the whole corpus. The old stream (one shard at a time, a 256-block window)
    drew them from a few neighbouring shards."""
    def spread(**kw):
        docs = early_documents(ResumableLoader(spec_for(marked, **kw), rank=0, world=1, num_workers=0), 16)
        shards = {d // 12 for d in docs}
        return len(shards), max(shards) - min(shards), len(set(docs))

    shards, span, docs = spread(**defaults())
    assert shards >= 30 and span >= 80 and docs >= 100, (shards, span, docs)
    old_shards, _, _ = spread(shuffle_window=256, open_shards=1)
    assert old_shards <= 4, old_shards


def test_documents_longer_than_the_window_are_packed_many_at_once(tmp_path):
    """40 documents of ~25k tokens each (books, long code files): a 4,096-block window of 64-token
    blocks spans about 10 of them. Packed from 64 documents at once, the first 128 blocks still
    come from most of the corpus; packed one document at a time, from about a window's worth."""
    lines = [json.dumps({"text": " ".join([f"d{i:05d}"] * 3600)}) for i in range(40)]
    (tmp_path / "long.jsonl").write_text("\n".join(lines) + "\n")
    build_dataset([str(tmp_path / "long.jsonl")], tmp_path / "d", ByteTokenizer(), val_fraction=0.0,
                  shard_size="50k", shuffle=False)
    d = defaults()

    def documents(open_documents):
        spec = spec_for(tmp_path / "d", **dict(d, open_documents=open_documents))
        return len(set(early_documents(ResumableLoader(spec, rank=0, world=1, num_workers=0), 16)))

    assert d["open_documents"] >= 40 and documents(d["open_documents"]) >= 30
    assert documents(1) <= 16


@pytest.mark.parametrize("open_shards,open_documents,shuffle_documents",
                         [(1, 1, False), (3, 1, False), (64, 1, False), (3, 7, False), (1, 1, True), (3, 7, True)])
def test_every_document_once_per_pass_with_several_shards_open(marked, open_shards, open_documents,
                                                               shuffle_documents):
    """2 ranks: each reader's first pass is exactly the documents of its own shards, once each,
    however many it reads at once, and the second pass is the same documents in another order
    (the shards are read exactly so; packing several documents at once emits a document a little
    after its read)."""
    m = load_manifest(marked)
    urls = m.urls("train")
    for rank in (0, 1):
        mine = assign_shards(urls, rank, 2, 0, 1)
        want = sorted(int(k) for u in mine for k in re.findall(rb"(\d{9})\.tokens", open(u, "rb").read()))
        spec = spec_for(marked, batch=1, seq_len=629, shuffle_window=1, open_shards=open_shards,
                        open_documents=open_documents, shuffle_documents=shuffle_documents)
        loader = ResumableLoader(spec, rank=rank, world=2, num_workers=0)
        passes = []
        for _ in range(2):
            got = []
            for _ in range(len(want)):  # 629 + 1 tokens: exactly one document and its eos
                x, y = next(loader)
                tokens = torch.cat([x[0], y[0, -1:]]).tolist()
                assert tokens[-1] == 256
                got.append(int(re.match(rb"d(\d{5})", bytes(tokens[:6])).group(1)))
            passes.append(got)
        # Packing from D documents at once holds at most D read but not yet emitted: no repeat
        # before block n - D, each document of the pass emitted within two passes' blocks.
        held = min(open_documents, len(want))
        first = passes[0][:len(want) - held]
        assert len(set(first)) == len(first) and set(first) <= set(want)
        both = passes[0] + passes[1]
        assert set(both) == set(want)
        assert all(both.count(d) <= (2 if held == 1 else 3) for d in want)
        if held == 1:
            assert sorted(passes[0]) == want and sorted(passes[1]) == want
        cursor = ShardCursor(mine, np.dtype("<u2"), 5, rank, 0, open_shards=open_shards,
                             expected={u: 12 for u in mine}, shuffle_documents=shuffle_documents)
        read = [int(re.match(rb"d(\d{5})", bytes(cursor.next_doc()[:6].tolist())).group(1))
                for _ in range(2 * len(want))]
        assert sorted(read[:len(want)]) == want and sorted(read[len(want):]) == want  # once per pass
        assert passes[0] != passes[1]
        if shuffle_documents:  # each shard's documents out of their stored (increasing) order
            runs = [[d for d in passes[0] if d // 12 == s] for s in {d // 12 for d in passes[0]}]
            assert sum(r != sorted(r) for r in runs) > len(runs) / 2
        if open_shards > 1:  # merged: consecutive documents hop between shards
            hops = sum(a // 12 != b // 12 for a, b in zip(passes[0], passes[0][1:]))
            assert hops > len(want) / 3, hops


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_with_defaults_is_exact_token_for_token(marked, num_workers):
    spec = spec_for(marked, seq_len=100, batch=4, **defaults())
    full = [next(ResumableLoader(spec, rank=1, world=2, num_workers=num_workers)) for _ in range(1)]
    loader = ResumableLoader(spec, rank=1, world=2, num_workers=num_workers)
    full = [next(loader) for _ in range(120)]
    loader.close()
    for k in (1, 37, 90):
        first = ResumableLoader(spec, rank=1, world=2, num_workers=num_workers)
        for _ in range(k):
            next(first)
        state = first.state_dict()
        first.close()
        resumed = ResumableLoader(spec, rank=1, world=2, num_workers=num_workers, state=state)
        rest = [next(resumed) for _ in range(120 - k)]
        resumed.close()
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(rest, full[k:])), k


def test_resume_state_stays_small_whatever_the_window(marked):
    """The saved position is a few integers per open shard: it does not hold buffered tokens."""
    sizes = {}
    for window in (1, 256, 4096):
        loader = ResumableLoader(spec_for(marked, shuffle_window=window, open_shards=16), rank=0, world=1,
                                 num_workers=0)
        for _ in range(40):
            next(loader)
        sizes[window] = len(json.dumps(loader.state_dict()))
    assert max(sizes.values()) < 4096 and max(sizes.values()) - min(sizes.values()) < 256, sizes


def test_version_1_stream_state_still_resumes(marked):
    """A checkpoint written before shards were read several at a time resumes exactly when run
    with its settings (one shard open), and is refused, naming the key, with the new defaults."""
    from kiln.errors import DataError

    spec = spec_for(marked, shuffle_window=8, open_shards=1)
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    for _ in range(7):
        next(loader)
    state = loader.state_dict()
    want = [next(loader) for _ in range(5)]
    old = json.loads(json.dumps(state))
    old["version"] = 1
    old.pop("open_shards"), old.pop("open_documents")
    shards = list(spec.sources[0]["shards"])
    for reader in old["readers"].values():
        for src in reader["window_start"]["sources"]:
            c = src["cursor"]
            (slot,) = c.pop("slots")
            c.pop("draws"), c.pop("last")
            c.update(index=slot["index"], offset=slot["offset"])
            (lane,) = src.pop("lanes")  # version 1: the carry-over's length instead of a lane
            src.pop("drawn")
            if lane is None:
                src["carry_len"] = 0
            else:
                cursor = ShardCursor(shards, np.dtype("<u2"), spec.seed, 0, 0)
                (doc,) = cursor.read_addresses([lane[:4]])
                src["carry_len"] = len(doc) + 1 - lane[4]
    resumed = ResumableLoader(spec, rank=0, world=1, num_workers=0, state=old)
    assert all(torch.equal(a[0], b[0]) for a, b in zip([next(resumed) for _ in range(5)], want))
    with pytest.raises(DataError, match="data.open_shards=1"):
        ResumableLoader(spec_for(marked, shuffle_window=8, open_shards=16), rank=0, world=1, num_workers=0,
                        state=old)


def test_mixture_keeps_its_weights_with_several_shards_open(marked, tmp_path, inputs):
    other = build(inputs, tmp_path / "other", val_fraction=0.0, shard_size="5k")
    sources = [resolve_source(str(marked)), resolve_source(str(other.root))]
    sources[0].weight, sources[1].weight = 0.8, 0.2
    spec = StreamSpec(sources=tuple(s.to_stream() for s in sources), seq_len=63, batch_size=8, eos_id=256,
                      seed=1, shuffle_window=64, open_shards=8, fingerprint=fingerprint(sources))
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    for _ in range(250):
        next(loader)
    a, b = loader.stats()["source_blocks"]
    assert abs(a / (a + b) - 0.8) < 0.03, (a, b)


@pytest.mark.parametrize("key,value", [("data.open_shards", 0), ("data.shuffle_buffer", -1)])
def test_sampling_settings_are_checked_before_launch(compose, key, value):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        compose([f"{key}={value}"]).check()


# ------------------------------------------------------------- documents out of their stored order


def shard_docs(cursor, n):
    return [int(re.match(rb"d(\d{5})", bytes(cursor.next_doc()[:6].tolist())).group(1)) for _ in range(n)]


def test_document_index_finds_what_the_sequential_reader_reads(marked, tmp_path, inputs):
    from kiln.data.reader import document_index, indexed_documents

    other = build(inputs, tmp_path / "other", val_fraction=0.0, shard_size="20k")
    for url, dtype in [(load_manifest(marked).urls("train")[3], np.dtype("<u2")),
                       (other.urls("train")[0], np.dtype(other.token_dtype))]:
        index = document_index(url, dtype.itemsize)
        docs = [d.tolist() for d in read_documents(url, dtype)]
        assert index is not None and len(index) == len(docs) > 1
        assert [d.tolist() for d in indexed_documents(url, index, range(len(index)), dtype)] == docs
        assert index[:, 1].sum() == sum(len(d) for d in docs) * dtype.itemsize
    # What it cannot lay out is read in stored order (where its problems are reported)
    url = load_manifest(marked).urls("train")[0]
    raw = open(url, "rb").read()
    cut = tmp_path / "cut.tar"
    cut.write_bytes(raw[:len(raw) // 2])
    assert document_index(str(cut), 2) is None
    import gzip
    (tmp_path / "z.tar").write_bytes(gzip.compress(raw))  # a compressed shard (webdataset reads it)
    assert document_index(str(tmp_path / "z.tar"), 2) is None
    assert document_index(f"pipe:cat {url}", 2) is None
    assert document_index(url, 2, expected=13) is None  # fewer documents than the manifest lists


def test_a_shards_documents_come_in_a_seeded_order_per_pass(marked):
    """One shard of 12 documents in input order: with shuffle_documents each pass reads all 12 in
    a new order, the same for the same seed, another for another seed; without, in stored order."""
    url = load_manifest(marked).urls("train")[7]
    first = 7 * 12

    def cursor(seed, shuffle=True):
        return ShardCursor([url], np.dtype("<u2"), seed, 0, 0, expected={url: 12}, shuffle_documents=shuffle)

    stored = list(range(first, first + 12))
    assert shard_docs(cursor(1, shuffle=False), 12) == stored
    a = shard_docs(cursor(1), 36)
    assert all(sorted(a[i:i + 12]) == stored for i in (0, 12, 24)), "every document once per pass"
    assert stored not in (a[0:12], a[12:24], a[24:36]) and a[0:12] != a[12:24]
    assert shard_docs(cursor(1), 36) == a and shard_docs(cursor(2), 12) != a[:12]


def test_resume_mid_pass_with_shuffled_documents_is_exact(marked):
    """The saved position is still (pass, slot, shard, documents taken): resuming re-derives the
    pass's order and the open lanes' documents, and reads on exactly."""
    spec = spec_for(marked, seq_len=50, batch=2, shuffle_window=16, open_shards=3, open_documents=5,
                    shuffle_documents=True)
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    full = [next(loader)[0] for _ in range(900)]  # past a pass (1,200 documents of ~13 blocks / 2)
    for k in (3, 451, 777):
        first = ResumableLoader(spec, rank=0, world=1, num_workers=0)
        for _ in range(k):
            next(first)
        resumed = ResumableLoader(spec, rank=0, world=1, num_workers=0, state=first.state_dict())
        assert all(torch.equal(next(resumed)[0], want) for want in full[k:k + 60]), k


def test_version_2_stream_state_resumes_in_stored_order(marked):
    """A state saved before shuffle_documents resumes exactly with data.shuffle_documents=false, and
    the new default refuses it, naming the key."""
    from kiln.errors import DataError

    old_spec = spec_for(marked, shuffle_window=8, open_shards=4, open_documents=3)
    loader = ResumableLoader(old_spec, rank=0, world=1, num_workers=0)
    for _ in range(9):
        next(loader)
    state = json.loads(json.dumps(loader.state_dict()))
    want = [next(loader)[0] for _ in range(5)]
    state["version"] = 2
    state.pop("shuffle_documents")
    resumed = ResumableLoader(old_spec, rank=0, world=1, num_workers=0, state=state)
    assert all(torch.equal(next(resumed)[0], w) for w in want)
    with pytest.raises(DataError, match="data.shuffle_documents=false"):
        ResumableLoader(spec_for(marked, shuffle_window=8, open_shards=4, open_documents=3, shuffle_documents=True),
                        rank=0, world=1, num_workers=0, state=state)


def test_documents_are_reordered_only_where_kiln_data_did_not_shuffle(marked, tmp_path, inputs):
    """data.shuffle_documents=null (the default): a --no-shuffle source (or one whose manifest does not
    say) is read in a seeded order per pass; a kiln-data-shuffled one in its stored (random) order;
    true/false force it either way."""
    shuffled = build(inputs, tmp_path / "shuffled", val_fraction=0.0, shard_size="20k")
    a, b = resolve_source(str(marked)), resolve_source(str(shuffled.root))
    assert (a.shuffled, b.shuffled) == (False, True)
    assert a.to_stream()["shuffle_documents"] and not b.to_stream()["shuffle_documents"]
    assert b.to_stream(True)["shuffle_documents"] and not a.to_stream(False)["shuffle_documents"]
    assert DataConfig().shuffle_documents is None
