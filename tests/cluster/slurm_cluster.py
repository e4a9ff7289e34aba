"""A real Slurm on this machine for the cluster tests: munged + slurmctld + one slurmd per node.

- nodes=1: one Slurm node, this host under its own (short) hostname at 127.0.0.1.
- nodes=2: two Slurm nodes `kn1`, `kn2` on this host, each slurmd in its own network namespace
  (the two joined by a veth pair: interface IFNAME on both sides, 10.77.0.1 and 10.77.0.2) and its
  own mount namespace with a private tmpfs at `node_local`, so that what a job keeps node-local
  (Ray's temp dir: KILN_RAY_TMPDIR) is as separate as on two machines. slurmctld runs in kn1's
  network namespace; the client commands (sbatch, squeue, ...) run there too (see `client`).

Everything it writes lives in one private directory under /tmp (munged runs as the `munge` user and
must reach its socket directory; pytest's tmp dirs are 0700 root-only): slurm.conf, the munge
socket, pid, log and state files. The daemons run in the foreground as children of this process,
on free ports, with a cluster name and first job id of their own, so several test sessions can
each run one at once; none of them touches /etc/slurm, /run/munge or a system Slurm. Client
commands find the cluster through SLURM_CONF (see `env`).

`start()` is idempotent; `stop()` cancels the cluster's jobs, kills only the daemons this object
started (by pid) and anything left of its jobs (by the SLURM_CLUSTER_NAME in their environment),
deletes its network namespaces and removes the directory. `unavailable()` says, before anything
starts, what is missing on this machine.

Facts for Debian's slurm-wlm 22.05: proctrack/linuxproc and task/none need no cgroups (slurmd still
probes /sys/fs/cgroup, hence `nsenter --net` rather than `ip netns exec`, which remounts /sys);
AuthInfo=cred_expire also sets how long a requeued job waits before it may start again (default
120 s; 10 s here); MinJobAge keeps finished jobs visible to `scontrol show job` (there is no
accounting database, so no sacct).
"""

from __future__ import annotations

import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path

DAEMONS = {"munged": "/usr/sbin/munged", "slurmctld": "/usr/sbin/slurmctld", "slurmd": "/usr/sbin/slurmd"}
CLIENTS = ("sbatch", "scontrol", "squeue", "scancel", "sinfo", "srun")
NETNS_TOOLS = ("ip", "nsenter", "unshare", "mount")
MUNGE_KEY = Path("/etc/munge/munge.key")
FINISHED = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL",
            "DEADLINE", "PREEMPTED"}
IFNAME = "kslnet0"
SUBNET = "10.77.0"


def _which(name: str) -> str | None:
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/sbin")


def unavailable(nodes: int = 1) -> str | None:
    """Why a local Slurm of this many nodes cannot run here (names what is missing), or None."""
    missing = [name for name in (*DAEMONS, *CLIENTS) if _which(name) is None]
    if missing:
        return (f"Slurm/munge not installed (missing: {', '.join(missing)}); "
                f"install slurm-wlm and munge (scripts/ci_system_deps.sh)")
    if os.geteuid() != 0:
        return "a local Slurm needs root here (slurmd runs jobs as their user; munged as user munge)"
    try:
        pwd.getpwnam("munge")
    except KeyError:
        return "no `munge` user (the munge package creates it)"
    if not MUNGE_KEY.is_file():
        return f"no munge key at {MUNGE_KEY} (the munge package creates it; or run mungekey)"
    if nodes > 1:
        missing = [name for name in NETNS_TOOLS if _which(name) is None]
        if missing:
            return f"{nodes} nodes need network namespaces (missing: {', '.join(missing)}; iproute2, util-linux)"
    return None


def free_ports(n: int) -> list[int]:
    with ExitStack() as stack:
        socks = [stack.enter_context(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) for _ in range(n)]
        for s in socks:
            s.bind(("", 0))
        return [s.getsockname()[1] for s in socks]


class SlurmError(RuntimeError):
    pass


class SlurmCluster:
    """`nodes` Slurm nodes on this host, one partition `debug`, each with this machine's CPUs."""

    def __init__(self, nodes: int = 1, cpus: int | None = None, cred_expire: int = 10):
        assert nodes in (1, 2), nodes
        self.cpus = cpus or os.cpu_count() or 1
        self.cred_expire = cred_expire
        self.host = socket.gethostname().split(".")[0]  # slurmd's name for this host: the short one
        self.name = f"kiln{os.getpid()}"
        if nodes == 1:
            self.nodes = [(self.host, "127.0.0.1")]
            self.netns: list[str] = []
        else:
            self.nodes = [(f"kn{i}", f"{SUBNET}.{i}") for i in (1, 2)]
            tag = f"ksl{os.getpid() % 10**6}"
            self.netns = [f"{tag}a", f"{tag}b"]
        self.root: Path | None = None
        self.procs: dict[str, subprocess.Popen] = {}

    # ---------------------------------------------------------------- paths and environment
    @property
    def conf(self) -> Path:
        return self.root / "slurm.conf"

    @property
    def munge_socket(self) -> Path:
        return self.root / "munge" / "munge.socket"

    @property
    def node_local(self) -> Path | None:
        """A directory that is private to each node (a tmpfs per slurmd), or None with one node.
        Short on purpose: Ray's unix sockets go below it (107 bytes at most)."""
        return self.root / "n" if self.netns else None

    @property
    def ifname(self) -> str | None:
        """The network interface between the nodes (None with one node)."""
        return IFNAME if self.netns else None

    def _in_netns(self, i: int) -> list[str]:
        return ["nsenter", f"--net=/var/run/netns/{self.netns[i]}"] if self.netns else []

    @property
    def client(self) -> list[str]:
        """Prefix for client commands: where slurmctld can be reached."""
        return self._in_netns(0)

    def env(self, base: dict | None = None) -> dict:
        """An environment in which sbatch/squeue/scontrol/... talk to this cluster."""
        env = dict(os.environ if base is None else base)
        env["SLURM_CONF"] = str(self.conf)
        env["PATH"] = env.get("PATH", "") + ":/usr/sbin:/sbin"
        for var in [v for v in env if v.startswith(("SLURM_", "SBATCH_", "SRUN_", "SALLOC_"))]:
            if var != "SLURM_CONF":  # never inherit another allocation's job variables
                del env[var]
        return env

    # ---------------------------------------------------------------- lifecycle
    def start(self, timeout: float = 60) -> "SlurmCluster":
        if self.root is not None and self.procs and all(p.poll() is None for p in self.procs.values()):
            return self  # already running
        why = unavailable(len(self.nodes))
        if why:
            raise SlurmError(why)
        self.stop()
        self.root = Path(tempfile.mkdtemp(prefix="ksl-", dir="/tmp"))
        os.chmod(self.root, 0o755)
        try:
            self._start_munge(timeout)
            if self.netns:
                self._make_netns()
            self._write_conf()
            self._start_slurm(timeout)
        except BaseException as e:
            logs = self.logs()
            self.stop()
            if isinstance(e, (SlurmError, OSError, subprocess.SubprocessError)):
                raise SlurmError(f"local Slurm ({len(self.nodes)} node(s)) did not start: {e}\n{logs}") from None
            raise
        return self

    def _spawn(self, name: str, cmd: list[str], user: str | None = None) -> subprocess.Popen:
        out = open(self.root / f"{name}.out", "w")
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True, user=user, env=self.env())
        out.close()
        self.procs[name] = proc
        return proc

    def _start_munge(self, timeout: float) -> None:
        mdir = self.root / "munge"
        mdir.mkdir(mode=0o755)
        munge = pwd.getpwnam("munge")
        os.chown(mdir, munge.pw_uid, munge.pw_gid)
        proc = self._spawn("munged", [
            DAEMONS["munged"], "--foreground", f"--socket={self.munge_socket}",
            f"--pid-file={mdir / 'munged.pid'}", f"--log-file={mdir / 'munged.log'}",
            f"--seed-file={mdir / 'munged.seed'}", f"--key-file={MUNGE_KEY}", "--num-threads=2",
        ], user="munge")
        self._wait(lambda: self.munge_socket.is_socket(), timeout, "munged's socket", proc)

    def _ip(self, *args: str) -> None:
        out = subprocess.run(["ip", *args], capture_output=True, text=True, timeout=30)
        if out.returncode != 0:
            raise SlurmError(f"ip {' '.join(args)}: {out.stderr.strip()}")

    def _make_netns(self) -> None:
        """Two network namespaces joined by a veth pair, named IFNAME on both sides."""
        a, b = self.netns
        for ns in (a, b):
            self._ip("netns", "add", ns)
        self._ip("link", "add", f"{a}v", "type", "veth", "peer", "name", f"{b}v")
        for ns, (_, addr) in zip((a, b), self.nodes):
            self._ip("link", "set", f"{ns}v", "netns", ns)
            self._ip("-n", ns, "link", "set", f"{ns}v", "name", IFNAME)
            self._ip("-n", ns, "addr", "add", f"{addr}/24", "dev", IFNAME)
            self._ip("-n", ns, "link", "set", IFNAME, "up")
            self._ip("-n", ns, "link", "set", "lo", "up")

    def _write_conf(self) -> None:
        ctld_port, slurmd_port = free_ports(2)
        r = self.root
        for d in ("state", "spool", "n"):
            (r / d).mkdir()
        mem = 1024
        try:
            mem = max(256, int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**20 * 0.8))
        except (ValueError, OSError):
            pass
        names = ",".join(n for n, _ in self.nodes)
        self.conf.write_text("\n".join([
            f"ClusterName={self.name}",
            # job ids of their own: another test session's local Slurm also starts counting at 1
            f"FirstJobId={random.randint(1_000, 900_000)}",
            f"SlurmctldHost={self.host}({self.nodes[0][1]})",  # no name lookup needed
            "SlurmUser=root",
            "SlurmdUser=root",
            f"SlurmctldPort={ctld_port}",
            f"SlurmdPort={slurmd_port}",
            "AuthType=auth/munge",
            "CredType=cred/munge",
            f"AuthInfo=socket={self.munge_socket},cred_expire={self.cred_expire}",
            f"StateSaveLocation={r / 'state'}",
            f"SlurmdSpoolDir={r / 'spool'}/%n",
            f"SlurmctldPidFile={r / 'slurmctld.pid'}",
            f"SlurmdPidFile={r / 'slurmd-%n.pid'}",
            f"SlurmctldLogFile={r / 'slurmctld.log'}",
            f"SlurmdLogFile={r / 'slurmd-%n.log'}",
            "SlurmctldDebug=info",
            "SlurmdDebug=info",
            "DebugFlags=NO_CONF_HASH",
            "ProctrackType=proctrack/linuxproc",
            "TaskPlugin=task/none",
            "SelectType=select/cons_tres",
            "SelectTypeParameters=CR_Core",
            "SchedulerType=sched/backfill",
            "SchedulerParameters=sched_interval=2",
            "MpiDefault=none",
            "SwitchType=switch/none",
            "JobAcctGatherType=jobacct_gather/none",
            "AccountingStorageType=accounting_storage/none",
            "JobCompType=jobcomp/none",
            "ReturnToService=2",
            "MinJobAge=3600",
            "KillWait=15",
            "InactiveLimit=0",
            "JobRequeue=1",
            *[f"NodeName={n} NodeAddr={addr} CPUs={self.cpus} RealMemory={mem} State=UNKNOWN"
              for n, addr in self.nodes],
            f"PartitionName=debug Nodes={names} Default=YES MaxTime=INFINITE State=UP",
            "",
        ]))

    def _start_slurm(self, timeout: float) -> None:
        ctld = self._spawn("slurmctld", [*self.client, DAEMONS["slurmctld"], "-D", "-i", "-f", str(self.conf)])
        self._wait(lambda: "UP" in self.run(["scontrol", "ping"], check=False).stdout, timeout,
                   "slurmctld to answer", ctld)
        for i, (node, _) in enumerate(self.nodes):
            (self.root / "spool" / node).mkdir()
            cmd = [DAEMONS["slurmd"], "-D", "-f", str(self.conf)]
            if self.netns:
                # its own network namespace, and a private tmpfs at node_local in its own mount namespace
                cmd = [*self._in_netns(i), "unshare", "--mount", "sh", "-c",
                       'mount -t tmpfs tmpfs "$1" && shift && exec "$@"', "sh", str(self.node_local),
                       *cmd, "-N", node]
            self._spawn(f"slurmd-{node}", cmd)
        self._wait(self._nodes_ready, timeout, "every node to be idle", ctld)

    def _nodes_ready(self) -> bool:
        for name, proc in self.procs.items():
            if name.startswith("slurmd") and proc.poll() is not None:
                raise SlurmError(f"{name} exited ({proc.returncode}):\n{self.logs()}")
        out = self.run(["sinfo", "-h", "-N", "-o", "%N %T"], check=False).stdout.split("\n")
        states = dict(line.split() for line in out if line.strip())
        return all(states.get(n) in ("idle", "mixed", "allocated") for n, _ in self.nodes)

    def _wait(self, pred, timeout: float, what: str, proc: subprocess.Popen) -> None:
        deadline = time.monotonic() + timeout
        while not pred():
            if proc.poll() is not None:
                raise SlurmError(f"{proc.args[0]} exited ({proc.returncode}) before {what}:\n{self.logs()}")
            if time.monotonic() > deadline:
                raise SlurmError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")
            time.sleep(0.3)

    def logs(self, tail: int = 3000) -> str:
        if self.root is None or not self.root.exists():
            return ""
        parts = []
        for f in sorted([*self.root.glob("*.out"), *self.root.glob("*.log"), *self.root.glob("munge/*.log")]):
            try:
                text = f.read_text(errors="replace")
            except OSError:
                continue
            if text.strip():
                parts.append(f"--- {f.name} ---\n{text[-tail:]}")
        return "\n".join(parts)

    def stop(self) -> None:
        """Cancel this cluster's jobs (a test that timed out may leave one running), stop the
        daemons this object started (slurmd, slurmctld, munged), delete its network namespaces
        and remove its files."""
        if self.root is not None and self.procs and all(p.poll() is None for p in self.procs.values()):
            self._cancel_jobs()
        self._kill_job_leftovers()
        order = [n for n in self.procs if n.startswith("slurmd")] + ["slurmctld", "munged"]
        for name in order:
            proc = self.procs.pop(name, None)
            if proc is None or proc.poll() is not None:
                continue
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=10)
        for ns in self.netns:  # deleting a namespace deletes its end of the veth pair, and so both
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, timeout=30)
        if self.root is not None:
            shutil.rmtree(self.root, ignore_errors=True)
            self.root = None

    def _cancel_jobs(self, timeout: float = 60) -> None:
        try:
            ids = self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.split()
            if not ids:
                return
            self.run(["scancel", *ids], check=False)
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline and self.run(["squeue", "-h", "-o", "%i"], check=False).stdout.strip():
                time.sleep(1)
        except (subprocess.SubprocessError, OSError):
            pass

    def _kill_job_leftovers(self) -> None:
        """SIGKILL any process still running for a job of this cluster (found by the
        SLURM_CLUSTER_NAME Slurm puts in every job's environment; nothing else carries it)."""
        import psutil

        me = os.getpid()
        for p in psutil.process_iter():
            try:
                if p.pid != me and p.environ().get("SLURM_CLUSTER_NAME") == self.name:
                    p.kill()
            except psutil.Error:
                pass

    # ---------------------------------------------------------------- jobs
    def run(self, cmd: list[str], env: dict | None = None, check: bool = True, **kw) -> subprocess.CompletedProcess:
        """A client command (sbatch, squeue, scontrol, scancel, ...) against this cluster."""
        proc = subprocess.run([*self.client, *cmd], env=self.env(env), capture_output=True, text=True,
                              timeout=60, **kw)
        if check and proc.returncode != 0:
            raise SlurmError(f"{' '.join(cmd)} -> exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}")
        return proc

    def sbatch(self, args: list[str], env: dict | None = None, cwd: Path | None = None) -> str:
        out = self.run(["sbatch", "--parsable", *args], env=env, cwd=cwd)
        return out.stdout.strip().split(";")[0]

    def job(self, job_id: str) -> dict[str, str]:
        """`scontrol show job` as a dict (JobState, ExitCode, Restarts, ...); {} once it is gone."""
        out = self.run(["scontrol", "show", "job", "--oneliner", job_id], check=False)
        if out.returncode != 0 or not out.stdout.strip():
            return {}
        return dict(re.findall(r"(\w+(?::\w+)?)=(\S*)", out.stdout.strip().splitlines()[0]))

    def wait_job(self, job_id: str, timeout: float, poll: float = 1.0) -> dict[str, str]:
        """Poll until the job has finished for good (not requeued); returns its final record."""
        deadline = time.monotonic() + timeout
        info: dict[str, str] = {}
        while time.monotonic() < deadline:
            info = self.job(job_id)
            if info.get("JobState") in FINISHED:
                return info
            time.sleep(poll)
        raise AssertionError(f"job {job_id} not finished after {timeout}s: {info}")
