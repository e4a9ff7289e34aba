"""Checkpoints and exact resume through the real kiln-train with launcher=local: preemption
(SIGTERM), a process killed in the middle of a save, and trainer.resume (the Ray launcher's
resume tests: test_ray_runs.py).

Tolerance: a resumed run replays the same data, learning rate, RNG streams and optimizer state
exactly; its losses equal the uninterrupted run's bitwise in fp32 on CPU, and match to 2e-2 in bf16
(see docs/checkpoints.md)."""

import json

import pytest

from conftest import assert_ok, kiln_train, kiln_train_popen, train_in_process, wait_for
from helpers.runs import assert_continues, losses, sigterm_when
from kiln.errors import ConfigError

# One worker for the module: its uninterrupted reference run is made once, not once per xdist worker.
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("local-resume")]

BF16_ATOL = 2e-2


LOCAL = ["launcher=local", "trainer.max_steps=40", "logger=none", "trainer.log_interval=1",
         "trainer.checkpoint_interval=0", "precision=fp32", "data.num_workers=1"]


@pytest.fixture(scope="module")
def local_full(tmp_path_factory):
    root = tmp_path_factory.mktemp("local_full")
    assert_ok(kiln_train(LOCAL + [f"launcher.storage_path={root / 'ck'}"], root / "run"))
    return losses(root / "run")


@pytest.mark.timeout(600)
def test_local_sigterm_then_same_command_resumes_exactly(tmp_path, local_full):
    args = LOCAL + [f"launcher.storage_path={tmp_path / 'ck'}"]
    proc = kiln_train_popen(args, tmp_path / "a")
    rc, took = sigterm_when(proc, tmp_path / "a", 8)
    assert rc == 0 and took < 60, (rc, took)
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    k = summary["stopped_early_at"]
    assert k and k >= 8 and (tmp_path / "ck" / "kiln" / f"step_{k:09d}").is_dir()
    assert (tmp_path / "a.log").read_text().count("stop requested: saved a checkpoint") == 1

    again = kiln_train(args, tmp_path / "b")  # the same command
    assert_ok(again)
    assert f"resumed from {tmp_path / 'ck' / 'kiln' / f'step_{k:09d}'} at step {k}" in again.stdout
    assert_continues(local_full, losses(tmp_path / "b"), k + 1, 40)
    # steps before the stop were identical too (same seed, same data)
    for s, r in losses(tmp_path / "a").items():
        assert r["loss"] == local_full[s]["loss"]


@pytest.mark.timeout(600)
def test_kill_during_save_keeps_previous_checkpoint(tmp_path, local_full):
    args = LOCAL + [f"launcher.storage_path={tmp_path / 'ck'}", "trainer.checkpoint_interval=10",
                    "trainer.keep_checkpoints=3"]
    proc = kiln_train_popen(args, tmp_path / "a", env={"KILN_FAULT_SAVE_PAUSE": "20:120"})
    run = tmp_path / "ck" / "kiln"
    partial = run / ".step_000000020.tmp" / "kiln"
    wait_for(lambda: any(partial.glob("SAVE_IN_PROGRESS.*")), 300, "the step-20 save to be in progress", proc)
    proc.kill()  # SIGKILL in the middle of the save: every file written, nothing committed
    proc.wait(timeout=60)
    assert sorted(p.name for p in run.iterdir() if not p.name.startswith(".")) == ["step_000000010"]

    again = kiln_train(args, tmp_path / "b")
    assert_ok(again)
    assert "at step 10" in again.stdout, "the partial step-20 save must never be chosen"
    assert_continues(local_full, losses(tmp_path / "b"), 11, 40)
    assert not (run / ".step_000000020.tmp").exists()
    assert (run / "step_000000040").is_dir()


@pytest.mark.timeout(300)
def test_local_bf16_resume_within_tolerance(tmp_path):
    args = ["launcher=local", "trainer.max_steps=20", "logger=none", "trainer.log_interval=1",
            "precision=bf16", "data.num_workers=1", f"launcher.storage_path={tmp_path / 'ck'}"]
    train_in_process(args + ["trainer.checkpoint_interval=10", "trainer.run_name=full"], tmp_path / "full")
    step10 = tmp_path / "ck" / "full" / "step_000000010"
    train_in_process(args + ["trainer.checkpoint_interval=0", "trainer.run_name=again",
                             f"trainer.resume_from={step10}"], tmp_path / "again")
    assert_continues(losses(tmp_path / "full"), losses(tmp_path / "again"), 11, 20, atol=BF16_ATOL)


@pytest.mark.timeout(300)
def test_resume_flags_and_shape_mismatch_fail_before_training(tmp_path, capsys):
    ck = tmp_path / "ck"
    args = ["launcher=local", "trainer.max_steps=5", "logger=none", f"launcher.storage_path={ck}"]
    with pytest.raises(ConfigError, match="no checkpoint") as nothing:
        train_in_process(args + ["trainer.resume=require"], tmp_path / "r1")
    assert nothing.value.key == "trainer.resume"
    train_in_process(args, tmp_path / "r2")
    with pytest.raises(ConfigError, match="already has checkpoints"):
        train_in_process(args + ["trainer.resume=never"], tmp_path / "r3")
    with pytest.raises(ConfigError, match="checkpoint 2 vs config 3") as other:
        train_in_process(args + ["model.n_layer=3", "trainer.max_steps=10"], tmp_path / "r4")
    assert "model.n_layer" in str(other.value)
    assert not (tmp_path / "r4" / "metrics.jsonl").exists()
    capsys.readouterr()
    done = train_in_process(args, tmp_path / "r5")  # finished run, same command: nothing to do, says so
    assert "already reached step 5" in capsys.readouterr().out
    assert done["steps"] == 5
