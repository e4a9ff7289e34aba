"""A non-editable install works from any directory: an sdist of this working tree is built, a
wheel is built from that sdist (what `pip install kiln-*.tar.gz` does), and the wheel goes into a
fresh venv. From an unrelated directory, the venv's `kiln-train` composes the config tree shipped
inside the wheel, trains for real, and finds a user's own config groups through KILN_CONFIG_PATH
and through `hydra.searchpath`.

The venv sees the system site-packages (torch, DeepSpeed, Ray... nothing is downloaded), which
also hold the editable kiln of this checkout; the wheel is installed with --ignore-installed into
the venv's own site-packages, which come first on sys.path, and every check asserts that the
kiln it ran is the venv's."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tarfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import yaml

from conftest import REPO, assert_ok

# One worker builds the install once for the whole module (pyproject: -n 2 --dist loadgroup).
pytestmark = [pytest.mark.integration, pytest.mark.xdist_group("install")]


def sh(cmd: list[str], cwd: Path, env: dict | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([str(c) for c in cmd], cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert_ok(proc)
    return proc


def working_tree_copy(dest: Path) -> Path:
    """The files a fresh clone of this working tree has (tracked and new, not git-ignored): no
    build/, egg-info or conf/local/*.yaml of this checkout leaks into the package."""
    listed = sh(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], REPO).stdout
    for rel in filter(None, listed.split("\0")):
        src = REPO / rel
        if src.is_file():  # (a tracked file deleted in the working tree is skipped)
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


class Install:
    def __init__(self, root: Path, sdist: Path, wheel: Path, venv: Path):
        self.root, self.sdist, self.wheel, self.venv = root, sdist, wheel, venv
        self.bin = venv / "bin"
        self.elsewhere = root / "elsewhere"  # the cwd of every command: not the repository
        self.elsewhere.mkdir()

    def env(self, **extra: str) -> dict:
        env = {k: v for k, v in os.environ.items()
               if k not in ("PYTHONPATH", "KILN_CONFIG_DIR", "KILN_CONFIG_PATH", "VIRTUAL_ENV")}
        env["PATH"] = f"{self.bin}{os.pathsep}{env.get('PATH', '')}"
        return {**env, **extra}

    def kiln_train(self, *args: str, timeout: float = 120, **env: str) -> subprocess.CompletedProcess:
        return sh([self.bin / "kiln-train", *args], self.elsewhere, self.env(**env), timeout)

    def job(self, *args: str, **env: str) -> dict:
        """The composed job config (`--cfg job`), parsed."""
        return yaml.safe_load(self.kiln_train("--cfg", "job", *args, **env).stdout)


@pytest.fixture(scope="module")
def install(tmp_path_factory) -> Install:
    root = tmp_path_factory.mktemp("install")
    tree = working_tree_copy(root / "tree")
    offline = ["--no-index", "--no-deps", "--no-build-isolation", "--disable-pip-version-check"]
    code = "import sys; from setuptools import build_meta as b; print(b.build_sdist(sys.argv[1]))"
    name = sh([sys.executable, "-c", code, root / "sdist"], tree).stdout.split()[-1]
    sdist = root / "sdist" / name
    sh([sys.executable, "-m", "pip", "wheel", *offline, "-q", "-w", root / "wheel", sdist], root)
    (wheel,) = (root / "wheel").glob("kiln-*.whl")
    venv = root / "venv"
    sh([sys.executable, "-m", "venv", "--system-site-packages", "--without-pip", venv], root)
    # The system site-packages' pip installs into the venv it runs under; --ignore-installed: the
    # editable kiln there counts as "already installed" otherwise, and is left alone.
    sh([venv / "bin" / "python", "-m", "pip", "install", *offline, "-q", "--ignore-installed", wheel], root)
    return Install(root, sdist, wheel, venv)


def test_wheel_and_sdist_ship_the_config_tree(install):
    tracked = sh(["git", "ls-files", "conf", "platform/kiln"], REPO).stdout.split()
    confs = {p for p in tracked if p.endswith(".yaml") and not p.startswith("conf/local/")}
    sources = {p for p in tracked if p.endswith(".py")}
    assert "conf/train.yaml" in confs and len(confs) > 20
    with zipfile.ZipFile(install.wheel) as whl:
        names = set(whl.namelist())
    assert {"kiln/" + p for p in confs} <= names, "a conf/ yaml is missing from the wheel"
    # pyproject lists the packages: one missing there would drop its modules from the wheel.
    missing = {p for p in sources if p.removeprefix("platform/") not in names}
    assert not missing, f"not in the wheel (add the package to pyproject's packages): {sorted(missing)}"
    assert not any(n.startswith("kiln/conf/local/") for n in names)  # machine-specific, never shipped
    with tarfile.open(install.sdist) as sd:
        top = sd.getnames()[0].split("/")[0]
        members = set(sd.getnames())
    assert {f"{top}/{p}" for p in confs} <= members


def test_venv_imports_the_wheel_not_the_checkout(install):
    code = "import kiln, kiln.cli.train as t; print(kiln.__file__); print(t.config_dir())"
    out = sh([install.bin / "python", "-c", code], install.elsewhere, install.env()).stdout.split()
    site = install.venv / "lib"
    assert Path(out[0]).is_relative_to(site), out
    assert Path(out[1]) == Path(out[0]).parent / "conf" and (Path(out[1]) / "train.yaml").is_file()
    searchpath = install.kiln_train("--info", "searchpath").stdout
    assert f"file://{Path(out[1])}" in searchpath and str(REPO) not in searchpath


def test_composes_the_shipped_config_from_anywhere(install):
    cfg = install.job()
    assert cfg["model"]["name"] == "tiny" and cfg["launcher"]["name"] == "ray"
    assert cfg["parallelism"]["zero_stage"] == 2 and cfg["logger"]["name"] == "wandb"
    cfg = install.job("experiment=debug", "model=gpt2-small")
    assert cfg["launcher"]["name"] == "local" and cfg["model"]["n_layer"] == 12


USER_MODEL = """\
name: mine
n_layer: 1
n_head: 2
n_embd: 32
block_size: 64
vocab_size: null
dropout: 0.0
bias: true
init_from: null
"""

USER_EXPERIMENT = """\
# @package _global_
defaults:
  - override /model: mine
  - override /launcher: local
trainer:
  max_steps: 3
"""


@pytest.fixture
def user_dir(tmp_path) -> Path:
    """A user's own groups, beside none of kiln's: a model, an experiment and local settings."""
    files = {"model/mine.yaml": USER_MODEL, "experiment/mine.yaml": USER_EXPERIMENT,
             "local/default.yaml": "# @package _global_\noptim: {lr: 0.00123}\n"}
    for rel, text in files.items():
        (tmp_path / "user" / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "user" / rel).write_text(text)
    return tmp_path / "user"


def test_user_groups_from_kiln_config_path(install, user_dir, tmp_path):
    other = tmp_path / "other"
    (other / "logger").mkdir(parents=True)
    (other / "logger" / "quiet.yaml").write_text("name: none\n")
    path = os.pathsep.join([str(user_dir), str(other)])
    cfg = install.job("experiment=mine", "logger=quiet", KILN_CONFIG_PATH=path)
    assert cfg["model"]["name"] == "mine" and cfg["model"]["n_layer"] == 1
    assert cfg["launcher"]["name"] == "local" and cfg["trainer"]["max_steps"] == 3
    assert cfg["logger"]["name"] == "none"
    assert cfg["optim"]["lr"] == 0.00123  # the optional `local: default`, from the user's directory
    # kiln's own options win over a user's of the same name (the user's tree is searched after).
    (user_dir / "model" / "tiny.yaml").write_text(USER_MODEL.replace("mine", "tiny"))
    assert install.job("model=tiny", KILN_CONFIG_PATH=str(user_dir))["model"]["n_layer"] == 2
    assert install.job()["optim"]["lr"] != 0.00123  # nothing of the user's without the variable


def test_user_groups_from_hydra_searchpath(install, user_dir):
    cfg = install.job(f"hydra.searchpath=[file://{user_dir}]", "model=mine")
    assert cfg["model"]["name"] == "mine" and cfg["optim"]["lr"] == 0.00123


def test_kiln_config_dir_replaces_the_whole_tree(install, tmp_path):
    tree = shutil.copytree(REPO / "conf", tmp_path / "conf", ignore=shutil.ignore_patterns("local"))
    (tree / "model" / "tiny.yaml").write_text((tree / "model" / "tiny.yaml").read_text()
                                              .replace("n_layer: 2", "n_layer: 5"))
    assert install.job(KILN_CONFIG_DIR=str(tree))["model"]["n_layer"] == 5


@pytest.mark.timeout(900)  # the first DeepSpeed run on a machine JIT-compiles its CPU ops
def test_trains_from_the_wheel(install, small_dataset):
    proc = install.kiln_train("launcher=local", "model=tiny", "trainer.max_steps=2", "logger=none",
                              "trainer.log_interval=1", "data.num_workers=0", f"data.path={small_dataset}",
                              timeout=600)
    runs = list((install.elsewhere / "outputs" / "unnamed").glob("*/summary.json"))
    assert len(runs) == 1, proc.stdout  # outputs/ under the working directory, as from a checkout
    out = runs[0].parent
    summary = json.loads(runs[0].read_text())
    assert summary["steps"] == 2 and summary["final_loss"] > 0 and summary["output_dir"] == str(out)
    steps = [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2]
    assert yaml.safe_load((out / "resolved_config.yaml").read_text())["model"]["name"] == "tiny"
    assert "done: 2 steps" in proc.stdout
