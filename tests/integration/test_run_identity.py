"""Run identity: a new experiment never silently resumes, or is refused by, someone else's
checkpoints. Only a named run continues its own checkpoints; an unnamed run is a new run with a
fresh name. Runs in-process (launcher=local): compose, plan on the driver, run."""

import json

import pytest

from kiln.config.compose import compose
from kiln.errors import ConfigError
from kiln.launch.launcher import run
from kiln.plan import plan_run

pytestmark = pytest.mark.integration

BASE = ["launcher=local", "model=tiny", "logger=none", "data.num_workers=0", "trainer.micro_batch_size=2",
        "trainer.log_interval=2", "trainer.eval_interval=100", "trainer.eval_batches=1", "precision=fp32"]


def train(tmp_path, out: str, *overrides: str) -> tuple[dict, object]:
    cfg = compose([*BASE, f"launcher.storage_path={tmp_path / 'ck'}", *overrides])
    plan = plan_run(cfg, tmp_path / out)
    return run(plan), plan


@pytest.mark.timeout(600)
def test_unnamed_runs_are_new_runs_and_named_runs_continue(tmp_path, small_dataset):
    data = f"data.path={small_dataset}"
    # The README job, then a debug run and a bigger model with the same defaults (no names):
    first, p1 = train(tmp_path, "a", data, "trainer.max_steps=4")
    second, p2 = train(tmp_path, "b", data, "trainer.max_steps=2")
    third, p3 = train(tmp_path, "c", data, "trainer.max_steps=2", "model.n_layer=3")
    assert len({p1.run_name, p2.run_name, p3.run_name}) == 3 and not p1.named
    for summary, steps in ((first, 4), (second, 2), (third, 2)):
        assert summary["steps"] == steps and summary["resumed_from_step"] is None and not summary.get("skipped")
    runs = sorted(d.name for d in (tmp_path / "ck").iterdir())
    assert runs == sorted([p1.run_name, p2.run_name, p3.run_name])
    assert json.loads((tmp_path / "a" / "summary.json").read_text())["run_name"] == p1.run_name

    # A named run continues its own checkpoints, and says when there is nothing left to do.
    named, p4 = train(tmp_path, "d", data, "trainer.max_steps=2", "trainer.run_name=mine")
    assert p4.named and named["steps"] == 2
    more, _ = train(tmp_path, "e", data, "trainer.max_steps=4", "trainer.run_name=mine")
    assert more["resumed_from_step"] == 2 and more["steps"] == 4
    done, _ = train(tmp_path, "f", data, "trainer.max_steps=4", "trainer.run_name=mine")
    assert done["skipped"] and done["steps"] == 4

    # An unnamed run can still branch from any checkpoint, and asking to continue needs a name.
    step4 = tmp_path / "ck" / "mine" / "step_000000004"
    branch, p5 = train(tmp_path, "g", data, "trainer.max_steps=6", f"trainer.resume_from={step4}")
    assert p5.run_name != "mine" and branch["resumed_from_step"] == 4 and branch["steps"] == 6
    with pytest.raises(ConfigError) as e:
        train(tmp_path, "h", data, "trainer.resume=require")
    assert e.value.key == "trainer.resume" and "trainer.run_name" in str(e.value)


@pytest.mark.timeout(120)
def test_a_requeued_branch_continues_its_own_checkpoints(tmp_path, small_dataset):
    """A named run started with resume_from (a branch), run again (Slurm requeue, resubmission):
    it continues its own latest checkpoint instead of refusing or re-branching."""
    data = f"data.path={small_dataset}"
    train(tmp_path, "a", data, "trainer.max_steps=2", "trainer.run_name=base")
    base2 = tmp_path / "ck" / "base" / "step_000000002"
    first, _ = train(tmp_path, "b", data, "trainer.max_steps=4", "trainer.run_name=branch",
                     f"trainer.resume_from={base2}", "trainer.checkpoint_interval=1")
    assert first["resumed_from_step"] == 2
    again, plan = train(tmp_path, "c", data, "trainer.max_steps=6", "trainer.run_name=branch",
                        f"trainer.resume_from={base2}")
    assert plan.resume.own and again["resumed_from_step"] == 4 and again["steps"] == 6
