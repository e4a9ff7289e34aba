"""kiln on a real two-node Ray cluster: two network namespaces joined by a veth pair are two
"machines" with their own addresses (10.77.n.1 and .2) and an interface of the same name (kiln0)
on one host and one filesystem. A Ray head runs in one, a Ray worker node in the other, 1 CPU each,
so a 2-worker STRICT_SPREAD job has to use both; the driver runs in the head's namespace with
launcher.socket_ifname=kiln0, and gloo's traffic between the ranks can only cross the veth pair.

Where namespaces cannot be made (not root, no iproute2, a kernel that refuses, or
KILN_TEST_NO_NETNS=1) the test says so and runs the same job on Ray's own multi-node test cluster
(ray.cluster_utils.Cluster: two raylets of 1 CPU on one address), checking the two workers ran on
two Ray nodes. Either way it reads back the rank records, metrics and both ranks' checkpoint shards."""

from __future__ import annotations

import json
import os
import subprocess
import warnings
from pathlib import Path
from types import SimpleNamespace

import pytest

from cluster.ray_cluster import (IFNAME, RayCluster, create_netns_pair, delete_netns_pair, netns_exists,
                                 netns_unavailable, start_cluster_utils, token_holders)
from conftest import REPO, assert_ok, logged_steps
from kiln.launch.ranks import describe_ranks, read_rank_records, write_rank_record

pytestmark = pytest.mark.integration

KILN = ["model=tiny", "trainer.max_steps=20", "launcher.num_workers=2", "data.num_workers=1", "trainer.run_name=kiln",
        "trainer.log_interval=1", "trainer.checkpoint_interval=10", "launcher.placement_strategy=STRICT_SPREAD"]


def run_kiln(prefix: list[str], args: list[str], tmp_path: Path, cluster: RayCluster) -> subprocess.CompletedProcess:
    """The real kiln-train (after `prefix`, e.g. `ip netns exec NS`), joining `cluster`."""
    run = tmp_path / "run"
    cmd = [*prefix, "kiln-train", *KILN, *args, f"launcher.address={cluster.gcs}",
           f"hydra.run.dir={run}", f"launcher.storage_path={tmp_path / 'ck'}"]
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(cmd, cwd=REPO, env={**env, **cluster.client_env}, capture_output=True, text=True,
                          timeout=360)
    (tmp_path / "run.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def check_two_rank_run(tmp_path: Path, proc: subprocess.CompletedProcess) -> list[dict]:
    """What every two-node run must have written; returns the rank records."""
    assert_ok(proc)
    run, ck = tmp_path / "run", tmp_path / "ck" / "kiln"
    assert logged_steps(run) == list(range(1, 21))
    summary = json.loads((run / "summary.json").read_text())
    assert summary["steps"] == 20 and summary["world_size"] == 2
    for step in (10, 20):
        d = ck / f"step_{step:09d}"
        assert json.loads((d / "kiln" / "meta.json").read_text())["step"] == step
        assert {p.name for p in (d / "kiln").glob("rank_*.pt")} == {"rank_0.pt", "rank_1.pt"}
        assert len(list((d / "ds").rglob("*zero_pp_rank_*optim_states.pt"))) == 2
    ranks = read_rank_records(run)
    assert [r["world_rank"] for r in ranks] == [0, 1] and all(r["world_size"] == 2 for r in ranks)
    assert len({r["node_id"] for r in ranks}) == 2, ranks  # two Ray nodes
    line = [ln for ln in proc.stdout.splitlines() if "[kiln] ranks:" in ln]
    assert len(line) == 1 and "ranks: 2 on 2 nodes (" in line[0], line
    return ranks


@pytest.mark.timeout(480)
def test_kiln_trains_across_two_ray_nodes(tmp_path):
    why = netns_unavailable()
    pair = None
    if why is None:
        try:
            pair = create_netns_pair()
        except RuntimeError as e:
            why = f"creating them failed: {e}"
    if pair is None:
        message = (f"network namespaces unavailable ({why}); falling back to ray.cluster_utils.Cluster: "
                   f"two Ray nodes on one address")
        print(message)
        warnings.warn(message)
        two_nodes_one_address(tmp_path)
        return
    try:
        two_nodes_in_namespaces(tmp_path, pair)
    finally:
        delete_netns_pair(pair)
    assert not any(netns_exists(ns) for ns in pair.names)


def two_nodes_in_namespaces(tmp_path: Path, pair) -> None:
    (ns_head, ns_worker), (ip_head, ip_worker) = pair.names, pair.ips
    cluster = RayCluster()
    try:
        cluster.start_head(num_cpus=1, node_ip=ip_head, netns=ns_head)
        cluster.add_worker_node(num_cpus=1, node_ip=ip_worker, netns=ns_worker)
        proc = run_kiln(["ip", "netns", "exec", ns_head], [f"launcher.socket_ifname={IFNAME}"], tmp_path, cluster)
        ranks = check_two_rank_run(tmp_path, proc)
    finally:
        cluster.stop()
    assert not token_holders({cluster.token}), "processes of the test cluster outlived it"

    # One rank per node: node ranks 0 and 1 (rank 0 on node 0), local rank 0 on each, each on its
    # own address, both told to use the shared interface name.
    assert {r["node_ip"] for r in ranks} == {ip_head, ip_worker}, ranks
    assert [r["node_rank"] for r in ranks] == [0, 1] and [r["local_rank"] for r in ranks] == [0, 0], ranks
    assert all(r["socket_ifname"] == IFNAME and r["device"] == "cpu" for r in ranks), ranks
    line = next(ln for ln in proc.stdout.splitlines() if "[kiln] ranks:" in ln)
    by_ip = {r["node_ip"]: r["world_rank"] for r in ranks}
    assert f"{ip_head}: rank {by_ip[ip_head]}" in line and f"{ip_worker}: rank {by_ip[ip_worker]}" in line, line
    assert line.endswith(f"| socket interface {IFNAME}"), line


def two_nodes_one_address(tmp_path: Path) -> None:
    cluster = RayCluster()
    try:
        node_ids = start_cluster_utils(cluster, nodes=2, num_cpus=1)
        proc = run_kiln([], [], tmp_path, cluster)
        ranks = check_two_rank_run(tmp_path, proc)
    finally:
        cluster.stop()
    assert not token_holders({cluster.token}), "processes of the test cluster outlived it"
    assert {r["node_id"] for r in ranks} == set(node_ids), (ranks, node_ids)


@pytest.mark.timeout(30)
def test_rank_records_written_read_and_described(tmp_path, monkeypatch):
    """kiln.launch.ranks without Ray: one file per rank, stale ranks of a larger earlier run
    removed by rank 0, and the one-line description rank 0 prints."""

    def record(rank, node_rank, ip, node_id, ifname="eth0"):
        return {"world_rank": rank, "world_size": 3, "local_rank": rank % 2, "node_rank": node_rank,
                "node_ip": ip, "node_id": node_id, "hostname": "h", "pid": 100 + rank, "device": "cpu",
                "socket_ifname": ifname}

    (tmp_path / "ranks").mkdir()
    (tmp_path / "ranks" / "rank_7.json").write_text("{}")  # from an earlier run with 8 ranks
    records = [record(0, 0, "10.0.0.1", "a"), record(1, 0, "10.0.0.1", "a"), record(2, 1, "10.0.0.2", "b")]
    for r in reversed(records):  # rank 0 last: it clears what is beyond the world size
        write_rank_record(tmp_path, r)
    assert sorted(p.name for p in (tmp_path / "ranks").iterdir()) == ["rank_0.json", "rank_1.json", "rank_2.json"]
    assert read_rank_records(tmp_path) == records
    assert describe_ranks(records) == "3 on 2 nodes (10.0.0.1: ranks 0,1; 10.0.0.2: rank 2) | socket interface eth0"
    # Two Ray nodes on one address are still two nodes; no interface set: nothing said about it.
    same_ip = [record(0, 0, "127.0.0.1", "a", None), record(1, 0, "127.0.0.1", "b", None)]
    assert describe_ranks(same_ip) == "2 on 2 nodes (127.0.0.1: rank 0; 127.0.0.1: rank 1)"
    # The record a worker builds from its Context.
    from kiln.launch.ranks import rank_record

    ctx = SimpleNamespace(rank=1, world_size=2, local_rank=0, node_rank=1, device="cpu")
    monkeypatch.delenv("GLOO_SOCKET_IFNAME", raising=False)
    monkeypatch.delenv("NCCL_SOCKET_IFNAME", raising=False)
    mine = rank_record(ctx, "10.0.0.2", "b")
    assert mine["pid"] == os.getpid() and mine["socket_ifname"] is None and mine["node_rank"] == 1
