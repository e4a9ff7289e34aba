"""Shared fixtures. Tests import the installed `kiln` package; platform/ is never on sys.path."""

from __future__ import annotations

import os
import subprocess
import sys
import sysconfig
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))  # for tests/helpers


def xdist_group(item) -> str | None:
    """tests/cluster/ (each starts its own Ray cluster, Slurm or network namespaces) is one group;
    the tests named test_ray_* (kiln's Ray launcher on this host) another."""
    if Path(str(item.fspath)).parent.name == "cluster":
        return "cluster"
    return "ray" if item.name.startswith("test_ray_") else None


@pytest.hookimpl(tryfirst=True)  # before xdist's own hook reads the xdist_group markers
def pytest_collection_modifyitems(config, items):
    """Under pytest-xdist (pyproject: -n 2 --dist loadgroup) each group's tests run one at a
    time on one worker: the "ray" tests share one Ray head (the ray_head fixture) and count its
    worker processes; the "cluster" tests each start clusters of their own. Every test cluster
    has its own token (helpers/processes.py), so the two groups run beside each other, and beside
    tests that start a local Ray instance of their own (the sweep). xdist hands out the largest
    groups first, one to each worker; the single tests fill in."""
    for item in items:
        group = xdist_group(item)
        if group:
            item.add_marker(pytest.mark.xdist_group(group))


@pytest.fixture(scope="session", autouse=True)
def isolated_env(tmp_path_factory):
    """Keep W&B offline and off the network, and the default-corpus cache inside the test run
    unless the caller already points KILN_CACHE_DIR somewhere (CI reuses one)."""
    os.environ["WANDB_MODE"] = "offline"
    os.environ.pop("WANDB_API_KEY", None)
    os.environ.setdefault("KILN_CACHE_DIR", str(tmp_path_factory.mktemp("kiln-cache")))
    yield


def stdlib_files(n: int) -> list[Path]:
    """n real text files nobody here wrote: the Python stdlib's own sources."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.glob("*.py"))
    return files[:n]


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory) -> Path:
    """A byte-tokenized dataset of 60 stdlib files in ~16 shards: fast to build and to read."""
    from kiln.data.build import build_shards
    from kiln.data.tokenizer import ByteTokenizer

    out = tmp_path_factory.mktemp("data") / "stdlib60"
    build_shards([str(p) for p in stdlib_files(60)], out, ByteTokenizer(), val_fraction=0.05,
                 shard_tokens=100_000)
    return out


@pytest.fixture(scope="session")
def ray_head():
    """One Ray head node (2 CPUs, its own token and ports) for the "ray" tests that run kiln on a
    running cluster, as a user's `ray start --head` or KubeRay cluster is; started once per session
    instead of a local instance per run (`driver_env`: what a kiln-train joining it needs)."""
    from cluster.ray_cluster import RayCluster

    cluster = RayCluster()
    cluster.start_head(num_cpus=2)
    try:
        yield cluster
    finally:
        cluster.stop()


def with_storage(args: list[str], run_dir: Path) -> list[str]:
    """Checkpoints of a test run go beside its run directory, never into the repository. A test
    run is named `kiln` unless it names itself: tests that run the same command twice continue
    the named run, as users do."""
    out = list(args)
    if not any(a.startswith("launcher.storage_path=") for a in args):
        out.append(f"launcher.storage_path={run_dir.parent / (run_dir.name + '-checkpoints')}")
    if not any(a.startswith("trainer.run_name=") for a in args):
        out.append("trainer.run_name=kiln")
    return out


def kiln_train(args: list[str], run_dir: Path, timeout: float = 600, env: dict | None = None
               ) -> subprocess.CompletedProcess:
    """Run the real `kiln-train` console script; output goes to run_dir."""
    cmd = ["kiln-train", *with_storage(args, run_dir), f"hydra.run.dir={run_dir}"]
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(cmd, cwd=REPO, env=full_env, capture_output=True, text=True, timeout=timeout)
    (run_dir.parent / f"{run_dir.name}.log").write_text(proc.stdout + "\n--- stderr ---\n" + proc.stderr)
    return proc


def train_in_process(args: list[str], run_dir: Path) -> dict:
    """kiln-train's own steps for launcher=local (compose, plan on the driver, run), in this
    process and without a console script; returns the run's summary."""
    from kiln.config.compose import compose
    from kiln.launch.launcher import run
    from kiln.plan import plan_run

    return run(plan_run(compose(with_storage(args, run_dir)), run_dir))


def main_in_process(argv: list[str], capsys) -> tuple[int, str, str]:
    """kiln-train's main() as its console script calls it, in this process: for commands that
    end before launch (bad input, a dry run), without the seconds of interpreter, torch and Hydra
    start-up that a subprocess costs. Returns (exit code, stdout, stderr)."""
    from kiln.cli import train as cli

    old, sys.argv = sys.argv, ["kiln-train", *argv]
    code = 0
    try:
        cli.main()
    except SystemExit as e:
        code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    finally:
        sys.argv = old
    out = capsys.readouterr()
    return code, out.out, out.err


def assert_ok(proc: subprocess.CompletedProcess) -> None:
    assert proc.returncode == 0, f"exit {proc.returncode}\nstdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"


def compose_config(overrides: list[str]):
    """Compose conf/ exactly as kiln-train does (same schema): the TrainConfig, its values not yet
    checked (tests check them)."""
    from kiln.config.compose import compose

    return compose(overrides, check=False)


@pytest.fixture
def compose():
    return compose_config


def kiln_train_popen(args: list[str], run_dir: Path, env: dict | None = None) -> subprocess.Popen:
    """Start the real `kiln-train` without waiting (to signal or kill it mid-run)."""
    log = open(run_dir.parent / f"{run_dir.name}.log", "w")
    return subprocess.Popen(["kiln-train", *with_storage(args, run_dir), f"hydra.run.dir={run_dir}"], cwd=REPO,
                            env={**os.environ, **(env or {})}, stdout=log, stderr=subprocess.STDOUT, text=True)


def wait_for(predicate, timeout: float, what: str, proc: subprocess.Popen | None = None, poll: float = 0.2):
    import time

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"process exited ({proc.returncode}) before: {what}")
        time.sleep(poll)
    raise AssertionError(f"timed out after {timeout}s waiting for: {what}")


def logged_steps(run_dir: Path) -> list[int]:
    import json

    path = run_dir / "metrics.jsonl"
    if not path.exists():
        return []
    return [json.loads(line)["step"] for line in path.read_text().splitlines() if line.strip()]
