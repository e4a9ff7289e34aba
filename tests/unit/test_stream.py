"""The training stream: exact resumption, mixtures, data-identity checks, bad shards, and the
kinds of sources (directory, brace pattern, http, pipe:)."""

import http.server
import io
import tarfile
import threading
from functools import partial

import numpy as np
import pytest
import torch

from conftest import stdlib_files
from kiln.data.build import build_shards
from kiln.data.manifest import load_manifest
from kiln.data.plan import plan_data
from kiln.data.sources import fingerprint, resolve_source
from kiln.data.stream import ResumableLoader, StreamSpec
from kiln.data.tokenizer import ByteTokenizer
from kiln.errors import ConfigError, DataError


def spec_for(*dirs, weights=None, seq_len=32, batch=4, window=8, on_error="raise", seed=5, eos=256):
    sources = [resolve_source(str(d)) for d in dirs]
    for s, w in zip(sources, weights or [1.0] * len(sources)):
        s.weight = w
    return StreamSpec(sources=tuple(s.to_stream() for s in sources), seq_len=seq_len, batch_size=batch,
                      eos_id=eos, seed=seed, shuffle_window=window, on_error=on_error,
                      fingerprint=fingerprint(sources))


@pytest.fixture(scope="module")
def shards8(tmp_path_factory):
    """8 shards of ~3-12 documents each, small enough to cross shard boundaries often."""
    out = tmp_path_factory.mktemp("s8") / "d"
    build_shards([str(p) for p in stdlib_files(24)], out, ByteTokenizer(), val_fraction=0.0,
                 shard_tokens=40_000, shuffle=False)
    m = load_manifest(out)
    assert len(m.splits["train"]) >= 8, len(m.splits["train"])
    return out


def take(loader, n):
    return [next(loader) for _ in range(n)]


def same(a, b):
    return len(a) == len(b) and all(torch.equal(x[0], y[0]) and torch.equal(x[1], y[1]) for x, y in zip(a, b))


@pytest.fixture(scope="module")
def aligned(tmp_path_factory):
    """Shards of exactly 2 documents of 31 tokens: with seq_len 63 every block (64 tokens with
    the two eos) ends exactly at a shard boundary."""
    import json
    import random

    root = tmp_path_factory.mktemp("aligned")
    rng = random.Random(0)
    lines = ["".join(rng.choice("abcdefghij") for _ in range(31)) for _ in range(48)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": t}) for t in lines) + "\n")
    build_shards([str(root / "docs.jsonl")], root / "d", ByteTokenizer(), val_fraction=0.0, shard_tokens=62)
    m = load_manifest(root / "d")
    assert all(s.documents == 2 for s in m.splits["train"]) and len(m.splits["train"]) == 24
    return root / "d"


def check_resume(spec, rank, num_workers, total, ks):
    """Interrupt after k batches, resume from the saved state, compare with no interruption.
    Returns the cursors (per reader) the resumed loaders started from."""
    full = take(ResumableLoader(spec, rank=rank, world=2, num_workers=num_workers), total)
    cursors = []
    for k in ks:
        first = ResumableLoader(spec, rank=rank, world=2, num_workers=num_workers)
        take(first, k)
        state = first.state_dict()
        cursors += [slot for r in state["readers"].values()
                    for slot in r["window_start"]["sources"][0]["cursor"]["slots"]]
        resumed = ResumableLoader(spec, rank=rank, world=2, num_workers=num_workers, state=state)
        assert same(take(resumed, total - k), full[k:]), f"rank {rank} resumed after {k} batches differs"
    return cursors


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_shard_reproduces_uninterrupted_batches(shards8, num_workers):
    spec = spec_for(shards8, seq_len=256, batch=4, window=8)
    for rank in (0, 1):
        cursors = check_resume(spec, rank, num_workers, total=60, ks=(3, 29, 52))
        m = load_manifest(shards8)
        docs = {str(shards8 / s.file): s.documents for s in m.splits["train"]}
        # Interrupted inside shards: documents of the current shard were taken, others remain.
        assert any(0 < c["offset"] for c in cursors)
        assert all(c["offset"] <= max(docs.values()) for c in cursors)


@pytest.mark.timeout(240)
@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_at_shard_boundary_reproduces_uninterrupted_batches(aligned, num_workers):
    spec = spec_for(aligned, seq_len=63, batch=1, window=1)
    for rank in (0, 1):
        cursors = check_resume(spec, rank, num_workers, total=20, ks=(5, 9, 13))
        # Every interruption fell exactly at the end of a shard (both its documents taken).
        assert cursors and all(c["offset"] == 2 for c in cursors), cursors


def split_docs(tokens, eos=256):
    docs, cur = [], []
    for t in tokens:
        cur.append(t)
        if t == eos:
            docs.append(tuple(cur))
            cur = []
    return docs


@pytest.fixture(scope="module")
def bpe_shards(tmp_path_factory):
    """The same kind of corpus, prepared with a BPE tokenizer trained here on it."""
    from kiln.data.build import train_bpe_on_inputs

    inputs = [str(p) for p in stdlib_files(24)]
    tok = train_bpe_on_inputs(inputs, vocab_size=1024)
    out = tmp_path_factory.mktemp("bpe") / "d"
    build_shards(inputs, out, tok, val_fraction=0.0, shard_tokens=12_000)
    assert len(load_manifest(out).splits["train"]) >= 8
    return out


@pytest.mark.timeout(120)
@pytest.mark.parametrize("dataset", ["shards8", "bpe_shards"])
def test_every_token_accounted_for_across_2_ranks_x_2_workers(dataset, request):
    """2 ranks x 2 DataLoader workers: each reader's first pass is exactly the documents of its
    own shards, and together the readers return every document once: none repeated, none lost."""
    from kiln.data.plan import load_source_tokenizer
    from kiln.data.stream import assign_shards, read_documents

    shards8 = request.getfixturevalue(dataset)
    m = load_manifest(shards8)
    eos = load_source_tokenizer(resolve_source(str(shards8)), "/nonexistent").eos_id
    urls, dtype = m.urls("train"), np.dtype(m.token_dtype)
    all_docs = [tuple(d.tolist()) + (eos,) for u in urls for d in read_documents(u, dtype)]
    assert len(set(all_docs)) == len(all_docs), "test data should have distinct documents"
    spec = spec_for(shards8, seq_len=63, batch=16, window=1, eos=eos)
    seen = []
    for rank in (0, 1):
        loader = ResumableLoader(spec, rank=rank, world=2, num_workers=2)
        want = {role: sum(s.tokens + s.documents for s in m.splits["train"]
                          if str(shards8 / s.file) in assign_shards(urls, rank, 2, role, 2))
                for role in (0, 1)}
        got = {0: [], 1: []}
        while any(len(got[r]) < want[r] for r in got):
            x, y = next(loader)
            role = (loader.next_role - 1) % 2
            got[role].extend(torch.cat([x, y[:, -1:]], dim=1).reshape(-1).tolist())
        for role in got:
            seen += split_docs(got[role][: want[role]], eos)
    assert sorted(seen) == sorted(all_docs)


def test_mixture_is_within_tolerance_of_weights(tmp_path):
    a = build_shards([str(p) for p in stdlib_files(12)], tmp_path / "a", ByteTokenizer(), val_fraction=0.0,
                     shard_tokens=50_000).root
    b = build_shards([str(p) for p in stdlib_files(30)[12:]], tmp_path / "b", ByteTokenizer(),
                     val_fraction=0.0, shard_tokens=50_000).root
    spec = spec_for(a, b, weights=[0.7, 0.3], seq_len=64, batch=8, window=16)
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    take(loader, 400)  # 3200 blocks
    counts = loader.stats()["source_blocks"]
    share = counts[0] / sum(counts)
    assert sum(counts) == 3200
    assert abs(share - 0.7) < 0.03, counts


def test_mixture_config_resolves_and_checks(tmp_path, compose):
    a = build_shards([str(p) for p in stdlib_files(6)], tmp_path / "a", ByteTokenizer()).root
    cfg = compose([f"data.mixture=[{{path: {a}, weight: 2}}, {{path: {a}, weight: 1, name: again}}]"])
    plan = plan_data(cfg)
    assert [s["weight"] for s in plan.spec.sources] == [2.0, 1.0]
    bad = compose([f"data.mixture=[{{path: {a}, weight: 0}}]"])
    with pytest.raises(ConfigError, match=r"data.mixture\[0\].weight"):
        plan_data(bad)
    both = compose([f"data.path={a}", f"data.mixture=[{{path: {a}}}]"])
    with pytest.raises(ConfigError, match="data.mixture"):
        plan_data(both)


def test_resume_against_different_data_raises(shards8, tmp_path):
    spec = spec_for(shards8)
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    take(loader, 3)
    state = loader.state_dict()
    other = build_shards([str(p) for p in stdlib_files(5)], tmp_path / "other", ByteTokenizer(),
                         val_fraction=0.0).root
    with pytest.raises(DataError, match="data changed since the checkpoint.*resume_stream=false"):
        ResumableLoader(spec_for(other), rank=0, world=1, num_workers=0, state=state)


def test_resume_with_other_reader_layout_raises(shards8):
    spec = spec_for(shards8)
    loader = ResumableLoader(spec, rank=0, world=2, num_workers=0)
    take(loader, 2)
    state = loader.state_dict()
    with pytest.raises(DataError, match=r"saved with 2 rank\(s\) x 0 .*launcher.num_workers=2 data.num_workers=0"):
        ResumableLoader(spec, rank=0, world=4, num_workers=0, state=state)
    with pytest.raises(DataError, match="batch_size=4"):
        ResumableLoader(spec_for(shards8, batch=8), rank=0, world=2, num_workers=0, state=state)


def truncated_copy(src_dir, dst_dir, victim: int):
    """A copy of a dataset with one shard cut in half (as a failed upload would leave it)."""
    import shutil

    shutil.copytree(src_dir, dst_dir)
    m = load_manifest(dst_dir)
    path = dst_dir / m.splits["train"][victim].file
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2 + 100])
    return path


@pytest.mark.timeout(120)
def test_truncated_shard_raise_names_the_shard(shards8, tmp_path):
    bad = truncated_copy(shards8, tmp_path / "t", victim=0)
    spec = spec_for(tmp_path / "t", window=1)
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    with pytest.raises(DataError) as e:
        take(loader, 400)
    assert str(bad) in str(e.value) and "data.on_error=skip" in str(e.value)


@pytest.mark.timeout(120)
def test_truncated_shard_skip_counts_and_continues(shards8, tmp_path):
    truncated_copy(shards8, tmp_path / "t", victim=0)
    spec = spec_for(tmp_path / "t", window=1, on_error="skip")
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    with pytest.warns(UserWarning, match="skipping bad data in shard"):
        take(loader, 400)  # several passes over all 8 shards
    assert loader.stats()["skipped_shards"] >= 1


def test_undecodable_sample_is_skipped_or_raises(tmp_path):
    d = tmp_path / "odd"
    build_shards([str(p) for p in stdlib_files(3)], d, ByteTokenizer(), val_fraction=0.0)
    m = load_manifest(d)
    shard = d / m.splits["train"][0].file
    with tarfile.open(shard, "a") as tar:  # append a sample whose payload has an odd byte count
        info = tarfile.TarInfo("zzz.tokens.u16")
        info.size = 3
        tar.addfile(info, io.BytesIO(b"abc"))
    with pytest.raises(DataError, match="zzz"):
        take(ResumableLoader(spec_for(d, window=1), rank=0, world=1, num_workers=0), 200)
    loader = ResumableLoader(spec_for(d, window=1, on_error="skip"), rank=0, world=1, num_workers=0)
    with pytest.warns(UserWarning):
        take(loader, 200)
    assert loader.stats()["skipped_samples"] >= 1


def test_brace_pattern_source(shards8):
    m = load_manifest(shards8)
    pattern = f"{shards8}/train-{{000000..000003}}.tar"
    src = resolve_source(pattern)
    assert src.train == m.urls("train")[:4]
    assert src.val == m.urls("val")
    with pytest.raises(DataError, match="not a training shard listed"):
        resolve_source(f"{shards8}/train-{{000000..009999}}.tar")


def all_shards(d, scheme=""):
    n = len(load_manifest(d).splits["train"])
    return f"{scheme}train-{{000000..{n - 1:06d}}}.tar"


def test_pipe_source_reads_like_local(shards8):
    local = ResumableLoader(spec_for(shards8, window=1), rank=0, world=1, num_workers=0)
    src = resolve_source(f"pipe:cat {shards8}/{all_shards(shards8)}", manifest=str(shards8 / "manifest.json"))
    spec = StreamSpec(sources=(src.to_stream(),), seq_len=32, batch_size=4, eos_id=256, seed=5, shuffle_window=1,
                      fingerprint=fingerprint([src]))
    remote = ResumableLoader(spec, rank=0, world=1, num_workers=0)
    assert same(take(local, 30), take(remote, 30))
    with pytest.raises(ConfigError, match="manifest"):
        resolve_source(f"pipe:cat {shards8}/train-000000.tar")


@pytest.mark.timeout(60)
def test_http_source_from_a_local_server(shards8):
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(shards8))
    handler.log_message = lambda *a, **k: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        url = f"http://127.0.0.1:{server.server_port}/{all_shards(shards8)}"
        src = resolve_source(url)
        assert src.train[0].startswith("http://127.0.0.1")
        spec = StreamSpec(sources=(src.to_stream(),), seq_len=32, batch_size=4, eos_id=256, seed=5,
                          shuffle_window=1, fingerprint=fingerprint([src]))
        remote = take(ResumableLoader(spec, rank=0, world=1, num_workers=0), 30)
        local = take(ResumableLoader(spec_for(shards8, window=1), rank=0, world=1, num_workers=0), 30)
        assert same(local, remote)
        assert fingerprint([src]) == spec_for(shards8).fingerprint
    finally:
        server.shutdown()
