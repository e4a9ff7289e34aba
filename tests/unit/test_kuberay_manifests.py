"""launchers/kuberay: the manifests parse, agree with each other and with kiln, and every
`kiln-train` command in them (the RayJob's entrypoint, the guide's `ray job submit` commands) is
one kiln-train accepts. No Kubernetes, KubeRay or Docker needed.

The cluster checks are functions that return a list of problems, so the negative tests below can
show that each one catches a broken manifest."""

from __future__ import annotations

import copy
import re
import shlex
import subprocess
from pathlib import PurePosixPath

import pytest
import yaml

from conftest import REPO, main_in_process
from kiln.config.schema import TrainConfig

KUBERAY = REPO / "launchers" / "kuberay"
KINDS = {("ray.io/v1", "RayJob"), ("ray.io/v1", "RayCluster"), ("v1", "PersistentVolumeClaim")}
GPU = "nvidia.com/gpu"
SHELL_OPERATORS = {";", "&&", "||", "|", "&", "fi", "done", ")"}
# Words that survive KubeRay's submitter bash and then `sh -c` on the head unchanged.
PLAIN_WORD = re.compile(r"[A-Za-z0-9_./=:,+@%-]+")


# --- reading the files ------------------------------------------------------------------------

def documents() -> list[tuple[str, dict]]:
    docs = []
    for path in sorted(KUBERAY.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if doc is not None:
                docs.append((path.name, doc))
    return docs


def one(kind: str) -> dict:
    found = [d for _, d in documents() if d.get("kind") == kind]
    assert len(found) == 1, f"expected one {kind} in {KUBERAY}, found {len(found)}"
    return found[0]


def cluster_spec(doc: dict) -> dict:
    return doc["spec"]["rayClusterSpec"] if doc["kind"] == "RayJob" else doc["spec"]


def groups(spec: dict) -> list[tuple[str, dict]]:
    """(name, group spec) for the head and every worker group."""
    return [("head", spec["headGroupSpec"])] + [(g["groupName"], g) for g in spec.get("workerGroupSpecs", [])]


def ray_container(group: dict) -> dict:
    return group["template"]["spec"]["containers"][0]  # KubeRay's Ray container is the first


def cpu(q) -> float:
    q = str(q)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def memory(q) -> float:
    units = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "K": 1e3, "M": 1e6, "G": 1e9, "T": 1e12}
    q = str(q)
    for suffix, factor in units.items():
        if q.endswith(suffix):
            return float(q[: -len(suffix)]) * factor
    return float(q)


def limit(container: dict, resource: str):
    res = container.get("resources", {})
    return res.get("limits", {}).get(resource, res.get("requests", {}).get(resource))


# --- kiln-train commands ----------------------------------------------------------------------

def kiln_args(command: str) -> list[str]:
    """The arguments of the `kiln-train` in a shell command line (after `ray job submit ... --`,
    up to the next shell operator)."""
    words = shlex.split(command, comments=True)
    start = words.index("kiln-train") + 1
    args = []
    for w in words[start:]:
        if w in SHELL_OPERATORS:
            break
        args.append(w)
    return args


def overrides(args: list[str]) -> dict[str, str]:
    return dict(a.split("=", 1) for a in args if "=" in a and not a.startswith("-"))


def readme_commands() -> list[str]:
    """Every kiln-train command in the guide's bash blocks, line continuations joined and a
    surrounding `for VAR in A B ...` loop's variable replaced by its first value."""
    text = (KUBERAY / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        block = block.replace("\\\n", " ")
        loops = dict((var, values.split()[0]) for var, values in re.findall(r"for (\w+) in ([^;]+); do", block))
        for line in block.splitlines():
            if "kiln-train" not in line:
                continue
            for var, value in loops.items():
                line = re.sub(rf"\$\{{{var}\}}|\${var}\b", value, line)
            commands.append(line.strip())
    return commands


def all_commands() -> list[tuple[str, str, str]]:
    """(where, command, cluster kind it runs on)."""
    found = [("rayjob.yaml entrypoint", one("RayJob")["spec"]["entrypoint"], "RayJob")]
    found += [(f"README.md command {i}", c, "RayCluster") for i, c in enumerate(readme_commands(), 1)]
    return found


COMMANDS = all_commands()


# --- the checks -------------------------------------------------------------------------------

def shared_claim(container: dict, pod: dict, path: str) -> str | None:
    """The PVC that `path` lies on in this container, or None."""
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    best = None
    for m in container.get("volumeMounts", []):
        mount = PurePosixPath(m["mountPath"])
        if PurePosixPath(path) == mount or mount in PurePosixPath(path).parents:
            if best is None or len(str(mount)) > len(best["mountPath"]):
                best = m
    if best is None or "persistentVolumeClaim" not in volumes.get(best["name"], {}):
        return None
    return volumes[best["name"]]["persistentVolumeClaim"]["claimName"]


def cluster_problems(spec: dict, args: list[str] | None = None, cfg: TrainConfig | None = None,
                     exact: bool = True) -> list[str]:
    """What is wrong with a RayCluster spec, alone and for the kiln-train `args` (composed: `cfg`)
    run on it (exact: the GPUs must equal launcher.num_workers, else at least that many)."""
    problems = []
    gs = groups(spec)
    images = {name: ray_container(g)["image"] for name, g in gs}
    if len(set(images.values())) != 1:
        problems.append(f"head and workers run different images: {images}")
    workers = gs[1:]
    if not workers:
        problems.append("no worker group")
    for name, g in gs:
        c, pod = ray_container(g), g["template"]["spec"]
        for key, value in (g.get("rayStartParams") or {}).items():
            if not isinstance(value, str):
                problems.append(f"{name}: rayStartParams.{key} is {value!r}, the CRD wants a string")
        shm = [m for m in c.get("volumeMounts", []) if m["mountPath"] == "/dev/shm"]
        vol = {v["name"]: v for v in pod.get("volumes", [])}.get(shm[0]["name"]) if shm else None
        if not vol or vol.get("emptyDir", {}).get("medium") != "Memory" or not vol["emptyDir"].get("sizeLimit"):
            problems.append(f"{name}: /dev/shm is not a sized memory-backed emptyDir")
        elif limit(c, "memory") and memory(vol["emptyDir"]["sizeLimit"]) >= memory(limit(c, "memory")):
            problems.append(f"{name}: /dev/shm is as large as the container's memory limit")
    gpus_total = 0
    for name, g in workers:
        c = ray_container(g)
        gpus = int(limit(c, GPU) or 0)
        requests = c.get("resources", {}).get("requests", {})
        if gpus < 1:
            problems.append(f"worker group {name} requests no {GPU}")
        elif GPU in requests and int(requests[GPU]) != gpus:
            problems.append(f"worker group {name}: {GPU} requests != limits")
        replicas = g.get("replicas", 0)
        if not g.get("minReplicas", 0) <= replicas <= g.get("maxReplicas", 2**31 - 1):
            problems.append(f"worker group {name}: replicas {replicas} outside [minReplicas, maxReplicas]")
        gpus_total += replicas * g.get("numOfHosts", 1) * gpus
        cpus = limit(c, "cpu")
        if cfg is not None and gpus and cpus and cfg.launcher.cpus_per_worker * gpus > cpu(cpus):
            problems.append(f"worker group {name}: {gpus} ranks x launcher.cpus_per_worker="
                            f"{cfg.launcher.cpus_per_worker} > the pod's {limit(c, 'cpu')} CPUs")
    if args is None:
        return problems

    ov = overrides(args)
    if ov.get("launcher") != "ray" or str(ov.get("launcher.use_gpu")).lower() != "true":
        problems.append("the command does not ask for Ray GPU workers (launcher=ray launcher.use_gpu=true)")
    n = int(ov.get("launcher.num_workers", cfg.launcher.num_workers if cfg else -1))
    if (gpus_total != n) if exact else (gpus_total < n):
        problems.append(f"launcher.num_workers={n} but the worker group has {gpus_total} GPUs")
    for key in ("launcher.storage_path", "hydra.run.dir"):
        path = ov.get(key)
        if path is None or not path.startswith("/"):
            problems.append(f"{key} is not an absolute path on the shared volume: {path}")
            continue
        claims = {name: shared_claim(ray_container(g), g["template"]["spec"], path) for name, g in gs}
        if None in claims.values() or len(set(claims.values())) != 1:
            problems.append(f"{key}={path} is not on one shared PVC in every pod: {claims}")
    return problems


# --- the manifests ----------------------------------------------------------------------------

def test_every_document_is_a_known_kind():
    docs = documents()
    files = {p.name for p in KUBERAY.glob("*.yaml")}
    assert {"rayjob.yaml", "raycluster.yaml", "pvc.yaml"} <= files
    assert {f for f, _ in docs} == files, "a YAML file without documents"
    for f, d in docs:
        assert (d.get("apiVersion"), d.get("kind")) in KINDS, f"{f}: {d.get('apiVersion')}/{d.get('kind')}"
        assert d["metadata"]["name"], f
    one("RayJob"), one("RayCluster"), one("PersistentVolumeClaim")


def test_pvc_is_read_write_many_and_every_ray_pod_mounts_it():
    pvc = one("PersistentVolumeClaim")
    assert "ReadWriteMany" in pvc["spec"]["accessModes"]
    for kind in ("RayJob", "RayCluster"):
        for name, g in groups(cluster_spec(one(kind))):
            assert shared_claim(ray_container(g), g["template"]["spec"], "/shared/x") == pvc["metadata"]["name"], \
                f"{kind} {name} does not mount {pvc['metadata']['name']} at /shared"


def test_one_image_everywhere():
    images = {(kind, name): ray_container(g)["image"]
              for kind in ("RayJob", "RayCluster") for name, g in groups(cluster_spec(one(kind)))}
    assert len(set(images.values())) == 1, images
    submitter = one("RayJob")["spec"].get("submitterPodTemplate")
    if submitter:
        assert submitter["spec"]["containers"][0]["image"] in images.values()


def test_rayjob_lifecycle_fields():
    spec = one("RayJob")["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert isinstance(spec["ttlSecondsAfterFinished"], int) and spec["ttlSecondsAfterFinished"] >= 0
    assert isinstance(spec["backoffLimit"], int) and spec["backoffLimit"] >= 0
    assert isinstance(spec["activeDeadlineSeconds"], int) and spec["activeDeadlineSeconds"] > 0
    assert spec.get("submissionMode", "K8sJobMode") in ("K8sJobMode", "HTTPMode", "SidecarMode")
    assert "clusterSelector" not in spec  # it brings its own cluster


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_graceful_stop_hooks(kind):
    """The head's preStop (stop running jobs = checkpoint) is valid Python, and the time Ray gives a
    stopped driver fits in the pods' grace period."""
    spec = cluster_spec(one(kind))
    head = spec["headGroupSpec"]
    c = ray_container(head)
    command = c["lifecycle"]["preStop"]["exec"]["command"]
    assert command[:2] == ["python3", "-c"]
    compile(command[2], f"{kind} head preStop", "exec")
    env = {e["name"]: e.get("value") for e in c.get("env", [])}
    wait = int(env["RAY_JOB_STOP_WAIT_TIME_S"])
    for _, g in groups(spec):
        assert wait < g["template"]["spec"]["terminationGracePeriodSeconds"]
        assert ray_container(g)["lifecycle"]["preStop"]["exec"]["command"]


@pytest.mark.parametrize("kind", ["RayJob", "RayCluster"])
def test_clusters_are_consistent(kind):
    assert cluster_problems(cluster_spec(one(kind))) == []


# --- the kiln-train commands ------------------------------------------------------------------

def test_commands_are_found():
    kinds = [k for _, _, k in COMMANDS]
    assert kinds.count("RayJob") == 1 and kinds.count("RayCluster") >= 2, COMMANDS
    for where, command, _ in COMMANDS:
        args = kiln_args(command)
        assert "launcher.num_workers" in overrides(args), where
        assert "$" not in " ".join(args), f"{where}: unexpanded variable in {args}"


@pytest.mark.parametrize("where,command,kind", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_command_fits_its_cluster(where, command, kind, compose):
    args = kiln_args(command)
    bad = [a for a in args if not PLAIN_WORD.fullmatch(a)]
    assert not bad, f"{where}: words the head's shell would change: {bad}"
    cfg = compose(args)
    assert cluster_problems(cluster_spec(one(kind)), args, cfg, exact=(kind == "RayJob")) == []


def run_cfg_job(args: list[str], capsys) -> subprocess.CompletedProcess:
    """kiln-train's main() (in this process); `--cfg job` prints the composed config and exits,
    training nothing."""
    code, out, err = main_in_process([*args, "--cfg", "job"], capsys)
    return subprocess.CompletedProcess(["kiln-train", *args, "--cfg", "job"], code, out, err)


@pytest.mark.parametrize("where,command,kind", COMMANDS, ids=[w for w, _, _ in COMMANDS])
def test_kiln_train_accepts_command(where, command, kind, compose, capsys):
    args = kiln_args(command)
    proc = run_cfg_job(args, capsys)
    assert proc.returncode == 0, \
        f"{where}: kiln-train {' '.join(args)} --cfg job\n{proc.stdout[-2000:]}{proc.stderr[-3000:]}"
    printed = yaml.safe_load(proc.stdout)
    ov = overrides(args)
    assert printed["launcher"]["name"] == "ray"
    assert printed["launcher"]["num_workers"] == int(ov["launcher.num_workers"])
    assert printed["launcher"]["storage_path"] == ov["launcher.storage_path"]
    # The same overrides, composed as kiln-train does, pass kiln's config checks (the GPU checks
    # need the cluster and run on the driver there).
    cfg = compose(args)
    cfg.check()
    assert cfg.trainer.run_name == ov["trainer.run_name"]


# --- the checks can fail ----------------------------------------------------------------------

def test_a_misspelled_override_is_rejected(compose, capsys):
    args = kiln_args(one("RayJob")["spec"]["entrypoint"])
    bad = [a.replace("launcher.num_workers=", "launcher.num_wokers=") for a in args]
    assert bad != args
    proc = run_cfg_job(bad, capsys)
    assert proc.returncode != 0 and "num_wokers" in proc.stdout + proc.stderr
    with pytest.raises(Exception, match="num_wokers"):
        compose(bad)


def test_cluster_checks_catch_broken_manifests(compose):
    job = one("RayJob")
    args = kiln_args(job["spec"]["entrypoint"])
    cfg = compose(args)

    def problems(edit) -> str:
        spec = copy.deepcopy(cluster_spec(job))
        edit(spec)
        return "\n".join(cluster_problems(spec, args, cfg))

    def worker(s):
        return s["workerGroupSpecs"][0]

    def wpod(s):
        return worker(s)["template"]["spec"]

    assert "GPUs" in problems(lambda s: worker(s).update(replicas=1, minReplicas=1))

    def no_gpus(s):
        for section in wpod(s)["containers"][0]["resources"].values():
            section.pop(GPU)

    assert "requests no" in problems(no_gpus)
    assert "different images" in problems(lambda s: wpod(s)["containers"][0].update(image="other:1"))
    assert "not on one shared PVC" in problems(lambda s: wpod(s).update(
        volumes=[v for v in wpod(s)["volumes"] if "persistentVolumeClaim" not in v]))
    assert "/dev/shm" in problems(lambda s: wpod(s)["containers"][0].update(
        volumeMounts=[m for m in wpod(s)["containers"][0]["volumeMounts"] if m["mountPath"] != "/dev/shm"]))
    assert "CPUs" in problems(lambda s: wpod(s)["containers"][0]["resources"]["limits"].update(cpu="8"))
    assert "string" in problems(lambda s: s["headGroupSpec"]["rayStartParams"].update({"num-cpus": 0}))
    elsewhere = [a.replace("/shared/checkpoints", "/tmp/checkpoints") for a in args]
    assert any("storage_path" in p for p in cluster_problems(cluster_spec(job), elsewhere, cfg))


def test_command_extraction():
    assert kiln_args("ray job submit --no-wait -- kiln-train a=1 b=2 ; echo x") == ["a=1", "b=2"]
    assert kiln_args("kiln-train launcher=ray  # a comment") == ["launcher=ray"]
    assert not PLAIN_WORD.fullmatch("hydra.run.dir=/o/${now:%H}")
