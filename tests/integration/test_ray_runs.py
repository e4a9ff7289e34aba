"""kiln's Ray launcher through the real kiln-train: two 2-worker runs, each read back and then used as
the uninterrupted reference for a run that is stopped or hurt and resumed.

- ZeRO-2 on a running Ray cluster (the session's `ray start --head`, joined through RAY_ADDRESS),
  W&B offline, dropout on: then SIGTERM to the driver and the same command again.
- ZeRO-3 on a local instance kiln starts itself (the README's path), the default corpus: then (on
  the cluster, whose processes carry its token) a worker process SIGKILLed from outside,
  restarted by Ray, resumed from the last checkpoint.

Resumed losses equal the uninterrupted run's bitwise (fp32 on CPU; see docs/checkpoints.md)."""

import glob
import json
import re
from types import SimpleNamespace

import psutil
import pytest
import torch

from conftest import assert_ok, kiln_train, kiln_train_popen, logged_steps, wait_for
from helpers.processes import worker_pids
from helpers.runs import assert_continues, check_loss_falls, check_wandb_run, losses, sigterm_when
from helpers.wandb_log import history, run_info
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration

RAY = ["trainer.max_steps=40", "trainer.log_interval=1", "trainer.eval_interval=20", "data.num_workers=1",
       "precision=fp32"]
ZERO2 = [*RAY, "parallelism=zero2", "model.dropout=0.1", "trainer.checkpoint_interval=0", "trainer.peak_tflops=1"]
ZERO3 = [*RAY, "parallelism=zero3", "trainer.checkpoint_interval=10",
         "parallelism.param_persistence_threshold=0"]  # shard even the tiny model's LayerNorm gains


def full_run(root, args: list[str], env: dict | None = None) -> SimpleNamespace:
    proc = kiln_train([*args, f"launcher.storage_path={root / 'ck'}"], root / "run", env=env)
    assert_ok(proc)
    run = root / "run"
    records = read_jsonl(run / "metrics.jsonl")
    return SimpleNamespace(run=run, ck=root / "ck" / "kiln", stdout=proc.stdout, records=records,
                           losses={r["step"]: r for r in records},
                           summary=json.loads((run / "summary.json").read_text()))


@pytest.fixture(scope="module")
def zero2_full(tmp_path_factory, ray_head):
    return full_run(tmp_path_factory.mktemp("zero2_full"), ZERO2, ray_head.driver_env)


@pytest.fixture(scope="module")
def zero3_full(tmp_path_factory):
    return full_run(tmp_path_factory.mktemp("zero3_full"), ZERO3)  # data.path=null: the stdlib corpus


def check_two_worker_run(full: SimpleNamespace, zero_stage: int) -> None:
    check_loss_falls(full.records, list(range(1, 41)))
    assert [r["step"] for r in full.records if "eval_loss" in r] == [20, 40]
    assert full.summary["world_size"] == 2 and full.summary["steps"] == 40
    assert full.stdout.count("step 40/40") == 1, full.stdout  # rank 0 alone prints progress
    check_wandb_run(full.summary, full.stdout, full.records, zero_stage)


@pytest.mark.timeout(600)
def test_ray_zero2_on_a_running_cluster_trains_and_logs_wandb(zero2_full, ray_head):
    check_two_worker_run(zero2_full, 2)
    assert f"Ray cluster at {ray_head.gcs}: 2 CPU worker(s)" in zero2_full.stdout
    # MFU over both ranks: all ranks' tokens/s against two devices' peak (1 TFLOP/s each here).
    s = zero2_full.summary
    assert s["peak_tflops"] == 1.0 and s["mfu"] == pytest.approx(s["tokens_per_s"] * s["flops_per_token"] / 2e12)
    for r in zero2_full.records:
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * s["flops_per_token"] / 2e12)
    # Each rank draws its own random numbers (dropout masks) after the shared-seed model init.
    final = zero2_full.ck / "step_000000040" / "kiln"
    states = [torch.load(final / f"rank_{r}.pt", weights_only=False)["rng"] for r in (0, 1)]
    assert not torch.equal(states[0]["torch"], states[1]["torch"]), "both ranks drew the same random numbers"
    assert states[0]["numpy"][1].tolist() != states[1]["numpy"][1].tolist()


@pytest.mark.timeout(600)
def test_ray_zero3_local_instance_trains_on_the_default_corpus(zero3_full):
    check_two_worker_run(zero3_full, 3)
    assert "local Ray instance: 2 CPU worker(s)" in zero3_full.stdout


@pytest.mark.timeout(900)
def test_ray_zero2_sigterm_resume_continues_wandb_run(tmp_path, zero2_full, ray_head):
    args = [*ZERO2, f"launcher.storage_path={tmp_path / 'ck'}"]
    proc = kiln_train_popen(args, tmp_path / "a", env=ray_head.driver_env)
    rc, took = sigterm_when(proc, tmp_path / "a", 10)
    assert rc == 0 and took < 60, (rc, took)
    k = json.loads((tmp_path / "a" / "summary.json").read_text())["stopped_early_at"]
    assert k >= 10
    again = kiln_train(args, tmp_path / "b", env=ray_head.driver_env)
    assert_ok(again)
    assert_continues(zero2_full.losses, losses(tmp_path / "b"), k + 1, 40)  # dropout's RNG streams too

    # The resumed run continues the same W&B run: same id, the step axis carrying on.
    first = glob.glob(str(tmp_path / "a" / "wandb" / "offline-run-*" / "run-*.wandb"))
    second = glob.glob(str(tmp_path / "b" / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(first) == len(second) == 1
    assert run_info(first[0])["id"] == run_info(second[0])["id"]
    assert history(first[0])[-1]["_step"] == k and history(second[0])[0]["_step"] == k + 1
    assert not worker_pids(ray_head.token), "the cluster's worker processes end with the run"


@pytest.mark.timeout(900)
def test_ray_zero3_worker_killed_mid_run_restarts_and_finishes(tmp_path, zero3_full, ray_head):
    run = tmp_path / "a"
    proc = kiln_train_popen([*ZERO3, f"launcher.storage_path={tmp_path / 'ck'}", "launcher.max_failures=1"], run,
                            env=ray_head.driver_env)
    snapshot = tmp_path / "ck" / "kiln" / "checkpoint_manager_snapshot.json"
    # A checkpoint counts once Ray Train has registered it (every worker reported it).
    wait_for(lambda: snapshot.is_file() and "step_000000010" in snapshot.read_text()
             and max(logged_steps(run), default=0) >= 13, 400, "checkpoint 10 registered, step 13", proc)
    victims = worker_pids(ray_head.token)
    assert len(victims) == 2, victims
    psutil.Process(victims[-1]).kill()  # SIGKILL one real worker process from outside

    def gone(pid: int) -> bool:  # (the kernel takes a moment; Ray reaps it later)
        try:
            return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    wait_for(lambda: gone(victims[-1]), 30, f"worker {victims[-1]} dead after SIGKILL")
    assert proc.wait(timeout=600) == 0
    log = (tmp_path / "a.log").read_text()
    resumed = re.findall(r"resumed from \S+ at step (\d+)", log)
    assert len(resumed) == 1 and int(resumed[0]) >= 10, "the restarted group resumes from a checkpoint"
    k = int(resumed[0])
    records = read_jsonl(run / "metrics.jsonl")
    # Steps after the checkpoint were logged twice: before the kill, and again after the restart.
    steps = [r["step"] for r in records]
    assert steps.count(k + 1) == 2 and steps[-1] == 40
    after = {}
    for r in records:
        after[r["step"]] = r  # the last record of each step is the one after the restart
    full = zero3_full.losses
    assert_continues(full, {s: after[s] for s in range(k + 1, 41)}, k + 1, 40)  # bitwise
    assert after[40]["eval_loss"] == full[40]["eval_loss"]
    assert not worker_pids(ray_head.token), "no worker processes may be left behind"


@pytest.mark.timeout(400)
def test_ray_stalled_rank_fails_the_run_at_launcher_timeout(tmp_path, ray_head):
    """Rank 1 stops answering after step 5; rank 0 waits in the next collective for
    launcher.timeout_s (15 s here, not torch's 30 minutes), then the run fails saying so, and no
    worker process is left behind (the stalled one included)."""
    env = {**ray_head.driver_env, "KILN_FAULT_STALL": "1:5:300"}
    proc = kiln_train([*RAY, "parallelism=zero2", "launcher.timeout_s=15", "trainer.checkpoint_interval=0",
                       f"launcher.storage_path={tmp_path / 'ck'}"], tmp_path / "stall", timeout=300, env=env)
    assert proc.returncode == 2, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "training failed on the Ray workers" in proc.stderr
    assert "launcher.timeout_s=15" in proc.stderr and "never joined" in proc.stderr, proc.stderr[-3000:]
    assert max(logged_steps(tmp_path / "stall"), default=0) <= 6
    assert not worker_pids(ray_head.token), "no Ray worker processes may be left behind"
