"""Real training runs through the real `kiln-train`: one process, and Ray Train with 2 CPU
workers under ZeRO-2 and ZeRO-3, W&B offline. Each reads back what the run wrote."""

import glob
import json

import pytest
import yaml

from conftest import assert_ok, kiln_train
from helpers.wandb_log import history, run_info
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration


def check_loss_falls(records: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in records] == steps
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.3, f"loss did not fall: {[round(r['loss'], 3) for r in records]}"


@pytest.mark.timeout(900)  # the first DeepSpeed run on a machine JIT-compiles its CPU ops
def test_local_launcher_30_steps_loss_falls(tmp_path):
    run = tmp_path / "local"
    proc = kiln_train(["launcher=local", "model=tiny", "trainer.max_steps=30", "logger=none",
                       "trainer.log_interval=5"], run)
    assert_ok(proc)
    records = read_jsonl(run / "metrics.jsonl")
    check_loss_falls(records, [5, 10, 15, 20, 25, 30])
    assert "eval_loss" in records[-1] and all("eval_loss" not in r for r in records[:-1])
    summary = json.loads((run / "summary.json").read_text())
    assert summary["final_loss"] == records[-1]["loss"]
    assert summary["final_eval_loss"] == records[-1]["eval_loss"]
    assert summary["world_size"] == 1 and summary["wandb"] is None
    assert "final train loss" in proc.stdout and str(run) in proc.stdout
    resolved = yaml.safe_load((run / "resolved_config.yaml").read_text())
    assert resolved["data"]["path"].startswith("/") and resolved["output_dir"] == str(run)
    assert not (run / "wandb").exists()


def ray_run(tmp_path, name: str, stage: int, extra: list[str]):
    run = tmp_path / name
    proc = kiln_train(["model=tiny", f"parallelism=zero{stage}", "trainer.max_steps=30",
                       "trainer.log_interval=5", "trainer.eval_interval=15", *extra], run)
    assert_ok(proc)
    records = read_jsonl(run / "metrics.jsonl")
    check_loss_falls(records, [5, 10, 15, 20, 25, 30])
    assert [r["step"] for r in records if "eval_loss" in r] == [15, 30]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == 2
    assert "local Ray instance: 2 CPU worker(s)" in proc.stdout
    # Rank 0 alone prints progress: each step line appears exactly once.
    assert proc.stdout.count("step 30/30") == 1, proc.stdout

    # The W&B offline run, read back from its transaction log, holds the logged metrics.
    wb = summary["wandb"]
    assert wb["mode"] == "offline" and f"wandb sync {wb['dir']}" in proc.stdout
    files = glob.glob(f"{wb['dir']}/run-*.wandb")
    assert len(files) == 1
    rows = history(files[0])
    assert [r["_step"] for r in rows] == [r["step"] for r in records]
    for row, rec in zip(rows, records):
        for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
            assert row[key] == pytest.approx(rec[key])
        assert ("eval_loss" in row) == ("eval_loss" in rec)
    info = run_info(files[0])
    assert info["id"] == wb["id"] and info["project"] == "kiln"
    assert info["config"]["parallelism"]["zero_stage"] == stage
    return records


@pytest.mark.timeout(900)
def test_ray_two_workers_zero2_wandb_offline(tmp_path, small_dataset):
    ray_run(tmp_path, "zero2", 2, [f"data.path={small_dataset}", "data.num_workers=2"])


@pytest.mark.timeout(900)
def test_ray_two_workers_zero3_default_corpus(tmp_path):
    ray_run(tmp_path, "zero3", 3, [])  # data.path=null: the stdlib corpus, built on first use
