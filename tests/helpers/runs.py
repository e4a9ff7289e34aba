"""Reading back what a training run wrote, shared by the run tests: its losses, whether a resumed
run continues an uninterrupted one exactly, whether its loss fell, its W&B offline run."""

from __future__ import annotations

import glob
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import logged_steps, wait_for
from helpers.wandb_log import history, run_info
from kiln.tracking.jsonl import read_jsonl


def losses(run_dir: Path) -> dict[int, dict]:
    return {r["step"]: r for r in read_jsonl(run_dir / "metrics.jsonl")}


def assert_continues(full: dict, resumed: dict, first: int, last: int, atol: float = 0.0) -> None:
    """Losses of the resumed steps equal the uninterrupted run's: bitwise with atol=0."""
    assert sorted(resumed) == list(range(first, last + 1)), sorted(resumed)
    for step in resumed:
        a, b = full[step], resumed[step]
        assert b["lr"] == a["lr"], f"lr differs at step {step}"
        if atol == 0.0:
            assert b["loss"] == a["loss"], f"step {step}: {b['loss']!r} vs {a['loss']!r} (fp32 must be bitwise)"
        else:
            assert b["loss"] == pytest.approx(a["loss"], abs=atol), f"step {step}: {b['loss']} vs {a['loss']}"


def sigterm_when(proc: subprocess.Popen, run_dir: Path, step: int, timeout: float = 300) -> tuple[int, float]:
    """SIGTERM the driver alone (as Slurm's --signal=B: does) once `step` is logged; returns its
    exit status and how long it took to exit."""
    wait_for(lambda: any(s >= step for s in logged_steps(run_dir)), timeout, f"step {step} logged", proc)
    sent = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    rc = proc.wait(timeout=120)
    return rc, time.monotonic() - sent


def check_loss_falls(records: list[dict], steps: list[int]) -> None:
    assert [r["step"] for r in records] == steps
    for r in records:
        assert {"step", "loss", "lr", "tokens_per_s", "grad_norm", "tokens"} <= set(r)
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
    first, last = records[0]["loss"], records[-1]["loss"]
    assert last < first - 0.3, f"loss did not fall: {[round(r['loss'], 3) for r in records]}"


def check_wandb_run(summary: dict, stdout: str, records: list[dict], zero_stage: int) -> None:
    """The run's one W&B offline run, read back from its transaction log, holds the logged metrics."""
    wb = summary["wandb"]
    assert wb["mode"] == "offline" and f"wandb sync {wb['dir']}" in stdout
    files = glob.glob(f"{wb['dir']}/run-*.wandb")
    assert len(files) == 1
    rows = history(files[0])
    assert [r["_step"] for r in rows] == [r["step"] for r in records]
    for row, rec in zip(rows, records):
        for key in ("loss", "lr", "tokens_per_s", "grad_norm"):
            assert row[key] == pytest.approx(rec[key])
        assert ("eval_loss" in row) == ("eval_loss" in rec)
    info = run_info(files[0])
    assert info["id"] == wb["id"] and info["project"] == "kiln"
    assert info["config"]["parallelism"]["zero_stage"] == zero_stage
