#!/usr/bin/env python
"""kiln's checkpoint save against a plain torch.save of the same state, side by side in one run.

    python scripts/bench_checkpoint.py                       # 12 x 512 GPT, fp32 and bf16 ZeRO-2 (~2-4 min)
    python scripts/bench_checkpoint.py --reps 7 --dir /fast/disk --json ckpt.json

What it does, in this one process (world size 1, a gloo process group set up as launcher=local
does, so nothing but this process runs):

1. For each --dtypes entry: kiln's GPT (--layers x --width, --heads, --vocab, --block) wrapped by
   kiln.engine.build.build_engine from the composed kiln config (parallelism=zero<--zero>,
   precision=<dtype>), and one real optimizer step on random tokens, so that the optimizer state
   (fp32 master weights, AdamW moments) exists as in training.
2. --reps rounds, rotating which goes first, each timed alone with the page cache's dirty
   pages flushed (os.sync) before it, and the previous round's files deleted untimed:
   - kiln: the real path of the training loop, LocalStore(...).save(step, write_checkpoint(...)):
     DeepSpeed's engine.save_checkpoint (model states + ZeRO optimizer states + its recovery
     scripts), kiln's loop state (rank_0.pt) and meta.json, written to a .tmp dir then renamed.
   - plain: torch.save({"model": engine.module.state_dict(),
     "optimizer": engine.optimizer.state_dict()}, path): the same tensors (the ZeRO optimizer's
     state dict holds the fp32 master partition and the AdamW moments), in one file.
   - lean (for reference): what a hand-written trainer without ZeRO would save: the model's state
     dict, the inner torch AdamW's state dict (moments) and, only when the model is not fp32, the
     fp32 master weights. With fp32 it leaves out the master copy, which equals the weights.
3. Per file of kiln's checkpoint: bytes and the time of its torch.save (DeepSpeed's
   checkpoint_engine.save, timed from outside), so that a slow save can be traced to a file.
4. Medians of wall time, and the ratio kiln / plain against the goal (at most 1.5x); also the
   CPU time of this process per save (user + system: serialising and copying into the page
   cache), which other work on a shared machine disturbs less than wall time. By default a save's time
   ends when torch.save returns (as in training, the OS writes the pages back afterwards);
   --sync adds os.sync() to every timing, which makes it a measure of the disk's bandwidth.

Benchmarks measure and print; they never assert times. Writes go to the page cache and the disk
behind --dir (default: a temporary directory), so the figures depend on that storage.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

GOAL = 1.5  # the goal: kiln's save at most 1.5x a plain torch.save of the same state


def init_process_group() -> None:
    """As launcher=local: a single-process gloo group for DeepSpeed."""
    from kiln.launch.env import free_port, set_worker_env

    set_worker_env()
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    from kiln.engine.build import captured_stdout, skip_unused_deepspeed_ops

    skip_unused_deepspeed_ops()
    with captured_stdout():
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)


def build(args, dtype: str):
    import torch

    from kiln.config.compose import compose  # the run config exactly as kiln-train composes it
    from kiln.engine.build import build_engine
    from kiln.model.gpt import GPT

    cfg = compose([
        "launcher=local", "logger=none", f"precision={dtype}", f"parallelism=zero{args.zero}",
        f"model.n_layer={args.layers}", f"model.n_embd={args.width}", f"model.n_head={args.heads}",
        f"model.block_size={args.block}", f"model.vocab_size={args.vocab}",
        f"trainer.micro_batch_size={args.batch}", "trainer.max_steps=1000",
    ])
    torch.manual_seed(0)
    model = GPT(cfg.model.build(args.vocab))
    n_params = model.num_params()
    engine, _ = build_engine(model, cfg, 1)
    x = torch.randint(0, args.vocab, (args.batch, args.seq + 1))
    _, loss = engine(x[:, :-1], x[:, 1:])
    engine.backward(loss)
    engine.step()
    return cfg, engine, model.config.shape(), n_params


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


class FileTimes:
    """Times each torch.save DeepSpeed's checkpoint engine makes (wrapping it from outside)."""

    def __init__(self, engine):
        self.engine, self.times = engine, {}
        self._orig = engine.checkpoint_engine.save

    def __enter__(self):
        def timed(state_dict, path):
            t0 = time.perf_counter()
            self._orig(state_dict, path)
            self.times[Path(path).name] = time.perf_counter() - t0

        self.engine.checkpoint_engine.save = timed
        return self

    def __exit__(self, *exc):
        self.engine.checkpoint_engine.save = self._orig


def measure(args, dtype: str, root: Path) -> dict:
    import torch

    from kiln.checkpoint.state import write_checkpoint
    from kiln.checkpoint.store import LocalStore, step_dir_name

    cfg, engine, shape, n_params = build(args, dtype)
    run_dir = root / f"kiln-{dtype}"
    store = LocalStore(run_dir, keep=0, barrier=lambda: None, rank=0)  # retention off: deleted untimed
    loop_state = {"step": 0, "data": {}, "interval_loss": torch.zeros(()), "interval_steps": 0,
                  "last": {}, "throughput": []}
    kiln_t, plain_t, lean_t, per_file = [], [], [], []
    cpu = {"kiln": [], "plain": [], "lean": []}  # CPU seconds of this process (user + system)
    kiln_bytes = plain_bytes = lean_bytes = 0
    opt = engine.optimizer
    master = None if dtype == "fp32" else opt.single_partition_of_fp32_groups
    for rep in range(args.reps):
        step = rep + 1
        meta = {"step": step, "tokens": 0, "world_size": 1, "model_shape": shape, "wandb_id": None,
                "data_fingerprint": "bench", "config": cfg.to_dict()}

        def kiln_save():
            with FileTimes(engine) as ft:
                t0 = time.perf_counter()
                store.save(step, lambda d: write_checkpoint(d, engine=engine, rank=0, step=step,
                                                            loop_state={**loop_state, "step": step}, meta=meta), {})
                if args.sync:
                    os.sync()
                kiln_t.append(time.perf_counter() - t0)
            per_file.append(ft.times)

        plain_path = root / f"plain-{dtype}-{step}.pt"
        lean_path = root / f"lean-{dtype}-{step}.pt"

        def plain_save():
            t0 = time.perf_counter()
            torch.save({"model": engine.module.state_dict(), "optimizer": opt.state_dict()}, plain_path)
            if args.sync:
                os.sync()
            plain_t.append(time.perf_counter() - t0)

        def lean_save():
            t0 = time.perf_counter()
            state = {"model": engine.module.state_dict(), "optimizer": opt.optimizer.state_dict()}
            if master is not None:
                state["fp32_master"] = master
            torch.save(state, lean_path)
            if args.sync:
                os.sync()
            lean_t.append(time.perf_counter() - t0)

        order = [("kiln", kiln_save), ("plain", plain_save), ("lean", lean_save)]
        for name, fn in order[rep % 3:] + order[:rep % 3]:
            os.sync()
            c0 = time.process_time()
            fn()
            cpu[name].append(time.process_time() - c0)
        os.sync()
        ckpt = run_dir / step_dir_name(step)
        kiln_bytes, plain_bytes, lean_bytes = dir_bytes(ckpt), plain_path.stat().st_size, lean_path.stat().st_size
        files = {str(f.relative_to(ckpt)): f.stat().st_size for f in sorted(ckpt.rglob("*")) if f.is_file()}
        shutil.rmtree(ckpt)
        plain_path.unlink()
        lean_path.unlink()
        print(f"  {dtype} round {step}: kiln {kiln_t[-1]:.3f} s, plain {plain_t[-1]:.3f} s, "
              f"lean {lean_t[-1]:.3f} s", flush=True)
    del engine
    k, p, le = statistics.median(kiln_t), statistics.median(plain_t), statistics.median(lean_t)
    file_median = {name: statistics.median(t[name] for t in per_file) for name in per_file[0]}
    # Everything in kiln's save but DeepSpeed's two torch.save calls: building the state dicts,
    # kiln's rank_0.pt and meta.json, DeepSpeed's recovery scripts, the directory rename.
    overhead = [k - sum(f.values()) for k, f in zip(kiln_t, per_file)]
    return {"dtype": dtype, "zero_stage": args.zero, "parameters": n_params, "kiln_s": kiln_t, "plain_s": plain_t,
            "lean_s": lean_t, "kiln_median_s": k, "plain_median_s": p, "lean_median_s": le, "ratio": k / p,
            "ratio_lean": k / le, "kiln_bytes": kiln_bytes, "plain_bytes": plain_bytes, "lean_bytes": lean_bytes,
            "files": files, "file_save_median_s": file_median, "overhead_s": overhead,
            "overhead_median_s": statistics.median(overhead),
            "cpu_s": cpu, "cpu_median_s": {k: statistics.median(v) for k, v in cpu.items()},
            "cpu_ratio": statistics.median(cpu["kiln"]) / statistics.median(cpu["plain"])}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--width", type=int, default=512)
    ap.add_argument("--heads", type=int, default=8)
    ap.add_argument("--vocab", type=int, default=50304, help="GPT-2's vocabulary, padded (default 50304)")
    ap.add_argument("--block", type=int, default=1024, help="model.block_size")
    ap.add_argument("--zero", type=int, default=2, choices=(1, 2), help="ZeRO stage, 1 or 2 (default 2)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="precision groups to measure (default fp32,bf16)")
    ap.add_argument("--reps", type=int, default=6,
                    help="rounds per dtype, each save going first equally often; medians reported (default 6)")
    ap.add_argument("--sync", action="store_true", help="count writing back to disk (os.sync) in every timing")
    ap.add_argument("--batch", type=int, default=2, help="micro-batch of the one warm-up step")
    ap.add_argument("--seq", type=int, default=64, help="sequence length of the one warm-up step")
    ap.add_argument("--dir", metavar="DIR", help="where to write (default: a temporary directory, removed)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = ap.parse_args(argv)

    import torch

    init_process_group()
    from kiln.engine.build import quiet_deepspeed

    quiet_deepspeed()
    root = Path(args.dir).expanduser() if args.dir else Path(tempfile.mkdtemp(prefix="kiln-bench-ckpt-"))
    root.mkdir(parents=True, exist_ok=True)
    print(f"checkpoint save: GPT {args.layers} layers x {args.width} wide, vocab {args.vocab}, ZeRO-{args.zero}, "
          f"{args.reps} rounds per dtype{', os.sync() timed' if args.sync else ''}, writing to {root}", flush=True)
    results = []
    try:
        for dtype in [d.strip() for d in args.dtypes.split(",") if d.strip()]:
            results.append(measure(args, dtype, root))
    finally:
        if not args.dir:
            shutil.rmtree(root, ignore_errors=True)

    print()
    print(f"machine: {os.cpu_count()} CPUs, Python {platform.python_version()}, torch {torch.__version__}, "
          f"deepspeed {__import__('deepspeed').__version__}")
    print(f"{'dtype':6} {'params':>8} {'kiln MB':>8} {'plain MB':>9} {'lean MB':>8} {'kiln s':>7} {'plain s':>8} "
          f"{'lean s':>7} {'kiln/plain':>10} {'kiln/lean':>10}  goal: kiln/plain <= {GOAL}x")
    for r in results:
        print(f"{r['dtype']:6} {r['parameters'] / 1e6:7.1f}M {r['kiln_bytes'] / 1e6:8.1f} "
              f"{r['plain_bytes'] / 1e6:9.1f} {r['lean_bytes'] / 1e6:8.1f} {r['kiln_median_s']:7.3f} {r['plain_median_s']:8.3f} "
              f"{r['lean_median_s']:7.3f} {r['ratio']:9.2f}x {r['ratio_lean']:9.2f}x  "
              f"{'met' if r['ratio'] <= GOAL else 'NOT met'}")
    print("\nCPU time of this process (user + system; steadier than wall time on a shared machine):")
    for r in results:
        c = r["cpu_median_s"]
        print(f"{r['dtype']:6} kiln {c['kiln']:.3f} s  plain {c['plain']:.3f} s  lean {c['lean']:.3f} s  "
              f"kiln/plain {r['cpu_ratio']:.2f}x")
    for r in results:
        print(f"\n{r['dtype']}: kiln's files (bytes; median time of DeepSpeed's torch.save of each)")
        for name, size in r["files"].items():
            t = r["file_save_median_s"].get(Path(name).name)
            print(f"  {name:58} {size / 1e6:9.2f} MB" + (f"  {t:.3f} s" if t is not None else ""))
        print(f"  everything else (state dicts, kiln's files, scripts, rename): median {r['overhead_median_s']:.3f} s "
              f"(max {max(r['overhead_s']):.3f} s)")
    if args.json:
        Path(args.json).write_text(json.dumps({"args": vars(args), "results": results}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
