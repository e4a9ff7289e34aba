"""The evaluation set: which validation shards each rank reads, and validation shards for every
kind of source (pipe: commands included)."""

import shutil

import numpy as np
import pytest
import torch

from conftest import stdlib_files
from kiln.config.schema import TrainConfig
from kiln.data.build import build_shards
from kiln.data.manifest import load_manifest
from kiln.data.tokenizer import ByteTokenizer
from kiln.errors import ConfigError

KW = dict(seq_len=32, batch_size=4, num_batches=3, eos_id=256)


@pytest.fixture(scope="module")
def many_val_shards(tmp_path_factory):
    out = tmp_path_factory.mktemp("val4")
    m = build_shards([str(p) for p in stdlib_files(40)], out, ByteTokenizer(), val_fraction=0.3, shard_tokens=20_000)
    assert len(m.urls("val")) >= 4, m.urls("val")
    return m


def reading(monkeypatch):
    import kiln.data.validation as validation

    opened: list[str] = []
    real = validation.read_documents

    def counting(url, *a, **kw):
        opened.append(url)
        return real(url, *a, **kw)

    monkeypatch.setattr(validation, "read_documents", counting)
    return opened


def blocks_of(batches) -> list[tuple]:
    return [tuple(torch.cat([x, y[:, -1:]], 1)[i].tolist()) for x, y in batches for i in range(len(x))]


def test_each_rank_reads_only_its_own_validation_shards(many_val_shards, monkeypatch):
    """With at least as many validation shards as ranks, rank r opens shards r, r+world, ...:
    its reading does not grow with the number of ranks, and ranks never share a block."""
    from kiln.data.validation import val_batches

    urls = many_val_shards.urls("val")
    world = 4
    per_rank = []
    for rank in range(world):
        opened = reading(monkeypatch)
        batches = list(val_batches(urls, rank=rank, world=world, dtype=many_val_shards.token_dtype, **KW))
        assert len(batches) == 3 and all(x.shape == (4, 32) for x, _ in batches)
        assert set(opened) <= set(urls[rank::world]), (rank, opened)
        per_rank.append(blocks_of(batches))
        again = list(val_batches(urls, rank=rank, world=world, dtype=many_val_shards.token_dtype, **KW))
        assert blocks_of(again) == per_rank[-1]  # the same set at every call
    for a in range(world):
        for b in range(a + 1, world):
            assert not set(per_rank[a]) & set(per_rank[b])


def test_fewer_shards_than_ranks_each_rank_reads_its_own_slice_of_documents(small_dataset, monkeypatch):
    """One local validation shard, 2 ranks: rank r reads only the r-th half of its documents (laid
    out from the tar headers), in order; remote (streamed) shards fall back to block i -> rank
    i % world. Either way the ranks' blocks are disjoint."""
    import kiln.data.validation as validation
    from kiln.data.reader import read_documents
    from kiln.data.validation import pack, val_batches

    m = load_manifest(small_dataset)
    (url,) = m.urls("val")
    docs = list(read_documents(url, np.dtype(m.token_dtype)))
    read: list[int] = []
    real = validation.indexed_documents

    def counting(u, index, positions, dtype):
        read.extend(positions)
        return real(u, index, positions, dtype)

    monkeypatch.setattr(validation, "indexed_documents", counting)
    kw = dict(KW, num_batches=1)
    ranks = []
    for r, (lo, hi) in enumerate([(0, len(docs) // 2), (len(docs) // 2, len(docs))]):
        read.clear()
        ranks.append(blocks_of(val_batches([url], rank=r, world=2, dtype=m.token_dtype, **kw)))
        assert read and min(read) >= lo and max(read) < hi, (r, lo, hi, min(read), max(read))
        want = [tuple(b.tolist()) for b, _ in zip(pack(iter(docs[lo:hi]), 33, 256), range(4))]
        assert ranks[-1] == want
    assert not set(ranks[0]) & set(ranks[1])
    whole = blocks_of(val_batches([url], rank=0, world=1, dtype=m.token_dtype, **dict(KW, num_batches=6)))
    streamed = [blocks_of(val_batches([f"pipe:cat {url}"], rank=r, world=2, dtype=m.token_dtype, **KW))
                for r in (0, 1)]
    assert streamed[0] == whole[0::2][:12] and streamed[1] == whole[1::2][:12]


def pipe_config(compose, root, manifest_name="manifest.json") -> TrainConfig:
    """data.path as a pipe: command per shard (how WebDataset reads S3/GCS), here a plain `cat`."""
    n = len(load_manifest(root).urls("train"))
    cfg = compose([])
    cfg.data.path = f"pipe:cat {root}/train-{{000000..{n - 1:06d}}}.tar"
    cfg.data.manifest = f"pipe:cat {root}/{manifest_name}"
    return cfg


def test_pipe_source_evaluates_on_its_validation_shards(small_dataset, compose):
    from kiln.data.plan import plan_data
    from kiln.data.validation import val_batches

    plan = plan_data(pipe_config(compose, small_dataset), check_open=True)
    local = load_manifest(small_dataset)
    assert plan.val_split == "val" and not plan.warnings
    assert plan.val_urls == [f"pipe:cat {u}" for u in local.urls("val")]
    assert not set(plan.val_urls) & set(plan.sources[0].train)
    kw = dict(KW, rank=0, world=1, dtype=local.token_dtype)
    assert blocks_of(val_batches(plan.val_urls, **kw)) == blocks_of(val_batches(local.urls("val"), **kw))


def test_pipe_manifest_command_that_hides_the_manifest_name_fails_before_launch(small_dataset, tmp_path, compose):
    from kiln.data.plan import plan_data

    root = tmp_path / "copy"
    shutil.copytree(small_dataset, root)
    shutil.copy(root / "manifest.json", root / "index.json")
    with pytest.raises(ConfigError) as e:
        plan_data(pipe_config(compose, root, "index.json"))
    assert "data.manifest" in str(e.value) and "manifest.json" in str(e.value)


def test_data_without_validation_split_is_flagged(tmp_path, compose):
    from kiln.data.plan import plan_data

    out = tmp_path / "noval"
    build_shards([str(p) for p in stdlib_files(6)], out, ByteTokenizer(), val_fraction=0.0, shard_tokens=50_000)
    plan = plan_data(compose([f"data.path={out}"]))
    assert plan.val_split == "train" and plan.val_urls == plan.sources[0].train
    assert len(plan.warnings) == 1 and "TRAINING shards" in plan.warnings[0]


def test_val_path_names_the_validation_shards(small_dataset, tmp_path, compose):
    """data.val_path: a pipe: source with no validation shards of its own, or any source, evaluates
    on the shards it names (a kiln-data directory's val split, or a pattern); bad ones fail early."""
    from kiln.data.plan import plan_data
    from kiln.errors import DataError

    local = load_manifest(small_dataset)
    (val,) = local.urls("val")
    cfg = pipe_config(compose, small_dataset)
    cfg.data.val_path = f"pipe:cat {val}"
    plan = plan_data(cfg, check_open=True)
    assert plan.val_urls == [f"pipe:cat {val}"] and plan.val_split == "val"
    plan = plan_data(compose([f"data.path={small_dataset}", f"data.val_path={small_dataset}"]))
    assert plan.val_urls == [val]
    cfg = compose([f"data.path={small_dataset}"])
    cfg.data.val_path = f"{tmp_path}/v-{{0..1}}.tar"
    with pytest.raises(DataError, match="data.val_path.*does not exist"):
        plan_data(cfg, check_open=True)
    out = tmp_path / "noval"
    build_shards([str(p) for p in stdlib_files(6)], out, ByteTokenizer(), val_fraction=0.0, shard_tokens=50_000)
    with pytest.raises(ConfigError, match="data.val_path"):
        plan_data(compose([f"data.path={small_dataset}", f"data.val_path={out}"]))
