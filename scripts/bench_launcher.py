"""launcher=ray against torchrun, side by side in one run: kiln-train with launcher=ray and 2 Ray
Train workers, and a hand-written DeepSpeed script under `torchrun --nproc_per_node 2 --standalone`
(gloo on the CPU), both with the SAME DeepSpeed config: kiln's `deepspeed_config(cfg, 2, on_gpu)`
of the composed job (its "scheduler" entry replaced by kiln's client schedule, as build_engine
does), the same model (kiln's build_model, same seed), micro-batch and sequence length. Rounds
alternate torchrun, kiln-ray; each prints steady tokens/s (all ranks together, as kiln's
tokens_per_s: rank 0's rate x world size; steady = the mean of the log intervals after the first)
and the time to first step; the ratio and the first-step gap come last.

    python scripts/bench_launcher.py                                   # model=tiny, fp32, ZeRO-2, 300 steps
    python scripts/bench_launcher.py model.n_layer=4 model.n_embd=128  # any kiln-train overrides
    python scripts/bench_launcher.py --steps 200 --rounds 3

Goals (issue): steady tokens/s of kiln-ray within 1.05 of torchrun's (printed ratio >= 0.95), and
time to first step under 15 s more than torchrun once DeepSpeed's ops are built (run it once to
build them; round 1 is then as warm as round 2).

What is timed:
  - kiln-ray, tokens/s: the real `kiln-train launcher=ray launcher.num_workers=2 ...` (its own
    local Ray instance), trainer.max_steps=--steps, log interval steps/10, eval at the end only,
    no checkpoint before the end; `tokens_per_s` of its summary.json.
  - kiln-ray, time to first step: a second command per round, the same job with
    trainer.max_steps=2 trainer.log_interval=1: wall time from starting the command to the moment
    rank 0's first metrics.jsonl record (step 1, written right after the step and its
    all-reduce'd loss check) appears on disk (polled every 10 ms). Ray's forwarding of worker
    stdout is not in it. The same poll gives a rough timeline of the probe: the driver's
    "local Ray instance" line (imports, compose, plan, ray.init), ranks/rank_0.json (kiln's worker
    function started: Ray Train's controller, worker group and gloo group are up), metrics.jsonl
    created (rank 0's Tracker: model and DeepSpeed engine built, data loader made), first record.
  - torchrun: this file re-run as `--torchrun-worker SPEC` on 2 processes; one fixed random batch
    per rank, engine(x, y) / backward / step, no data loading, logging or checks; time to first
    step: from starting the torchrun command to rank 0's time.time() after step 1. The worker gets
    the composed job as JSON (DeepSpeed config, model config, schedule), so it composes nothing:
    kiln's config composition and planning count on kiln's side.
Tests never time anything; this script does.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

WORLD = 2


# --------------------------------------------------------------------------- torchrun worker

def torchrun_worker(spec_path: str) -> None:
    t0 = time.time()
    os.environ.setdefault("DS_ACCELERATOR", "cpu")  # as kiln's set_worker_env, before deepspeed
    import torch
    import torch.distributed as dist

    import deepspeed
    from deepspeed.utils import logger as ds_logger
    import logging

    from kiln.engine.schedule import client_scheduler
    from kiln.model.config import ARCHS
    from kiln.model.factory import build_model

    ds_logger.setLevel(logging.WARNING)
    t_import = time.time()
    spec = json.loads(Path(spec_path).read_text())
    dist.init_process_group(backend="gloo")  # as Ray Train does before the train function
    rank = dist.get_rank()
    t_pg = time.time()
    torch.manual_seed(spec["seed"])
    model = build_model(ARCHS[spec["arch"]](**spec["model"]))
    torch.manual_seed(spec["seed"] + 1000 * (rank + 1))
    t_model = time.time()
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=model.param_groups(spec["weight_decay"]),
                                           config=spec["ds"], lr_scheduler=client_scheduler(spec["schedule"]))
    t_engine = time.time()
    B, T, vocab = spec["micro_batch"], spec["seq_len"], spec["model"]["vocab_size"]
    batch = torch.randint(0, vocab, (B, T + 1))
    x, y = batch[:, :-1], batch[:, 1:]
    steps, interval = spec["steps"], spec["log_interval"]
    rates, t_first = [], None
    started = time.perf_counter()
    for step in range(1, steps + 1):
        _, loss = engine(x, y)
        engine.backward(loss)
        engine.step()
        if step == 1:
            loss.item()
            t_first = time.time()
        if step % interval == 0 or step == steps:
            done = interval if step % interval == 0 else step % interval
            rates.append(done * B * T * WORLD / (time.perf_counter() - started))
            started = time.perf_counter()
    if rank == 0:
        steady = rates[1:] or rates
        print("TORCHRUN " + json.dumps({
            "tokens_per_s": sum(steady) / len(steady), "first_step": t_first, "loss": float(loss),
            "threads": torch.get_num_threads(),
            "timeline": {"python up": t0, "imports": t_import, "process group": t_pg, "model": t_model,
                         "engine": t_engine, "first step": t_first}}), flush=True)
    dist.destroy_process_group()


# --------------------------------------------------------------------------- driver

class Command:
    """A subprocess with its stdout (and stderr) kept in a log, each line timestamped."""

    def __init__(self, argv: list[str], log: Path):
        self.log, self.lines = log, []  # (time, line)
        self.started = time.time()
        self.proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     bufsize=1, start_new_session=True)
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        with open(self.log, "w") as f:
            for line in self.proc.stdout:
                self.lines.append((time.time(), line.rstrip("\n")))
                f.write(line)

    def first_line(self, text: str) -> float | None:
        return next((t for t, line in self.lines if text in line), None)

    def wait(self, timeout: float) -> int:
        try:
            rc = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, 9)  # our own child's session only
            rc = self.proc.wait()
        self.reader.join(5)
        self.ended = time.time()
        if rc != 0:
            tail = "\n".join(line for _, line in self.lines[-30:])
            raise SystemExit(f"{' '.join(self.proc.args[:4])} ... failed (rc {rc}); log {self.log}:\n{tail}")
        return rc


def kiln_argv(job: list[str], name: str, out: Path) -> list[str]:
    return ["kiln-train", *job, f"trainer.run_name={name}", f"launcher.storage_path={out / 'ck'}",
            f"hydra.run.dir={out / name}"]


def kiln_rate(job: list[str], out: Path, name: str, timeout: float) -> float:
    cmd = Command(kiln_argv(job, name, out), out / f"{name}.log")
    cmd.wait(timeout)
    return json.loads((out / name / "summary.json").read_text())["tokens_per_s"]


def kiln_first_step(job: list[str], out: Path, name: str, timeout: float) -> tuple[float, dict]:
    """Seconds from the command's start to rank 0's first metrics.jsonl record, and a timeline."""
    run = out / name
    cmd = Command(kiln_argv(job + ["trainer.max_steps=2", "trainer.log_interval=1"], name, out), out / f"{name}.log")
    files = {"resolved config (driver planned)": run / "resolved_config.yaml",
             "worker fn started (ranks/rank_0.json)": run / "ranks" / "rank_0.json",
             "engine+loader built (metrics.jsonl created)": run / "metrics.jsonl"}
    seen: dict[str, float] = {}
    first = None
    deadline = cmd.started + timeout
    while cmd.proc.poll() is None and time.time() < deadline:
        now = time.time()
        for what, path in files.items():
            if what not in seen and path.exists():
                seen[what] = now
        if first is None and "engine+loader built (metrics.jsonl created)" in seen:
            with contextlib.suppress(OSError):
                if (run / "metrics.jsonl").read_text().endswith("\n"):
                    first = now
        time.sleep(0.01)
    cmd.wait(max(1.0, deadline - time.time()))
    if first is None:
        raise SystemExit(f"{name}: no metrics.jsonl record seen (log {cmd.log})")
    timeline = {"driver: Ray up ('local Ray instance' line)": cmd.first_line("local Ray instance"), **seen,
                "first step (first metrics.jsonl record)": first, "command exited": cmd.ended}
    timeline = dict(sorted(((k, v - cmd.started) for k, v in timeline.items() if v is not None),
                           key=lambda kv: kv[1]))
    return first - cmd.started, timeline


def torchrun_side(spec: Path, out: Path, r: int, timeout: float) -> tuple[float, float, dict]:
    argv = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(WORLD), "--standalone",
            str(Path(__file__).resolve()), "--torchrun-worker", str(spec)]
    cmd = Command(argv, out / f"torchrun-{r}.log")
    cmd.wait(timeout)
    line = next(line for _, line in cmd.lines if line.startswith("TORCHRUN "))
    res = json.loads(line[len("TORCHRUN "):])
    timeline = {k: v - cmd.started for k, v in res["timeline"].items()}
    timeline["command exited"] = cmd.ended - cmd.started
    timeline["threads per rank"] = res["threads"]
    return res["tokens_per_s"], res["first_step"] - cmd.started, timeline


def write_spec(job: list[str], steps: int, log: int, out: Path) -> Path:
    """The composed job as the torchrun worker needs it: kiln's DeepSpeed config for 2 CPU ranks."""
    import dataclasses

    from kiln.config.compose import compose
    from kiln.engine.ds_config import deepspeed_config
    from kiln.engine.schedule import schedule_params
    from kiln.plan import plan_run

    cfg = compose(job)
    plan = plan_run(cfg, out / "plan", log=lambda *a, **k: None)  # for the vocabulary of the data
    ds = {k: v for k, v in deepspeed_config(plan.config, WORLD, on_gpu=False).items() if k != "scheduler"}
    spec = {"ds": ds, "arch": plan.model.arch, "model": dataclasses.asdict(plan.model),
            "schedule": schedule_params(plan.config), "weight_decay": cfg.optim.weight_decay,
            "micro_batch": cfg.trainer.micro_batch_size, "seq_len": cfg.data.seq_len, "seed": cfg.trainer.seed,
            "steps": steps, "log_interval": log}
    if cfg.trainer.grad_accum_steps != 1:
        raise SystemExit("the torchrun side steps one micro-batch per step: keep trainer.grad_accum_steps=1")
    path = out / "spec.json"
    path.write_text(json.dumps(spec, indent=1))
    return path


def main() -> None:
    if len(sys.argv) == 3 and sys.argv[1] == "--torchrun-worker":
        return torchrun_worker(sys.argv[2])
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--timeout", type=float, default=600, help="seconds per command")
    ap.add_argument("--keep", action="store_true", help="keep the run directories and logs (printed)")
    args, overrides = ap.parse_known_args()
    log = max(1, args.steps // 10)  # kiln's steady tokens/s leaves out its first log interval
    job = ["launcher=ray", f"launcher.num_workers={WORLD}", "model=tiny", "logger=none", "precision=fp32",
           "parallelism=zero2", "data.num_workers=1", f"trainer.max_steps={args.steps}",
           f"trainer.log_interval={log}", f"trainer.eval_interval={10 * args.steps}",
           "trainer.checkpoint_interval=0", *overrides]
    tmp = tempfile.mkdtemp(prefix="kiln-bench-launcher-")
    out = Path(tmp)
    spec = write_spec(job, args.steps, log, out)
    rates: dict[str, list[float]] = {"torchrun": [], "kiln-ray": []}
    firsts: dict[str, list[float]] = {"torchrun": [], "kiln-ray": []}
    for r in range(1, args.rounds + 1):
        rate, first, tl = torchrun_side(spec, out, r, args.timeout)
        rates["torchrun"].append(rate)
        firsts["torchrun"].append(first)
        print(f"round {r} torchrun: {rate:,.0f} tokens/s, first step {first:.1f} s", flush=True)
        print("    " + "  ".join(f"{k} {v:.1f}" if isinstance(v, float) else f"{k} {v}" for k, v in tl.items()),
              flush=True)
        rate = kiln_rate(job, out, f"ray-{r}", args.timeout)
        first, tl = kiln_first_step(job, out, f"ray-probe-{r}", args.timeout)
        rates["kiln-ray"].append(rate)
        firsts["kiln-ray"].append(first)
        print(f"round {r} kiln-ray: {rate:,.0f} tokens/s, first step {first:.1f} s", flush=True)
        print("    " + "  ".join(f"{k} {v:.1f}" for k, v in tl.items()), flush=True)
    if args.keep:
        print(f"logs and run directories: {out}")
    else:
        import shutil

        shutil.rmtree(out, ignore_errors=True)
    ratio = sum(rates["kiln-ray"]) / sum(rates["torchrun"])
    gap = (sum(firsts["kiln-ray"]) - sum(firsts["torchrun"])) / args.rounds
    print(f"ratio kiln-ray/torchrun tokens/s {ratio:.2f}  ({' '.join(job)})")
    print(f"first step: kiln-ray {gap:+.1f} s over torchrun")


if __name__ == "__main__":
    sys.exit(main())
