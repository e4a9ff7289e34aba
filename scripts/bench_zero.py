"""ZeRO stages 0-3 and the offload presets side by side: the same model, batch and precision
through the real kiln-train, one run per preset, one table of steady tokens/s and peak memory
(rank 0's: torch.cuda.max_memory_allocated on a GPU, peak RSS of its process on a CPU), ratios
against ZeRO-0 last.

    python scripts/bench_zero.py                                   # tiny model, 2 Ray workers, fp32
    python scripts/bench_zero.py model=gpt2-small precision=bf16 trainer.micro_batch_size=8   # a GPU

With one worker ZeRO has nothing to shard across (every stage holds everything): the default is
two. Extra arguments are kiln-train overrides. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PRESETS = ("zero0", "zero1", "zero2", "zero3", "zero2_offload", "zero3_offload")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=100)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--presets", default=",".join(PRESETS))
    args, overrides = ap.parse_known_args()
    job = ["launcher=ray", f"launcher.num_workers={args.workers}", "model=tiny", "logger=none", "precision=fp32",
           "data.num_workers=1", f"trainer.max_steps={args.steps}", f"trainer.log_interval={max(1, args.steps // 5)}",
           f"trainer.eval_interval={10 * args.steps}", "trainer.eval_batches=1", "trainer.checkpoint_interval=0",
           *overrides]
    rows = []
    with tempfile.TemporaryDirectory(prefix="kiln-bench-zero-") as tmp:
        for preset in args.presets.split(","):
            out = Path(tmp) / preset
            started = time.perf_counter()
            proc = subprocess.run(["kiln-train", *job, f"parallelism={preset}", f"hydra.run.dir={out}",
                                   f"launcher.storage_path={out}-ck", f"trainer.run_name=bench-{preset}"],
                                  capture_output=True, text=True, timeout=1200)
            wall = time.perf_counter() - started
            if proc.returncode != 0:
                print(f"{preset}: failed (exit {proc.returncode})\n{proc.stderr[-2000:]}", flush=True)
                continue
            s = json.loads((out / "summary.json").read_text())
            rows.append((preset, s["tokens_per_s"], s["peak_memory_gib"], s["memory_basis"], wall))
            print(f"{preset:14s} {s['tokens_per_s']:>10,.0f} tokens/s  peak {s['peak_memory_gib']:6.2f} GiB "
                  f"({s['memory_basis']})  {wall:5.0f} s wall", flush=True)
    base = next((r for r in rows if r[0] == "zero0"), rows[0] if rows else None)
    if base:
        print("ratios against", base[0] + ": " + "  ".join(f"{r[0]} {r[1] / base[1]:.2f}x tok/s {r[2] / base[2]:.2f}x mem"
                                                       for r in rows) + f"  ({' '.join(job)})")


if __name__ == "__main__":
    sys.exit(main())
