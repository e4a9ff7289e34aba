"""Hydra --multirun sweeps as Ray Train runs on one Ray instance: a 4-trial sweep with one trial that
diverges (a real failure inside the Ray worker) and one stopped by SIGTERM, run twice. Its trials
run one Ray worker each, ZeRO-0 in bf16 (what a sweep adds is the same for any worker count; two
workers in ZeRO-0 bf16: test_console.py's Ray run); the Optuna sweep runs launcher=local.
The sweep starts its own local Ray instance, so it needs no xdist group (conftest.py): no other
test counts the workers of a local instance."""

import glob
import json
import math
import os
import signal
import subprocess

import pytest

from conftest import REPO, wait_for
from helpers.wandb_log import history, run_info

pytestmark = pytest.mark.integration

LRS = ["1e-3", "3e-3", "1e6", "2e-3"]  # 1e6 diverges: NaN loss inside the workers
TRIALS = [f"optim.lr={float(v)}" for v in LRS]  # how Hydra names them (override value as parsed)


def sweep_cmd(tmp_path, max_steps: int) -> list[str]:
    return ["kiln-train", "--multirun", f"optim.lr={','.join(LRS)}", f"trainer.max_steps={max_steps}",
            "trainer.log_interval=2", "trainer.eval_interval=1000", "trainer.eval_batches=2",
            "trainer.checkpoint_interval=4", "data.num_workers=1", "trainer.run_name=lr-sweep",
            "parallelism=zero0", "precision=bf16", "launcher.num_workers=1",
            f"launcher.storage_path={tmp_path / 'ck'}", f"hydra.sweep.dir={tmp_path / 'sweep'}"]


def start(cmd, log_path):
    log = open(log_path, "w")
    return subprocess.Popen(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, text=True,
                            env={**os.environ, "WANDB_MODE": "offline"})


def trials(tmp_path) -> dict[str, dict]:
    rows = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    return {r["trial"]: r for r in rows}


def steps_logged(trial_dir) -> list[int]:
    path = trial_dir / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


@pytest.mark.timeout(900)
def test_sweep_records_failure_and_reruns_skip_finished_resume_interrupted(tmp_path):
    sweep, ck = tmp_path / "sweep", tmp_path / "ck" / "lr-sweep"
    cmd = sweep_cmd(tmp_path, max_steps=24)

    # Run 1: trial 0 finishes; trial 1 is stopped by SIGTERM to the driver mid-run.
    proc = start(cmd, tmp_path / "run1.log")
    wait_for(lambda: max(steps_logged(sweep / TRIALS[1]), default=0) >= 6, 400, "trial 1 at step 6", proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 0
    log1 = (tmp_path / "run1.log").read_text()
    first = trials(tmp_path)
    assert first[TRIALS[0]]["status"] == "done" and first[TRIALS[0]]["steps"] == 24
    assert first[TRIALS[1]]["status"] == "interrupted"
    assert {first[t]["status"] for t in TRIALS[2:]} == {"not run (sweep stopped)"}
    stopped_at = json.loads((sweep / TRIALS[1] / "summary.json").read_text())["stopped_early_at"]
    assert stopped_at and (ck / TRIALS[1] / f"step_{stopped_at:09d}").is_dir()

    # Run 2, the same command: 0 skipped, 1 resumed, 2 fails inside the workers, 3 runs.
    again = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600,
                           env={**os.environ, "WANDB_MODE": "offline"})
    (tmp_path / "run2.log").write_text(again.stdout + again.stderr)
    assert again.returncode == 0, again.stderr[-3000:]
    rows = trials(tmp_path)
    assert [rows[t]["status"] for t in TRIALS] == ["skipped (finished before)", "done", "failed", "done"]
    assert f"resumed from {ck / TRIALS[1] / f'step_{stopped_at:09d}'} at step {stopped_at}" in again.stdout
    assert "training diverged" in rows[TRIALS[2]]["error"] and "optim.lr" in rows[TRIALS[2]]["error"]
    assert rows[TRIALS[2]]["final_eval_loss"] is None
    # Ray was started once per sweep command, not per trial.
    assert log1.count("local Ray instance:") == 1
    assert again.stdout.count("local Ray instance:") == 1
    assert again.stdout.count("existing Ray connection (local instance)") == 2  # trials 2 and 3

    # The table (printed and written) has every trial with its objective.
    table = (sweep / "trials.md").read_text()
    for t in TRIALS:
        assert t.replace(",", " ") in table
    assert "| failed: " in table and "training diverged" in table
    for t in (TRIALS[0], TRIALS[1], TRIALS[3]):
        r = rows[t]
        assert r["steps"] == 24 and math.isfinite(r["final_eval_loss"]) and r["tokens_per_s"] > 0
        # own output dir, own checkpoints, own resolved config
        assert (sweep / t / "resolved_config.yaml").is_file()
        assert (ck / t / "step_000000024").is_dir()
        logged = [json.loads(x) for x in (sweep / t / "metrics.jsonl").read_text().splitlines()]
        assert all(isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 for r in logged), t
    assert (sweep / TRIALS[1] / "metrics.jsonl").is_file()
    resumed_steps = steps_logged(sweep / TRIALS[1])
    assert resumed_steps[-1] == 24 and sorted(set(resumed_steps)) == resumed_steps  # continues, no restart

    # One W&B run per trial, grouped by the sweep; the resumed trial continued its own run.
    runs = {}
    for t in (TRIALS[0], TRIALS[1], TRIALS[3]):
        files = sorted(glob.glob(str(sweep / t / "wandb" / "offline-run-*" / "run-*.wandb")))
        infos = [run_info(f) for f in files]
        assert {i["group"] for i in infos} == {"lr-sweep"} and {i["name"] for i in infos} == {t}
        assert len({i["id"] for i in infos}) == 1, "a trial keeps one W&B run across the resume"
        runs[t] = infos[0]["id"]
    assert len(set(runs.values())) == 3
    resumed_files = sorted(glob.glob(str(sweep / TRIALS[1] / "wandb" / "offline-run-*" / "run-*.wandb")),
                           key=os.path.getmtime)
    assert len(resumed_files) == 2 and history(resumed_files[1])[0]["_step"] > stopped_at


@pytest.mark.timeout(600)
def test_optuna_search_minimises_eval_loss(tmp_path):
    cmd = ["kiln-train", "--multirun", "experiment=optuna_search", "hydra.sweeper.n_trials=3", "launcher=local",
           "trainer.max_steps=6", "trainer.eval_interval=6", "trainer.eval_batches=2", "logger=none",
           "data.num_workers=0", f"launcher.storage_path={tmp_path / 'ck'}", f"hydra.sweep.dir={tmp_path / 'sweep'}",
           # persistent storage, as the preset's comment suggests (optuna 2 needs SQLAlchemy 1.4)
           f"hydra.sweeper.storage=sqlite:///{tmp_path / 'optuna.db'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=500)
    (tmp_path / "optuna.log").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert len(rows) == 3 and {r["status"] for r in rows} == {"done"}
    lrs = {float(next(o for o in r["overrides"] if o.startswith("optim.lr=")).split("=")[1]) for r in rows}
    assert len(lrs) == 3 and all(1e-4 <= lr <= 3e-3 for lr in lrs), lrs  # sampled from the search space
    import yaml

    best = yaml.safe_load((tmp_path / "sweep" / "optimization_results.yaml").read_text())
    assert best["best_value"] == pytest.approx(min(r["final_eval_loss"] for r in rows))
    assert (tmp_path / "ck" / "optuna-search").is_dir()
    import optuna

    study = optuna.load_study(study_name="optuna-search", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.value for t in study.trials) == sorted(r["final_eval_loss"] for r in rows)


def test_failed_trial_objective_is_worst_not_nan():
    from kiln.sweep import objective, trial_dir_name

    assert objective(None) == math.inf and objective({"final_eval_loss": float("nan")}) == math.inf
    assert objective({"final_eval_loss": 2.5}) == 2.5
    assert trial_dir_name(["data.path=/a/b c", "optim.lr=0.1"]) == "data.path=_a_b_c,optim.lr=0.1"
    assert len(trial_dir_name([f"k{i}=v" for i in range(100)])) <= 120
