"""Soak test (issue 12): a long Ray run that loses workers and must not notice.

    python scripts/soak.py                     # 300 steps, 2 Ray workers, 3 kills, checkpoint every 20
    python scripts/soak.py --steps 100 --kills 2

Runs the tiny model under launcher=ray (a local Ray instance, 2 CPU workers, ZeRO-2 fp32) twice:
uninterrupted, then with a Ray Train worker SIGKILLed at random steps (each after a new
checkpoint is registered; launcher.max_failures=kills). Passes when the interrupted run ends with
bitwise the same final weights and eval loss as the uninterrupted one, and leaves nothing behind:
no Ray or kiln process, no kiln temporary checkpoint directory, no new shared-memory segment.
Too long for CI (about 10 minutes on 2 cores); results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

REPO = Path(__file__).resolve().parents[1]


def args_for(steps: int, storage: Path, run_dir: Path, name: str) -> list[str]:
    return ["kiln-train", "launcher=ray", "launcher.num_workers=2", "model=tiny", "parallelism=zero2",
            "precision=fp32", "logger=none", f"trainer.max_steps={steps}", "trainer.log_interval=5",
            f"trainer.eval_interval={steps}", "trainer.checkpoint_interval=20", "trainer.keep_checkpoints=2",
            "data.num_workers=1", f"trainer.run_name={name}", f"launcher.storage_path={storage}",
            f"hydra.run.dir={run_dir}"]


MARK = "KILN_SOAK_RUN"  # in the environment of the runs, so their processes (Ray's included) can be told apart


def own_processes(mark: str) -> list[psutil.Process]:
    """Processes of this soak's runs: kiln-train, the local Ray instance it started, its workers."""
    found = []
    for p in psutil.process_iter():
        try:
            if p.pid != os.getpid() and p.environ().get(MARK) == mark:
                found.append(p)
        except psutil.Error:
            pass
    return found


def train_workers(mark: str) -> list[int]:
    """This soak's Ray Train worker processes (not their forked DataLoader readers, which share
    the title; never another Ray instance's on this machine)."""
    def is_worker(p):
        return any("RayTrainWorker" in part for part in (p.cmdline() or []))

    pids = []
    for p in own_processes(mark):
        try:
            if is_worker(p) and not (p.parent() and is_worker(p.parent())):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids


def registered_steps(snapshot: Path) -> list[int]:
    try:
        return [int(s) for s in re.findall(r"step_(\d{9})", snapshot.read_text())]
    except OSError:
        return []


def logged_step(run_dir: Path) -> int:
    try:
        lines = (run_dir / "metrics.jsonl").read_text().splitlines()
        return json.loads(lines[-1])["step"] if lines else 0
    except (OSError, ValueError, IndexError):
        return 0


def final_weights(storage: Path, name: str, steps: int) -> dict:
    from kiln.checkpoint.weights import consolidated_state_dict

    return consolidated_state_dict(storage / name / f"step_{steps:09d}")


def shm_segments() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=300)
    p.add_argument("--kills", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    rng = random.Random(a.seed)
    root = Path(tempfile.mkdtemp(prefix="kiln-soak-"))
    storage, env = root / "ck", {**os.environ, "WANDB_MODE": "disabled", MARK: root.name}
    shm_before, tmp_before = shm_segments(), set(Path(tempfile.gettempdir()).glob("kiln-ckpt-*"))
    print(f"soak: {a.steps} steps, {a.kills} worker kills, files in {root}", flush=True)

    began = time.monotonic()
    ref = subprocess.run(args_for(a.steps, storage, root / "ref", "ref"), cwd=REPO, env=env, capture_output=True,
                         text=True)
    (root / "ref.log").write_text(ref.stdout + ref.stderr)
    if ref.returncode != 0:
        print(f"FAIL: the uninterrupted run exited {ref.returncode} (see {root / 'ref.log'})")
        return 1
    print(f"uninterrupted run: {time.monotonic() - began:.0f} s", flush=True)

    began, kills = time.monotonic(), []
    log = open(root / "soak.log", "w")
    cmd = args_for(a.steps, storage, root / "soak", "soak") + [f"launcher.max_failures={a.kills}"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT, text=True)
    snapshot = storage / "soak" / "checkpoint_manager_snapshot.json"
    # kill at random steps, each past a checkpoint registered after the previous kill
    targets = sorted(rng.sample(range(25, a.steps - 10), a.kills))
    for target in targets:
        done_before = max(registered_steps(snapshot), default=0)
        while proc.poll() is None and not (logged_step(root / "soak") >= target
                                            and max(registered_steps(snapshot), default=0) > done_before):
            time.sleep(0.5)
        workers = train_workers(root.name)
        if proc.poll() is not None or not workers:
            break
        victim = rng.choice(workers)
        psutil.Process(victim).kill()
        kills.append((logged_step(root / "soak"), victim))
        print(f"  killed worker {victim} at step {kills[-1][0]}", flush=True)
        while victim in train_workers(root.name):
            time.sleep(0.5)
    code = proc.wait()
    log.close()
    print(f"interrupted run: {time.monotonic() - began:.0f} s, exit {code}", flush=True)

    problems = []
    if code != 0:
        problems.append(f"the interrupted run exited {code} (see {root / 'soak.log'})")
    if len(kills) != a.kills:
        problems.append(f"only {len(kills)} of {a.kills} kills happened")
    text = (root / "soak.log").read_text()
    resumes = re.findall(r"resumed from \S+ at step (\d+)", text)
    if len(resumes) != len(kills):
        problems.append(f"{len(resumes)} resumes for {len(kills)} kills")
    if not problems:
        ref_w, soak_w = final_weights(storage, "ref", a.steps), final_weights(storage, "soak", a.steps)
        differ = [k for k in ref_w if not torch.equal(ref_w[k], soak_w[k])]
        if differ or ref_w.keys() != soak_w.keys():
            problems.append(f"final weights differ from the uninterrupted run's in {len(differ)} tensors: {differ[:3]}")
        ref_s = json.loads((root / "ref" / "summary.json").read_text())
        soak_s = json.loads((root / "soak" / "summary.json").read_text())
        if ref_s["final_eval_loss"] != soak_s["final_eval_loss"]:
            problems.append(f"final eval loss {soak_s['final_eval_loss']} vs {ref_s['final_eval_loss']}")
    time.sleep(5)  # Ray's processes take a moment to leave after the driver exits
    left = [f"{q.pid} {' '.join(q.cmdline())[:80]}" for q in own_processes(root.name) if q.is_running()]
    if left:
        problems.append(f"processes left behind: {left[:5]}")
    tmp_left = set(Path(tempfile.gettempdir()).glob("kiln-ckpt-*")) - tmp_before
    if tmp_left:
        problems.append(f"temporary checkpoint directories left: {sorted(map(str, tmp_left))[:3]}")
    shm_left = shm_segments() - shm_before
    if shm_left:
        problems.append(f"shared-memory segments left in /dev/shm: {sorted(shm_left)[:5]}")
    print(f"kills at steps {[s for s, _ in kills]}, resumed at steps {resumes}")
    for line in problems:
        print(f"FAIL: {line}")
    if not problems:
        print(f"PASS: {a.steps} steps with {len(kills)} worker kills: final weights and eval loss bitwise equal to "
              "the uninterrupted run's; no process, temporary directory or shared-memory segment left")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
