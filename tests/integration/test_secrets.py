"""Nothing that looks like a credential is written by a run or an export: a fake WANDB_API_KEY,
a fake token inside a `pipe:` data command (`${oc.env:...}`, as a user would pass one) and a
password typed literally in a URL on the command line; every file the run (Hydra's own saved
configs included), its checkpoint, its W&B offline run and an export wrote is searched for them."""

from __future__ import annotations

import json
import os

import pytest

from conftest import assert_ok, kiln_train

pytestmark = pytest.mark.integration

TOKEN = "tok-5up3r-s3cr3t-4f9c1e"
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex characters
PASSWORD = "hunter2-l1t3r4l"


def data_path(small_dataset) -> str:
    """A pipe: source that uses the token (the shell sees it as a variable), with a URL holding a
    password typed as is (a shell comment, so the data stays local)."""
    shards = sorted(p.name for p in small_dataset.glob("train-*.tar"))
    pattern = f"{small_dataset}/train-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"
    return ("data.path='pipe:AUTH=${oc.env:KILN_TEST_DATA_TOKEN} cat " + pattern
            + f" # https://kiln:{PASSWORD}@data.example.com/shards'")


def assert_no_secret_in(root) -> list:
    """Every file under root (names included) searched for the three secrets; returns the files."""
    files = [p for p in root.rglob("*") if p.is_file()]
    for p in root.rglob("*"):
        for secret in (TOKEN, API_KEY, PASSWORD):
            assert secret not in str(p.relative_to(root)), f"{secret} in the path {p}"
    for p in files:
        data = p.read_bytes()
        for secret in (TOKEN, API_KEY, PASSWORD):
            assert secret.encode() not in data, f"{secret} written to {p}"
    return files


ENV = {"KILN_TEST_DATA_TOKEN": TOKEN, "WANDB_API_KEY": API_KEY, "WANDB_MODE": "offline"}


@pytest.mark.timeout(300)
def test_a_sweep_writes_no_credential_either(tmp_path, small_dataset):
    """Sweep trials are named after their overrides, and Hydra saves multirun.yaml and each
    trial's overrides: none of them may hold the password, nor the trials table."""
    import subprocess

    from conftest import REPO

    cmd = ["kiln-train", "--multirun", "launcher=local", "model=tiny", "logger=wandb", "trainer.max_steps=2",
           "trainer.eval_interval=2", "trainer.eval_batches=1", "data.num_workers=0", "trainer.run_name=secret-sweep",
           "optim.lr=1e-3,2e-3", data_path(small_dataset), f"data.manifest={small_dataset}/manifest.json",
           f"data.val_path={small_dataset}", f"launcher.storage_path={tmp_path / 'ck'}",
           f"hydra.sweep.dir={tmp_path / 'sweep'}"]
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=280, env={**os.environ, **ENV})
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads((tmp_path / "sweep" / "trials.json").read_text())
    assert [r["status"] for r in rows] == ["done", "done"], rows
    files = assert_no_secret_in(tmp_path)
    assert (tmp_path / "sweep" / "multirun.yaml") in files and any(p.name.endswith(".wandb") for p in files)
    assert "<redacted>" in (tmp_path / "sweep" / "multirun.yaml").read_text()


@pytest.mark.timeout(300)
def test_no_credential_reaches_any_file(tmp_path, small_dataset):
    from kiln.checkpoint.export import export_checkpoint

    # the real kiln-train, so that Hydra saves its configs and W&B records the command line
    proc = kiln_train([
        "launcher=local", "model=tiny", "logger=wandb", "logger.mode=offline", "trainer.max_steps=3",
        "trainer.log_interval=1", "trainer.eval_interval=3", "data.num_workers=0", "trainer.run_name=secret",
        data_path(small_dataset), f"data.manifest={small_dataset}/manifest.json", f"data.val_path={small_dataset}",
    ], tmp_path / "run", env=ENV)
    assert_ok(proc)
    assert "done: 3 steps" in proc.stdout
    (ckpt,) = (tmp_path / "run-checkpoints" / "secret").glob("step_*")
    export_checkpoint(ckpt, tmp_path / "export")

    files = assert_no_secret_in(tmp_path)
    assert any(p.name.endswith(".wandb") for p in files) and any(p.name == "meta.json" for p in files)
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").exists()
    resolved = (tmp_path / "run" / "resolved_config.yaml").read_text()
    assert "AUTH=<redacted $KILN_TEST_DATA_TOKEN> cat" in resolved  # what was there, not that it was
