"""launchers/slurm/kiln.sbatch against a real Slurm (munged + slurmctld + slurmd on this machine).

The Slurm has two nodes where this machine allows network namespaces (two slurmds, each in its own
network and mount namespace, joined by one interface), else one. The test submits the sbatch
script as a user would, with Hydra overrides on the sbatch command line, preempts the job, and
reads back what was written: Slurm's record of the job (`scontrol show job`: state,
exit code, restarts), the job's output file, kiln's metrics.jsonl and summary.json, the
checkpoints in launcher.storage_path, and the process table (no Ray process of the job left).

The local Slurm (tests/cluster/slurm_cluster.py) needs the slurm-wlm and munge packages and root
(scripts/ci_system_deps.sh installs them); without them these tests skip and say what is missing.
With only one node, the training run uses two workers on it instead of one on each node.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path

import psutil
import pytest

from cluster.slurm_cluster import SlurmCluster, SlurmError, unavailable
from conftest import REPO, logged_steps, wait_for
from helpers.wandb_log import run_info
from kiln.launch.ranks import read_rank_records
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration

SBATCH = REPO / "launchers" / "slurm" / "kiln.sbatch"
# The job's own settings, as a user would export them before sbatch.
JOB_ENV = {"WANDB_MODE": "offline", "KILN_REQUEUE": "1"}


@pytest.fixture(scope="module")
def slurm():
    why = unavailable()
    if why:
        pytest.skip(why)
    failed = []
    # KILN_TEST_SLURM_NODES=1: skip the two-node (network namespace) set-up
    for nodes in (2, 1) if os.environ.get("KILN_TEST_SLURM_NODES", "2") != "1" else (1,):
        if unavailable(nodes):
            failed.append(f"{nodes} nodes: {unavailable(nodes)}")
            continue
        cluster = SlurmCluster(nodes=nodes)
        try:
            cluster.start()
            break
        except SlurmError as e:
            failed.append(str(e)[:3000])
    else:
        pytest.skip("a local Slurm (munged, slurmctld, slurmd) could not start here:\n" + "\n".join(failed))
    if failed:
        print("local Slurm with one node only:\n" + "\n".join(failed))
    yield cluster
    cluster.stop()


def submit(slurm: SlurmCluster, tmp_path: Path, overrides: list[str], nodes: int = 1) -> tuple[str, Path]:
    """sbatch the launcher as a user would; returns the job id and its output file."""
    out = tmp_path / "job.out"
    env = {**os.environ, **JOB_ENV, "KILN_WORKERS_PER_NODE": str(2 // nodes)}
    if slurm.node_local:
        env["KILN_RAY_TMPDIR"] = str(slurm.node_local)  # node-local, as /tmp is on real nodes
    job = slurm.sbatch([f"--nodes={nodes}", "--time=20", "--job-name=kiln-test", f"--output={out}",
                        f"--chdir={tmp_path}", str(SBATCH), *overrides], env=env)
    return job, out


def job_text(out: Path) -> str:
    return out.read_text(errors="replace") if out.exists() else "(no job output)"


def job_processes(slurm: SlurmCluster, job: str) -> list[str]:
    """Processes still alive from this job (its batch script, srun steps, Ray clusters, driver)."""
    left = []
    for p in psutil.process_iter():
        try:
            env = p.environ()
            if env.get("SLURM_JOB_ID") == job and env.get("SLURM_CLUSTER_NAME") == slurm.name:
                left.append(f"{p.pid} {' '.join(p.cmdline())[:120]}")
        except psutil.Error:
            pass
    return left


def assert_cleaned_up(slurm: SlurmCluster, job: str) -> None:
    try:
        wait_for(lambda: not job_processes(slurm, job), 30, f"job {job}'s processes to exit")
    except AssertionError:
        raise AssertionError("left behind:\n" + "\n".join(job_processes(slurm, job))) from None
    if slurm.node_local is None:  # else it was on the nodes' own tmpfs
        assert not list(Path("/tmp").glob(f"kiln-ray-{job}-*")), "the job's Ray temp dir was not removed"


@pytest.mark.timeout(900)
def test_sbatch_trains_on_two_nodes_is_preempted_requeues_itself_and_resumes(slurm, tmp_path):
    """One job as a user runs one: two workers, one on each of two nodes (gloo over the nodes'
    interface; both on one node where there is one), W&B offline. Then what `#SBATCH
    --signal=B:TERM@N` does at the time limit: every rank saves one checkpoint, the job requeues
    itself, the second run (same job id, same command) resumes and finishes; nothing is left."""
    run, ck = tmp_path / "run", tmp_path / "ck"
    nodes = len(slurm.nodes)
    spread = [f"launcher.socket_ifname={slurm.ifname}", "launcher.placement_strategy=STRICT_SPREAD"]
    job, out = submit(slurm, tmp_path, [
        "model=tiny", "trainer.max_steps=40", "trainer.log_interval=1", "trainer.checkpoint_interval=0",
        "logger=wandb", "data.num_workers=1", f"launcher.storage_path={ck}", f"hydra.run.dir={run}",
        *(spread if nodes > 1 else [])], nodes=nodes)

    def started():
        state = slurm.job(job).get("JobState")
        assert state in ("PENDING", "RUNNING"), f"job {job} is {state} before it was preempted:\n{job_text(out)[-6000:]}"
        return len(logged_steps(run)) >= 3

    wait_for(started, 480, "3 steps logged by the job", poll=1)
    running = job_processes(slurm, job)  # what the cleanup check below looks for, seen here alive
    assert any("raylet" in p for p in running) and any("RayTrainWorker" in p for p in running), running
    # SIGTERM to the batch shell only, as Slurm sends it at the time limit.
    slurm.run(["scancel", "--signal=TERM", "--batch", job])

    info = slurm.wait_job(job, timeout=720)
    text = job_text(out)
    assert (info["JobState"], info["ExitCode"], info["Restarts"]) == ("COMPLETED", "0:0", "1"), \
        f"{info}\n{text[-8000:]}"
    assert text.count(f"Ray cluster up: {nodes} node(s), {nodes * slurm.cpus} CPU(s)") == 2, text[-4000:]
    if nodes > 1:  # one rank on each node, both on the nodes' interface (each rank's own record)
        ranks = read_rank_records(run)
        assert [r["world_rank"] for r in ranks] == [0, 1], ranks
        assert len({r["node_id"] for r in ranks}) == 2, ranks
        assert {r["socket_ifname"] for r in ranks} == {slurm.ifname}, ranks
        assert "ranks: 2 on 2 nodes" in text
    # First run: the driver alone got the signal, every rank saved one checkpoint, then requeue.
    stops = re.findall(r"stop requested: saved a checkpoint at step (\d+)", text)
    assert len(stops) == 1, text[-8000:]
    k = int(stops[0])
    assert 3 <= k < 40  # the stop takes a second or two to reach every rank: some steps later
    assert f"requeueing job {job}" in text
    # Second run: resumes from that checkpoint, runs to max_steps.
    assert f"resumed from {ck / f'slurm-{job}' / f'step_{k:09d}'} at step {k}" in text, text[-8000:]
    assert logged_steps(run) == list(range(1, 41))  # one metrics.jsonl: steps 1..k, then k+1..40
    losses = [r["loss"] for r in read_jsonl(run / "metrics.jsonl")]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0], losses
    summary = json.loads((run / "summary.json").read_text())
    assert (summary["resumed_from_step"], summary["steps"], summary["stopped_early_at"]) == (k, 40, None)
    assert summary["world_size"] == 2
    # One W&B run across the requeue: two offline run files (one per run), one run id.
    files = sorted((run / "wandb").glob("offline-run-*/run-*.wandb"))
    assert summary["wandb"]["mode"] == "offline" and len(files) == 2, files
    assert len({run_info(f)["id"] for f in files}) == 1
    assert (ck / f"slurm-{job}" / "step_000000040").is_dir(), sorted(p.name for p in (ck / f"slurm-{job}").iterdir())
    assert_cleaned_up(slurm, job)
