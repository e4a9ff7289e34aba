"""Nothing that looks like a credential is written by a run or an export: a fake WANDB_API_KEY
and a fake token inside a `pipe:` data command (`${oc.env:...}`, as a user would pass one), and
every file the run, its checkpoint, its W&B offline run and an export wrote is searched for them."""

from __future__ import annotations

import pytest

from conftest import train_in_process

pytestmark = pytest.mark.integration

TOKEN = "tok-5up3r-s3cr3t-4f9c1e"
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex characters


@pytest.mark.timeout(300)
def test_no_credential_reaches_any_file(tmp_path, small_dataset, monkeypatch):
    from kiln.checkpoint.export import export_checkpoint

    monkeypatch.setenv("KILN_TEST_DATA_TOKEN", TOKEN)
    monkeypatch.setenv("WANDB_API_KEY", API_KEY)
    shards = sorted(p.name for p in small_dataset.glob("train-*.tar"))
    pattern = f"{small_dataset}/train-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"
    summary = train_in_process([
        "launcher=local", "model=tiny", "logger=wandb", "logger.mode=offline", "trainer.max_steps=3",
        "trainer.log_interval=1", "trainer.eval_interval=3", "data.num_workers=0", "trainer.run_name=secret",
        # the token reaches the command (the shell sees it as a variable), so the run must really use it
        "data.path='pipe:AUTH=${oc.env:KILN_TEST_DATA_TOKEN} cat " + pattern + "'",
        f"data.manifest={small_dataset}/manifest.json", f"data.val_path={small_dataset}",
    ], tmp_path / "run")
    assert summary["steps"] == 3
    (ckpt,) = (tmp_path / "run-checkpoints" / "secret").glob("step_*")
    export_checkpoint(ckpt, tmp_path / "export")

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".wandb") for p in files) and any(p.name == "meta.json" for p in files)
    for p in files:
        data = p.read_bytes()
        for secret in (TOKEN, API_KEY):
            assert secret.encode() not in data, f"{secret} written to {p}"
    resolved = (tmp_path / "run" / "resolved_config.yaml").read_text()
    assert "AUTH=<redacted $KILN_TEST_DATA_TOKEN> cat" in resolved  # what was there, not that it was
