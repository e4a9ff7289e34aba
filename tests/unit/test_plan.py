"""The run plan: resolved once on the driver, complete, frozen, and able to travel to workers."""

import dataclasses
import os
import pickle

import pytest

from kiln.config.compose import compose
from kiln.identity import SweepTrial
from kiln.plan import plan_run


def test_plan_resolves_everything_the_workers_need_and_pickles(small_dataset, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rel = os.path.relpath(small_dataset, tmp_path)
    cfg = compose(["launcher=local", f"data.path={rel}", "launcher.storage_path=ck", "model.vocab_size=null"])
    plan = plan_run(cfg, "out")
    assert cfg.trainer.run_name is None and cfg.data.path == rel  # the caller's config is untouched
    assert plan.config.data.path == str(small_dataset) and plan.storage == str(tmp_path / "ck")
    assert plan.output_dir == tmp_path / "out" and plan.checkpoints == f"{tmp_path / 'ck'}/{plan.run_name}"
    assert plan.model.vocab_size == plan.data.tokenizer.vocab_size == 257 and plan.model.n_layer == cfg.model.n_layer
    assert not plan.named and plan.resume.checkpoint is None and not plan.finished
    # kiln-data shuffled these shards when it wrote them: read in stored order (data.shuffle_documents=null)
    assert plan.data.sources[0].shuffled and plan.data.spec.documents_shuffled() == [False]
    assert len(plan.data.val_urls) >= 1
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.storage = "elsewhere"
    again = pickle.loads(pickle.dumps(plan))  # how Ray hands it to every worker
    assert again.config == plan.config and again.data.spec == plan.data.spec and again.model == plan.model
    assert list(again.data.tokenizer.encode("kiln")) == list(plan.data.tokenizer.encode("kiln"))


def test_a_sweep_trial_gets_its_own_run_and_group(small_dataset, tmp_path):
    cfg = compose(["launcher=local", f"data.path={small_dataset}", f"launcher.storage_path={tmp_path}",
                   "trainer.run_name=lr-sweep"])
    trial = SweepTrial(sweep_name="sweep-dir", trial="optim.lr=0.001", num=0, overrides=["optim.lr=0.001"])
    plan = plan_run(cfg, tmp_path / "t0", trial=trial)
    assert plan.named and plan.run_name == "optim.lr=0.001" and plan.storage == f"{tmp_path}/lr-sweep"
    assert plan.config.logger.group == "lr-sweep"
    unnamed = compose(["launcher=local", f"data.path={small_dataset}", f"launcher.storage_path={tmp_path}"])
    plan = plan_run(unnamed, tmp_path / "t0", trial=trial)  # an unnamed sweep is named by its directory
    assert plan.storage == f"{tmp_path}/sweep-dir" and plan.config.logger.group == "sweep-dir"
