"""kiln's memory estimate (kiln/estimate.py) against the peaks real runs measure.

    python scripts/bench_memory.py                      # the cases below, launcher=local on this machine
    python scripts/bench_memory.py --cases tiny-bf16-zero2,acts-bf16-zero2   # a group: its tiny run first

Each case is a real `kiln-train` run (launcher=local, logger=none, a few steps); its summary.json
has `peak_memory_gib` (`memory_basis`: torch.cuda.max_memory_allocated on a GPU, the process's
peak RSS on a CPU). On a CPU the RSS also holds the Python/torch/DeepSpeed runtime (~0.5-1 GiB),
which the estimate leaves out: each group's `tiny` run (the model=tiny preset, whose estimate is a
few MiB) measures that baseline, and the other runs of the group are compared as growth over it:

    error = (estimate - (measured - baseline)) / (measured - baseline)

The runs get MALLOC_MMAP_THRESHOLD_=65536: glibc otherwise keeps freed heap memory for reuse, so
the RSS high-water mark also counts temporaries freed long before (14-42% more growth than the
live tensors in the runs here; `--mmap-threshold 0` leaves glibc's adaptive default). On a GPU
the baseline is ~0 (max_memory_allocated counts tensors only) and `--no-baseline` compares the
estimate with the peak directly. Results: docs/performance.md ("Memory estimate").
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

GIB = 2**30
# Wider than model=tiny, shaped so that one term dominates: activations (many tokens, narrow
# model) or model states (many parameters, few tokens).
ACTS = ["model.n_layer=4", "model.n_embd=512", "model.n_head=8", "model.block_size=256",
        "trainer.micro_batch_size=16"]
STATES = ["model.n_layer=8", "model.n_embd=768", "model.n_head=12", "model.block_size=128",
          "trainer.micro_batch_size=2"]
BF16_ACTS = ["model.n_layer=2", "model.n_embd=256", "model.n_head=4", "model.block_size=256",
             "trainer.micro_batch_size=16"]
# name -> (baseline group, overrides); the group's first case is its baseline (model=tiny).
CASES = {
    "tiny-zero0": ("fp32 zero0", ["precision=fp32", "parallelism=zero0"]),
    "acts-zero0": ("fp32 zero0", ["precision=fp32", "parallelism=zero0", *ACTS]),
    "acts-zero0-full": ("fp32 zero0", ["precision=fp32", "parallelism=zero0", *ACTS,
                                       "trainer.activation_checkpointing=full"]),
    "states-zero0": ("fp32 zero0", ["precision=fp32", "parallelism=zero0", *STATES]),
    "tiny-zero2": ("fp32 zero2", ["precision=fp32", "parallelism=zero2"]),
    "states-zero2": ("fp32 zero2", ["precision=fp32", "parallelism=zero2", *STATES]),
    "tiny-bf16-zero2": ("bf16 zero2", ["precision=bf16", "parallelism=zero2"]),
    "acts-bf16-zero2": ("bf16 zero2", ["precision=bf16", "parallelism=zero2", *BF16_ACTS]),
}


def job(steps: int) -> list[str]:
    return ["launcher=local", "logger=none", "model=tiny", "data.num_workers=0", f"trainer.max_steps={steps}",
            "trainer.log_interval=1", f"trainer.eval_interval={100 * steps}", "trainer.eval_batches=1",
            "trainer.checkpoint_interval=0"]


def estimated_gib(overrides: list[str], out: Path) -> float:
    """The estimate kiln-train prints for these overrides, computed here from the same plan."""
    from kiln.config.compose import compose
    from kiln.estimate import device_limit, estimate
    from kiln.plan import plan_run

    plan = plan_run(compose(overrides), out, log=lambda _: None)
    on_gpu, _, _ = device_limit(plan.config)
    return estimate(plan.config, plan.model, plan.config.launcher.num_workers, on_gpu).peak / GIB


def measure(overrides: list[str], out: Path, mmap_threshold: int | None) -> tuple[float, str, float]:
    # glibc keeps freed heap memory for reuse, so the RSS high-water mark also counts temporaries
    # already freed; with a fixed mmap threshold every allocation above it is its own mapping,
    # returned to the system when freed, and the peak RSS follows the live tensors.
    env = dict(os.environ, **({"MALLOC_MMAP_THRESHOLD_": str(mmap_threshold)} if mmap_threshold else {}))
    started = time.perf_counter()
    proc = subprocess.run(["kiln-train", *overrides, f"hydra.run.dir={out}", f"launcher.storage_path={out}-ck",
                           f"trainer.run_name=bench-{out.name}"], capture_output=True, text=True, timeout=1800,
                          env=env)
    if proc.returncode != 0:
        raise SystemExit(f"{out.name}: kiln-train failed (exit {proc.returncode})\n{proc.stderr[-3000:]}")
    s = json.loads((out / "summary.json").read_text())
    return s["peak_memory_gib"], s["memory_basis"], time.perf_counter() - started


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default=",".join(c for c in CASES if "bf16" not in c),  # bf16 is slow on CPUs
                    help="comma-separated names from: " + ", ".join(CASES))
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--no-baseline", action="store_true", help="compare with the peak itself (GPU)")
    ap.add_argument("--mmap-threshold", type=int, default=65536,
                    help="glibc's MALLOC_MMAP_THRESHOLD_ for the runs (0: glibc's own, adaptive)")
    args, extra = ap.parse_known_args()
    names = args.cases.split(",")
    baselines: dict[str, float] = {}
    print(f"{'case':18s} {'estimate':>9s} {'measured':>9s} {'baseline':>9s} {'growth':>8s} {'error':>7s}  basis, wall")
    with tempfile.TemporaryDirectory(prefix="kiln-bench-memory-") as tmp:
        for name in names:
            group, overrides = CASES[name]
            overrides = [*job(args.steps), *overrides, *extra]
            out = Path(tmp) / name
            est = estimated_gib(overrides, out)
            peak, basis, wall = measure(overrides, out, args.mmap_threshold)
            if args.no_baseline:
                baselines[group] = 0.0
            elif group not in baselines:  # the group's tiny run: what the runtime itself holds
                baselines[group] = peak - est
                print(f"{name:18s} {est:9.3f} {peak:9.3f} {baselines[group]:9.3f} {'-':>8s} {'-':>7s}  "
                      f"{basis}, {wall:.0f} s (baseline of {group})", flush=True)
                continue
            growth = peak - baselines[group]
            print(f"{name:18s} {est:9.3f} {peak:9.3f} {baselines[group]:9.3f} {growth:8.3f} "
                  f"{100 * (est - growth) / growth:+6.1f}%  {basis}, {wall:.0f} s", flush=True)
    print("GiB; growth = measured - baseline; error = (estimate - growth) / growth. Common overrides: "
          + " ".join(job(args.steps) + extra) + f"; MALLOC_MMAP_THRESHOLD_={args.mmap_threshold or 'unset'}")


if __name__ == "__main__":
    sys.exit(main())
