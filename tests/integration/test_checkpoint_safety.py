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


def mount_namespace_tool() -> list[str] | None:
    """A command prefix that runs a shell in a private mount namespace (so the test can mount a
    small tmpfs without touching the machine's mounts), or None where that is not allowed."""
    import subprocess

    for prefix in (["unshare", "--mount"], ["unshare", "--mount", "--map-root-user"]):
        probe = subprocess.run([*prefix, "sh", "-c", "mount -t tmpfs -o size=1m tmpfs /mnt"], capture_output=True)
        if probe.returncode == 0:
            return prefix
    return None


@pytest.mark.timeout(300)
def test_a_disk_that_fills_during_a_save_fails_it_clearly_and_keeps_the_previous(tmp_path, small_dataset):
    """A 3 MiB tmpfs holds one checkpoint of the tiny model (1.8 MiB), not two: the step-4 save
    fails with kiln's error (exit 2), its partial files go, and the step-2 checkpoint stays whole."""
    import subprocess

    from conftest import REPO, assert_ok, kiln_train

    prefix = mount_namespace_tool()
    if prefix is None:
        pytest.skip("cannot mount a tmpfs here (needs root or unprivileged user namespaces)")
    disk, copy = tmp_path / "disk", tmp_path / "kept"
    disk.mkdir()
    args = ["kiln-train", *ARGS, "trainer.max_steps=4", "trainer.checkpoint_interval=2", f"data.path={small_dataset}",
            f"launcher.storage_path={disk}", f"hydra.run.dir={tmp_path / 'run'}"]
    # the tmpfs exists only inside the namespace: copy what the failed run left out of it
    script = f'mount -t tmpfs -o size=3m tmpfs {disk} && "$@"; rc=$?; cp -a {disk} {copy}; exit $rc'
    proc = subprocess.run([*prefix, "sh", "-c", script, "sh", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=240)
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    err = proc.stderr
    assert "saving the step-4 checkpoint" in err and "no space left" in err and "Traceback" not in err, err
    assert f"the previous checkpoint {disk}/safe/step_000000002 is kept" in err, err
    assert sorted(p.name for p in (copy / "safe").iterdir()) == ["step_000000002"]  # no partial step 4 left
    # the kept checkpoint is whole: the run resumes from it and finishes
    again = kiln_train([*ARGS, "trainer.max_steps=4", "trainer.checkpoint_interval=2", f"data.path={small_dataset}",
                        f"launcher.storage_path={copy}"], tmp_path / "again")
    assert_ok(again)
    assert "at step 2" in again.stdout and "done: 4 steps" in again.stdout
