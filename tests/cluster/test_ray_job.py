"""kiln through Ray Jobs: `ray job submit --working-dir <repo> -- kiln-train ...` against a real
`ray start --head` (own ports, --temp-dir and token), as launchers/ray-job/README.md describes.

Reads back what the job wrote to shared storage (metrics, summary, rank records, checkpoints), what
Ray uploaded (the working-dir package: no .git/outputs), and what `ray job stop` does to kiln:
SIGTERM to the driver, every rank checkpoints at one agreed step, the job ends STOPPED."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
import uuid

import pytest
import yaml

from cluster.ray_cluster import RayCluster, token_holders
from conftest import REPO, logged_steps, wait_for
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration

RUNTIME_ENV = REPO / "launchers" / "ray-job" / "runtime_env.yaml"


@pytest.fixture(scope="module")
def head():
    """One head node (2 CPUs: one per kiln worker) for every job of this module."""
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=2)
        yield cluster
    finally:
        cluster.stop()
    assert not token_holders({cluster.token}), "processes of the test cluster outlived it"


def ray_cli(cluster: RayCluster, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    """The real `ray` CLI as a user runs it: only the token in the environment (no RAY_ADDRESS)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
    return subprocess.run(["ray", *args], cwd=REPO, env={**env, **cluster.client_env},
                          capture_output=True, text=True, timeout=timeout)


def runtime_env_file(tmp_path) -> str:
    """launchers/ray-job/runtime_env.yaml plus what this test session needs in the job."""
    spec = yaml.safe_load(RUNTIME_ENV.read_text())
    spec["env_vars"].update(WANDB_MODE="offline", KILN_CACHE_DIR=os.environ["KILN_CACHE_DIR"])
    path = tmp_path / "runtime_env.yaml"
    path.write_text(yaml.safe_dump(spec))
    return str(path)


def submit(cluster: RayCluster, tmp_path, job_id: str, kiln_args: list[str], wait: bool = True,
           timeout: float = 400) -> subprocess.CompletedProcess:
    return ray_cli(cluster, "job", "submit", "--address", cluster.dashboard, "--submission-id", job_id,
                   "--working-dir", str(REPO), "--runtime-env", runtime_env_file(tmp_path),
                   *([] if wait else ["--no-wait"]), "--", "kiln-train", *kiln_args, timeout=timeout)


def parse_status(job_id: str, text: str) -> str | None:
    """A job's status as the `ray job` CLI prints it: "Job 'ID' succeeded|failed|was stopped" once
    finished (submit, stop and status all end with it), "Status for job 'ID': STATUS" before."""
    quoted = re.escape(f"'{job_id}'")
    done = re.search(rf"Job {quoted} (succeeded|failed|was stopped)", text)
    if done:
        return {"succeeded": "SUCCEEDED", "failed": "FAILED", "was stopped": "STOPPED"}[done.group(1)]
    found = re.search(rf"Status for job {quoted}: (\w+)", text)
    return found.group(1) if found else None


def job_status(cluster: RayCluster, job_id: str) -> str | None:
    proc = ray_cli(cluster, "job", "status", "--address", cluster.dashboard, job_id)
    return parse_status(job_id, proc.stdout + proc.stderr)


def job_logs(cluster: RayCluster, job_id: str) -> str:
    return ray_cli(cluster, "job", "logs", "--address", cluster.dashboard, job_id).stdout


def kiln_args(tmp_path, *extra: str) -> list[str]:
    # Named, as the guide says: submitting the same command again continues the run.
    return ["model=tiny", "launcher.num_workers=2", "data.num_workers=1", "trainer.log_interval=1",
            "trainer.run_name=kiln", f"hydra.run.dir={tmp_path / 'run'}", f"launcher.storage_path={tmp_path / 'ck'}",
            *extra]


@pytest.mark.timeout(480)
def test_ray_job_submit_trains_and_checkpoints_to_shared_storage(tmp_path, head):
    job_id = f"kiln-test-{uuid.uuid4().hex[:8]}"
    proc = submit(head, tmp_path, job_id, kiln_args(tmp_path, "trainer.max_steps=20",
                                                    "trainer.checkpoint_interval=10"))
    logs = proc.stdout  # `ray job submit` tails the job's log until it ends, then prints its status
    assert proc.returncode == 0 and parse_status(job_id, proc.stdout + proc.stderr) == "SUCCEEDED", \
        f"exit {proc.returncode}\n{proc.stdout[-5000:]}\n{proc.stderr[-3000:]}"
    assert job_status(head, job_id) == "SUCCEEDED"

    # The driver ran inside the job: it joined the job's cluster through the RAY_ADDRESS the job sets.
    assert "[kiln] Ray cluster at " in logs and "[kiln] done: 20 steps" in logs
    run, ck = tmp_path / "run", tmp_path / "ck" / "kiln"
    assert logged_steps(run) == list(range(1, 21))
    records = read_jsonl(run / "metrics.jsonl")
    assert records[-1]["loss"] < records[0]["loss"]
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["world_size"] == 2 and summary["final_loss"] == records[-1]["loss"]
    assert summary["wandb"]["mode"] == "offline" and (run / "wandb").is_dir()

    # Rank records: two ranks on the one node, and rank 0's summary line in the job's log.
    from kiln.launch.ranks import read_rank_records

    ranks = read_rank_records(run)
    assert [r["world_rank"] for r in ranks] == [0, 1] and len({r["node_id"] for r in ranks}) == 1
    assert sorted(r["local_rank"] for r in ranks) == [0, 1] and {r["node_rank"] for r in ranks} == {0}
    assert len({r["pid"] for r in ranks}) == 2 and all(r["device"] == "cpu" for r in ranks)
    # (the node's address as Ray registered it: `ray start` turns 127.0.0.1 into this host's address)
    assert f"[kiln] ranks: 2 on 1 node ({ranks[0]['node_ip']}: ranks 0,1)" in logs, \
        [ln for ln in logs.splitlines() if "ranks" in ln]

    # Checkpoints in storage, each with both ranks' shards.
    assert sorted(p.name for p in ck.glob("step_*")) == ["step_000000010", "step_000000020"]
    last = ck / "step_000000020"
    assert json.loads((last / "kiln" / "meta.json").read_text())["step"] == 20
    assert {p.name for p in (last / "kiln").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    assert len(list((last / "ds").rglob("*zero_pp_rank_*optim_states.pt"))) == 2

    # What Ray unpacked on the head: this repository without .git, outputs or checkpoints, and
    # nothing written into it by the job (every path pointed at shared storage).
    packages = [p for p in head.nodes[0].temp_dir.glob("session_latest/runtime_resources/working_dir_files/*")
                if p.is_dir()]
    assert len(packages) == 1, packages
    pkg = packages[0]
    assert (pkg / "conf" / "train.yaml").is_file() and (pkg / "launchers" / "ray-job" / "README.md").is_file()
    for absent in (".git", "outputs", "multirun", "checkpoints", "wandb"):
        assert not (pkg / absent).exists(), f"{absent} was uploaded or written in the job's working dir"


@pytest.mark.timeout(420)
def test_ray_job_stop_checkpoints_then_stops(tmp_path, head):
    """`ray job stop`: SIGTERM to kiln-train (and its children); kiln has every rank checkpoint at
    one agreed step and exits; Ray waits RAY_JOB_STOP_WAIT_TIME_S (runtime_env.yaml) before SIGKILL."""
    job_id = f"kiln-stop-{uuid.uuid4().hex[:8]}"
    proc = submit(head, tmp_path, job_id, kiln_args(tmp_path, "trainer.max_steps=1000",
                                                    "trainer.checkpoint_interval=0"), wait=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    run = tmp_path / "run"
    try:  # (the metrics file, not the `ray job` CLI: each call of that takes a second or two)
        wait_for(lambda: any(s >= 3 for s in logged_steps(run)), 300, "step 3 logged", poll=0.3)
    except AssertionError:
        raise AssertionError(f"{job_status(head, job_id)}\n{job_logs(head, job_id)[-5000:]}") from None
    sent = time.monotonic()
    stop = ray_cli(head, "job", "stop", "--address", head.dashboard, job_id, timeout=330)
    took = time.monotonic() - sent
    logs = job_logs(head, job_id)
    assert stop.returncode == 0 and parse_status(job_id, stop.stdout + stop.stderr) == "STOPPED", \
        stop.stdout + stop.stderr + logs[-4000:]

    summary = json.loads((run / "summary.json").read_text())
    k = summary["stopped_early_at"]
    assert k and k >= 3 and summary["steps"] == k, summary
    assert logged_steps(run) == list(range(1, k + 1))
    assert "SIGTERM: asking all workers to checkpoint and stop" in logs
    assert f"stop requested: saved a checkpoint at step {k}" in logs
    step = tmp_path / "ck" / "kiln" / f"step_{k:09d}"
    assert sorted(p.name for p in (tmp_path / "ck" / "kiln").glob("step_*")) == [step.name]
    assert {p.name for p in (step / "kiln").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
    assert took < 120, "ray job stop took {took:.0f}s"
    print("ray job stop: STOPPED after {took:.1f}s with a checkpoint at step {k}")
