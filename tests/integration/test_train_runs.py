"""A real training run through the real `kiln-train` in one process (launcher=local), read back
(the Ray launcher's runs: test_ray_runs.py)."""

import json

import pytest
import yaml

from conftest import assert_ok, kiln_train
from helpers.runs import check_loss_falls
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration


@pytest.mark.timeout(300)
def test_local_launcher_30_steps_loss_falls(tmp_path):
    run, ops = tmp_path / "local", tmp_path / "torch_extensions"
    proc = kiln_train(["launcher=local", "model=tiny", "trainer.max_steps=30", "logger=none",
                       "trainer.log_interval=5"], run, env={"TORCH_EXTENSIONS_DIR": str(ops)})
    assert_ok(proc)
    # Nothing JIT-built on the way (DeepSpeed's CPU comm op is turned off: engine/build.py),
    # so a fresh machine's first run starts as fast as any other.
    assert not ops.exists() or not any(ops.iterdir()), sorted(ops.rglob("*"))
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
