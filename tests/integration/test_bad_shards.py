"""A damaged shard (its size intact) at run time, under both data.on_error policies: `raise` ends a 2-worker Ray
run promptly naming the shard (no hang, no process left); `skip` (the data layer's, the same
under either launcher: run here in-process, launcher=local) finishes and counts what it skipped."""

import json

import pytest

from conftest import kiln_train, stdlib_files, train_in_process
from helpers.processes import worker_pids
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def damaged(tmp_path_factory):
    from kiln.data.build import build_shards
    from kiln.data.manifest import load_manifest
    from kiln.data.tokenizer import ByteTokenizer

    root = tmp_path_factory.mktemp("bad")
    # ~44k tokens of 400-byte documents in 5k-token shards: every rank reads all of its
    # shards within the run's 50 steps (~50k tokens a rank), so the damaged one is reached
    # (by a Ray rank, which reads half of them, within about 20 steps).
    text = "".join(p.read_text() for p in stdlib_files(8))[:44_000]
    docs = [text[i:i + 400] for i in range(0, len(text), 400)]
    (root / "docs.jsonl").write_text("\n".join(json.dumps({"text": d}) for d in docs) + "\n")
    out = root / "d"
    build_shards([str(root / "docs.jsonl")], out, ByteTokenizer(), val_fraction=0.05, shard_tokens=5_000)
    m = load_manifest(out)
    assert len(m.splits["train"]) >= 8
    victim = out / m.splits["train"][5].file
    data = victim.read_bytes()
    # Its second half zeroed, the size kept (a truncated shard is named before launch:
    # tests/unit/test_dataset_checks.py): as a copy whose last blocks never arrived leaves it.
    victim.write_bytes(data[: len(data) // 2] + bytes(len(data) - len(data) // 2))
    return out, victim


ARGS = ["trainer.max_steps=50", "trainer.log_interval=10", "trainer.eval_interval=50", "logger=none",
        "data.shuffle_buffer=8", "data.num_workers=0"]


@pytest.mark.timeout(500)
def test_ray_truncated_shard_raise_fails_fast_naming_it(tmp_path, damaged, ray_head):
    """With one retry allowed, the failure repeats on the second attempt too: kiln-train ends
    with the worker's own error, exit status 2, and no worker processes left behind."""
    data, victim = damaged
    proc = kiln_train([f"data.path={data}", "launcher.max_failures=1", *ARGS], tmp_path / "raise", timeout=480,
                      env=ray_head.driver_env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert not worker_pids(ray_head.token), "no Ray worker processes may be left behind"
    last = proc.stderr.strip().splitlines()
    summary = "\n".join(last[-4:])
    assert "training failed on the Ray workers" in proc.stderr
    assert f"DataError: shard {victim}" in summary and "data.on_error=skip" in summary


@pytest.mark.timeout(400)
def test_truncated_shard_skip_finishes_and_counts(tmp_path, damaged):
    data, victim = damaged
    run = tmp_path / "skip"
    with pytest.warns(UserWarning, match=f"skipping bad data in shard {victim}: truncated"):
        summary = train_in_process(["launcher=local", f"data.path={data}", "data.on_error=skip", *ARGS], run)
    records = read_jsonl(run / "metrics.jsonl")
    assert records[-1]["step"] == 50 and summary["steps"] == 50
    assert any(r.get("data/skipped_shards", 0) >= 1 for r in records), records
    assert summary["final_loss"] < records[0]["loss"]
    assert summary["data"]["skipped_shards"] >= 1, summary["data"]
