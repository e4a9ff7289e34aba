"""Nothing that looks like a credential is written by a run or an export: a fake WANDB_API_KEY,
a fake token inside a `pipe:` data command (`${oc.env:...}`, as a user would pass one) and a
password typed literally in a URL on the command line; every file the run (Hydra's own saved
configs included), its checkpoint, its W&B offline run and an export wrote is searched for them."""

from __future__ import annotations

import pytest

from conftest import assert_ok, kiln_train

pytestmark = pytest.mark.integration

TOKEN = "tok-5up3r-s3cr3t-4f9c1e"
API_KEY = "0123456789abcdef0123456789abcdef01234567"  # W&B keys are 40 hex characters
PASSWORD = "hunter2-l1t3r4l"


@pytest.mark.timeout(300)
def test_no_credential_reaches_any_file(tmp_path, small_dataset):
    from kiln.checkpoint.export import export_checkpoint

    shards = sorted(p.name for p in small_dataset.glob("train-*.tar"))
    pattern = f"{small_dataset}/train-{{{shards[0][6:12]}..{shards[-1][6:12]}}}.tar"
    # the real kiln-train, so that Hydra saves its configs and W&B records the command line
    proc = kiln_train([
        "launcher=local", "model=tiny", "logger=wandb", "logger.mode=offline", "trainer.max_steps=3",
        "trainer.log_interval=1", "trainer.eval_interval=3", "data.num_workers=0", "trainer.run_name=secret",
        # the token reaches the command (the shell sees it as a variable), so the run must really use it
        # ...and a URL with a password, typed as is (a shell comment here, so the data stays local)
        "data.path='pipe:AUTH=${oc.env:KILN_TEST_DATA_TOKEN} cat " + pattern
        + f" # https://kiln:{PASSWORD}@data.example.com/shards'",
        f"data.manifest={small_dataset}/manifest.json", f"data.val_path={small_dataset}",
    ], tmp_path / "run", env={"KILN_TEST_DATA_TOKEN": TOKEN, "WANDB_API_KEY": API_KEY, "WANDB_MODE": "offline"})
    assert_ok(proc)
    assert "done: 3 steps" in proc.stdout
    (ckpt,) = (tmp_path / "run-checkpoints" / "secret").glob("step_*")
    export_checkpoint(ckpt, tmp_path / "export")

    files = [p for p in tmp_path.rglob("*") if p.is_file()]
    assert any(p.name.endswith(".wandb") for p in files) and any(p.name == "meta.json" for p in files)
    assert (tmp_path / "run" / ".hydra" / "overrides.yaml").exists()
    for p in files:
        data = p.read_bytes()
        for secret in (TOKEN, API_KEY, PASSWORD):
            assert secret.encode() not in data, f"{secret} written to {p}"
    resolved = (tmp_path / "run" / "resolved_config.yaml").read_text()
    assert "AUTH=<redacted $KILN_TEST_DATA_TOKEN> cat" in resolved  # what was there, not that it was
