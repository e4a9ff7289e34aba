"""A checkpoint is data from elsewhere: a file in it that would run code on loading, or that is
damaged, stops the run naming the file; nothing in it runs and the run never starts over."""

from __future__ import annotations

import shutil

import pytest
import torch

from conftest import train_in_process
from kiln.errors import DataError

pytestmark = pytest.mark.integration

ARGS = ["launcher=local", "model=tiny", "logger=none", "parallelism=zero0", "precision=fp32", "data.num_workers=0",
        "trainer.log_interval=1", "trainer.eval_interval=100", "trainer.run_name=safe"]


class RunsCode:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))  # creates the marker file if ever unpickled


@pytest.fixture(scope="module")
def trained(tmp_path_factory, small_dataset):
    root = tmp_path_factory.mktemp("safe")
    train_in_process([*ARGS, "trainer.max_steps=2", f"data.path={small_dataset}"], root / "run")
    (ckpt,) = sorted((root / "run-checkpoints" / "safe").glob("step_*"))
    return {"root": root, "ckpt": ckpt, "data": small_dataset}


def copy_run(trained, tmp_path):
    run = tmp_path / "run-checkpoints" / "safe"
    shutil.copytree(trained["ckpt"], run / trained["ckpt"].name)
    return run / trained["ckpt"].name


@pytest.mark.timeout(300)
@pytest.mark.parametrize("target", ["kiln/rank_0.pt", "ds/step2/mp_rank_00_model_states.pt"])
def test_a_file_that_would_run_code_is_refused_on_resume_and_export(trained, tmp_path, target):
    from kiln.checkpoint.weights import consolidated_state_dict

    ckpt = copy_run(trained, tmp_path)
    marker = tmp_path / "code-ran"
    torch.save({"module": {}, "payload": RunsCode(marker)}, ckpt / target)
    with pytest.raises(DataError, match="holds objects kiln does not load") as e:
        train_in_process([*ARGS, "trainer.max_steps=4", f"data.path={trained['data']}"], tmp_path / "run")
    assert str(ckpt / target) in str(e.value) and not marker.exists()
    if target.startswith("ds/"):
        with pytest.raises(DataError, match=str(ckpt / target)):
            consolidated_state_dict(ckpt)
        assert not marker.exists()
    assert (ckpt / target).is_file()  # never replaced, never deleted


@pytest.mark.timeout(300)
def test_a_truncated_shard_is_named_and_the_run_does_not_start_over(trained, tmp_path):
    ckpt = copy_run(trained, tmp_path)
    shard = ckpt / "ds" / "step2" / "mp_rank_00_model_states.pt"
    shard.write_bytes(shard.read_bytes()[: shard.stat().st_size // 2])
    with pytest.raises(DataError, match="cannot be read") as e:
        train_in_process([*ARGS, "trainer.max_steps=4", f"data.path={trained['data']}"], tmp_path / "run")
    assert str(shard) in str(e.value) and "earlier checkpoint" in str(e.value)
    assert sorted(p.name for p in ckpt.parent.iterdir()) == [ckpt.name]  # no fresh run saved beside it
