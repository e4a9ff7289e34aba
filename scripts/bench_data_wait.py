"""How much of a training step waits for data: kiln's real loop (launcher=local), its own
step-time breakdown (metrics.jsonl `time/data_s` against forward+backward+optimizer), for a few
settings side by side in one run. Goal (issue 11): under 2% of step time.

    python scripts/bench_data_wait.py                    # tiny and a wider model, data.num_workers 0 and 1
    python scripts/bench_data_wait.py --steps 200 --cases wide-w1 model=gpt2-small

The data is the default corpus (built from this Python's sources on first use). The first log
interval (warm-up: reader start, first shuffle window) is left out. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import tempfile
from pathlib import Path

from kiln.config.compose import compose
from kiln.launch.launcher import run
from kiln.plan import plan_run

WIDE = ["model.n_layer=4", "model.n_embd=256", "model.n_head=4"]
CASES = {
    "tiny-w0": ["model=tiny", "data.num_workers=0"],
    "tiny-w1": ["model=tiny", "data.num_workers=1"],
    "wide-w0": ["model=tiny", *WIDE, "data.num_workers=0"],
    "wide-w1": ["model=tiny", *WIDE, "data.num_workers=1"],
}


def measure(overrides: list[str], steps: int, out: Path) -> dict:
    cfg = compose(["launcher=local", "logger=none", "precision=fp32", "parallelism=zero0",
                   f"trainer.max_steps={steps}", "trainer.log_interval=10", f"trainer.eval_interval={steps}",
                   "trainer.eval_batches=1", "trainer.checkpoint_interval=0", f"launcher.storage_path={out / 'ck'}",
                   "trainer.run_name=bench", *overrides])
    run(plan_run(cfg, out / "run"))
    records = [json.loads(x) for x in (out / "run" / "metrics.jsonl").read_text().splitlines()][1:]
    data = sum(r.get("time/data_s", 0.0) for r in records)
    compute = sum(r.get("time/forward_backward_s", 0.0) + r.get("time/optimizer_s", 0.0) for r in records)
    return {"data_s": data, "compute_s": compute, "fraction": data / (data + compute),
            "tokens_per_s": sum(r["tokens_per_s"] for r in records) / len(records)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=120)
    p.add_argument("--cases", default=",".join(CASES))
    p.add_argument("overrides", nargs="*", help="kiln-train overrides for every case")
    a = p.parse_args()
    print(f"{'case':<10} {'data s':>8} {'compute s':>10} {'tokens/s':>10} {'data wait':>10}")
    worst = 0.0
    for name in a.cases.split(","):
        with tempfile.TemporaryDirectory(prefix=f"kiln-bench-{name}-") as tmp:
            r = measure(CASES[name] + a.overrides, a.steps, Path(tmp))
        worst = max(worst, r["fraction"])
        print(f"{name:<10} {r['data_s']:>8.2f} {r['compute_s']:>10.2f} {r['tokens_per_s']:>10,.0f} "
              f"{100 * r['fraction']:>9.2f}%", flush=True)
    print(f"worst data-wait fraction {100 * worst:.2f}% (goal < 2%)")


if __name__ == "__main__":
    main()
