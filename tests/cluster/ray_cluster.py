"""Real Ray clusters for tests: nodes started with `ray start --block`, stopped by process tree.

Each node is one `ray start --block` process in its own session (process group) with its own
--temp-dir and ports. Stopping signals that process group and every descendant seen (gcs_server,
raylet, dashboard, workers, job drivers), SIGKILLs what is left, then sweeps for processes that
carry the cluster's unique token. Never `ray stop`: without arguments it kills every Ray instance
on the machine, other tests' included.

Token authentication (on by default for `ray start --head` in Ray 2.60) uses a fresh token per
cluster, passed as RAY_AUTH_TOKEN to every process of, or talking to, the cluster: the user's
~/.ray/auth_token is neither read nor written.

Network namespaces (root + iproute2) give two "machines" with their own addresses on one host:
see create_netns_pair().
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from pathlib import Path

import psutil

STARTED = "Ray runtime started"
OBJECT_STORE_BYTES = 200 * 1024 * 1024  # the default (30% of RAM) is far more than a tiny job needs


def free_ports(n: int, host: str = "127.0.0.1") -> list[int]:
    """n distinct ports free on this host right now (all sockets held until all are chosen)."""
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in socks]


def auth_env(token: str) -> dict:
    """Environment for a process that talks to the cluster with this token."""
    return {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token, "RAY_USAGE_STATS_ENABLED": "0"}


class _ignore:
    """Ignore the errors of signalling/waiting for processes that may already be gone."""

    def __enter__(self):
        return self

    def __exit__(self, typ, exc, tb):
        return typ is not None and issubclass(typ, (ProcessLookupError, PermissionError, psutil.Error,
                                                    subprocess.TimeoutExpired))


@dataclass
class RayNode:
    proc: subprocess.Popen  # `ray start --block` (its pid is also its process group id)
    temp_dir: Path
    log: Path  # ray start's own output; Ray's logs: <temp_dir>/session_latest/logs
    token: str | None = None
    netns: str | None = None

    def tree(self) -> list[psutil.Process]:
        try:
            root = psutil.Process(self.proc.pid)
            return [root, *root.children(recursive=True)]
        except psutil.NoSuchProcess:
            return []

    def log_text(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def _launch(ray_args: list[str], env: dict, tag: str, netns: str | None, timeout: float) -> RayNode:
    """`ray start --block <ray_args>` (in `netns` if given); returns once the node is up."""
    # Ray's socket paths live under --temp-dir and must stay short (unix sockets: 107 bytes).
    temp_dir = Path(tempfile.mkdtemp(prefix=f"kr-{tag}-", dir="/tmp"))
    log = temp_dir.parent / f"{temp_dir.name}.log"
    cmd = ["ray", "start", "--block", f"--temp-dir={temp_dir}", "--disable-usage-stats", *ray_args]
    if netns:
        cmd = ["ip", "netns", "exec", netns, *cmd]  # execs in place: same pid, inside the namespace
    with open(log, "w") as out:
        proc = subprocess.Popen(cmd, env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True)
    node = RayNode(proc, temp_dir, log, env.get("RAY_AUTH_TOKEN"), netns)
    deadline = time.monotonic() + timeout
    while STARTED not in node.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            text = node.log_text()
            stop_nodes([node], keep_logs=True, sweep=False)  # the token is shared with the other nodes
            raise RuntimeError(f"`ray start {' '.join(ray_args)}` did not come up (exit {proc.returncode}; "
                               f"Ray's logs: {temp_dir}/session_latest/logs):\n{text[-2500:]}")
        time.sleep(0.3)
    return node


def stop_nodes(nodes: list[RayNode], grace: float = 3, keep_logs: bool = False, sweep: bool = True) -> None:
    """SIGTERM each node's process group and process tree, SIGKILL what is left after `grace`
    seconds (gcs_server takes its time over SIGTERM), then (sweep: when these are all of a
    cluster's nodes) kill stragglers that carry one of their tokens (processes Ray put in process
    groups of their own). Only processes started here, their descendants and holders of these
    random tokens are touched."""
    procs: dict[int, psutil.Process] = {}
    for node in reversed(nodes):  # worker nodes before the head
        for p in node.tree():
            procs[p.pid] = p
    for node in nodes:
        with _ignore():
            os.killpg(node.proc.pid, signal.SIGTERM)
    for p in procs.values():
        with _ignore():
            p.terminate()
    _, alive = psutil.wait_procs(list(procs.values()), timeout=grace)
    for node in nodes:
        with _ignore():
            os.killpg(node.proc.pid, signal.SIGKILL)
    for p in alive:
        with _ignore():
            p.kill()
    psutil.wait_procs(alive, timeout=5)
    tokens = {n.token for n in nodes if n.token and sweep}
    for _ in range(3):
        left = token_holders(tokens)
        if not left:
            break
        for p in left:
            with _ignore():
                p.kill()
        psutil.wait_procs(left, timeout=5)
    for node in nodes:
        with _ignore():
            node.proc.wait(timeout=5)
        if not keep_logs:
            shutil.rmtree(node.temp_dir, ignore_errors=True)
            node.log.unlink(missing_ok=True)


def token_holders(tokens: set[str]) -> list[psutil.Process]:
    """Live processes whose environment has RAY_AUTH_TOKEN set to one of these tokens."""
    found: list[psutil.Process] = []
    if not tokens:
        return found
    for p in psutil.process_iter():
        with _ignore():
            if (p.pid != os.getpid() and p.status() != psutil.STATUS_ZOMBIE
                    and p.environ().get("RAY_AUTH_TOKEN") in tokens):
                found.append(p)
    return found


@dataclass
class RayCluster:
    """A head node and any worker nodes, one token; `client_env` is what a client needs."""

    token: str = field(default_factory=lambda: secrets.token_hex(32))
    nodes: list[RayNode] = field(default_factory=list)
    gcs: str = ""  # host:port, for launcher.address / ray.init
    dashboard: str = ""  # http://host:port, for `ray job submit --address`
    extra_env: dict = field(default_factory=dict)  # more environment for every node's processes

    @property
    def client_env(self) -> dict:
        return auth_env(self.token)

    @property
    def driver_env(self) -> dict:
        """For a kiln-train that joins this cluster as a user's would: RAY_ADDRESS and the token."""
        return {**auth_env(self.token), "RAY_ADDRESS": self.gcs}

    def node_env(self) -> dict:
        # RAY_ADDRESS: Ray Train's helper actors look the cluster up with address "auto", which
        # fails ("Found multiple active Ray instances") when other Ray instances run on this host.
        return {**auth_env(self.token), "RAY_ADDRESS": self.gcs, **self.extra_env}

    def start_head(self, num_cpus: int, node_ip: str = "127.0.0.1", netns: str | None = None) -> None:
        def args():
            gcs, dash, agent, agent_grpc, client, metrics, rt_env = free_ports(7)
            self.gcs, self.dashboard = f"{node_ip}:{gcs}", f"http://{node_ip}:{dash}"
            return ["--head", f"--node-ip-address={node_ip}", f"--port={gcs}", f"--num-cpus={num_cpus}",
                    "--num-gpus=0", "--include-dashboard=true", f"--dashboard-host={node_ip}",
                    f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}", f"--ray-client-server-port={client}",
                    f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={rt_env}",
                    f"--object-store-memory={OBJECT_STORE_BYTES}"]

        self.nodes.append(_start_node(self, args, "head", netns))

    def add_worker_node(self, num_cpus: int, node_ip: str = "127.0.0.1", netns: str | None = None) -> None:
        def args():
            agent, agent_grpc, metrics, rt_env = free_ports(4)
            return [f"--address={self.gcs}", f"--node-ip-address={node_ip}", f"--num-cpus={num_cpus}",
                    "--num-gpus=0", f"--dashboard-agent-listen-port={agent}",
                    f"--dashboard-agent-grpc-port={agent_grpc}", f"--metrics-export-port={metrics}",
                    f"--runtime-env-agent-port={rt_env}", f"--object-store-memory={OBJECT_STORE_BYTES}"]

        self.nodes.append(_start_node(self, args, "worker", netns))

    def stop(self, keep_logs: bool = False) -> None:
        stop_nodes(self.nodes, keep_logs=keep_logs)
        self.nodes.clear()


# A helper process that holds a ray.cluster_utils.Cluster (Ray's own multi-node test cluster: several
# raylets, one host, one address) until it is killed. RAY_TMPDIR keeps its address file
# (ray_current_cluster) out of /tmp/ray, where other Ray users on this host would find it.
_CLUSTER_UTILS = """
import json, sys, time
from ray.cluster_utils import Cluster
spec = json.loads(sys.argv[1])
cluster = Cluster(initialize_head=True, head_node_args=spec["head"])
nodes = [cluster.head_node] + [cluster.add_node(**spec["node"]) for _ in range(spec["more_nodes"])]
cluster.wait_for_nodes()
print("CLUSTER " + json.dumps({"gcs": cluster.gcs_address, "node_ids": [n.node_id for n in nodes]}), flush=True)
while True:
    time.sleep(3600)
"""


def start_cluster_utils(cluster: RayCluster, nodes: int, num_cpus: int, timeout: float = 180) -> list[str]:
    """`nodes` Ray nodes of `num_cpus` CPUs each on this host's address via
    ray.cluster_utils.Cluster, in a helper process (Ray's in-process state stays out of pytest);
    returns their node ids."""
    gcs_port, dash, agent = free_ports(3)
    cluster.gcs = f"127.0.0.1:{gcs_port}"
    cluster.dashboard = f"http://127.0.0.1:{dash}"
    # The nodes take this host's address (Ray maps 127.0.0.1 in an address to it, as kiln's driver
    # and RAY_ADDRESS here will); a GCS bound to 127.0.0.1 itself would be unreachable that way.
    common = {"num_cpus": num_cpus, "num_gpus": 0, "object_store_memory": OBJECT_STORE_BYTES}
    spec = {"head": {**common, "gcs_server_port": gcs_port, "include_dashboard": True, "dashboard_port": dash,
                     "dashboard_agent_listen_port": agent},
            "node": common, "more_nodes": nodes - 1}
    temp_dir = Path(tempfile.mkdtemp(prefix="kr-cu-", dir="/tmp"))
    log = temp_dir.parent / f"{temp_dir.name}.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([sys.executable, "-c", _CLUSTER_UTILS, json.dumps(spec)],
                                env={**os.environ, **cluster.node_env(), "RAY_TMPDIR": str(temp_dir)},
                                stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
    node = RayNode(proc, temp_dir, log, cluster.token)
    cluster.nodes.append(node)
    deadline = time.monotonic() + timeout
    while "CLUSTER " not in node.log_text():
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"ray.cluster_utils.Cluster did not come up (exit {proc.returncode}):\n"
                               f"{node.log_text()[-2500:]}")
        time.sleep(0.3)
    line = next(ln for ln in node.log_text().splitlines() if ln.startswith("CLUSTER "))
    info = json.loads(line.removeprefix("CLUSTER "))
    assert info["gcs"].endswith(f":{gcs_port}"), info
    cluster.gcs = info["gcs"]
    return info["node_ids"]


def _start_node(cluster: RayCluster, args, tag: str, netns: str | None) -> RayNode:
    """Start a node, retried once: on a loaded 2-core machine a raylet sometimes aborts at start-up
    because its dashboard agent took longer than Ray's fixed 15 s to report its ports. args() is
    called per attempt (fresh ports), before node_env() (whose RAY_ADDRESS names the head's port)."""
    for attempt in (1, 2):
        ray_args = args()
        try:
            return _launch(ray_args, cluster.node_env(), tag, netns, timeout=120)
        except RuntimeError as e:
            if attempt == 2:
                raise
            print(f"retrying ray start ({tag}) after: {str(e).splitlines()[0]}")
    raise AssertionError("unreachable")


# --- two "machines" on one host: network namespaces joined by a veth pair -------------------------

IFNAME = "kiln0"  # the same interface name on both sides, so one GLOO_SOCKET_IFNAME fits every node


@dataclass
class NetnsPair:
    names: tuple[str, str]
    ips: tuple[str, str]
    ifname: str = IFNAME


def netns_unavailable() -> str | None:
    """Why network namespaces cannot be made here (None: they may be; creation can still fail)."""
    if os.environ.get("KILN_TEST_NO_NETNS"):
        return "KILN_TEST_NO_NETNS is set"
    if os.geteuid() != 0:
        return "not root (ip netns needs CAP_SYS_ADMIN and CAP_NET_ADMIN)"
    if shutil.which("ip") is None:
        return "no `ip` command (iproute2)"
    return None


def _ip(*args: str) -> None:
    proc = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
    if proc.returncode != 0:
        raise RuntimeError(f"ip {' '.join(args)}: {proc.stderr.strip() or proc.stdout.strip()}")


def create_netns_pair() -> NetnsPair:
    """Two namespaces named after this process, a veth pair `kiln0` <-> `kiln0` between them with
    addresses 10.77.<n>.1 and .2, and lo up in each. Raises RuntimeError if the kernel refuses."""
    tag = f"kiln-{os.getpid()}-{secrets.token_hex(2)}"
    subnet = f"10.77.{secrets.randbelow(250) + 1}"
    pair = NetnsPair((f"{tag}-a", f"{tag}-b"), (f"{subnet}.1", f"{subnet}.2"))
    try:
        for ns in pair.names:
            _ip("netns", "add", ns)
        _ip("link", "add", IFNAME, "netns", pair.names[0], "type", "veth",
            "peer", "name", IFNAME, "netns", pair.names[1])
        for ns, ip in zip(pair.names, pair.ips):
            _ip("-n", ns, "addr", "add", f"{ip}/24", "dev", IFNAME)
            _ip("-n", ns, "link", "set", "lo", "up")
            _ip("-n", ns, "link", "set", IFNAME, "up")
    except Exception:
        delete_netns_pair(pair)
        raise
    return pair


def delete_netns_pair(pair: NetnsPair) -> None:
    """Deleting a namespace deletes the veth end inside it, and with it the peer."""
    for ns in pair.names:
        subprocess.run(["ip", "netns", "delete", ns], capture_output=True, timeout=30)


def netns_exists(name: str) -> bool:
    return Path("/run/netns", name).exists()
