"""kiln's training loop against a hand-written one, side by side in one process: the same GPT,
micro-batch, sequence length, AdamW settings and gradient clipping; the hand-written loop feeds one
fixed random batch (no data loading, no logging, no checkpoints), kiln runs its whole loop
(launcher=local: DeepSpeed engine, its data stream, metrics, divergence checks). Alternates the
two sides, prints steady tokens/s of each round and the kiln/hand ratio last.

    python scripts/bench_overhead.py                        # model=tiny, fp32, 300 steps
    python scripts/bench_overhead.py --steps 200 model=gpt2-small precision=bf16 parallelism=zero2

Extra arguments are kiln-train overrides (both sides use the composed model and batch). On a GPU
the hand-written side uses the same precision through autocast. Tests never time anything; this
script does. Results: docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import tempfile
import time
from pathlib import Path

import torch

from kiln.config.compose import compose
from kiln.launch.launcher import run
from kiln.model.factory import build_model
from kiln.plan import plan_run


def kiln_side(overrides: list[str], out: Path) -> float:
    cfg = compose(overrides + [f"launcher.storage_path={out / 'ck'}", "trainer.run_name=bench"])
    return run(plan_run(cfg, out / "run"))["tokens_per_s"]


def hand_side(overrides: list[str], steps: int, warmup: int) -> float:
    cfg = compose(overrides)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(cfg.trainer.seed)
    vocab = cfg.model.vocab_size or 257  # the default corpus is byte-tokenized
    model = build_model(cfg.model.build(vocab)).to(device)
    o = cfg.optim
    opt = torch.optim.AdamW(model.param_groups(o.weight_decay), lr=o.lr, betas=(o.beta1, o.beta2), eps=o.eps)
    B, T = cfg.trainer.micro_batch_size, cfg.data.seq_len
    batch = torch.randint(0, vocab, (B, T + 1), device=device)
    x, y = batch[:, :-1], batch[:, 1:]
    dtype = {"bf16": torch.bfloat16, "fp16": torch.float16}.get(str(cfg.precision.dtype))
    autocast = torch.autocast(device.type, dtype=dtype) if dtype and device.type == "cuda" else contextlib.nullcontext()
    started = None
    for step in range(steps):
        if step == warmup:
            if device.type == "cuda":
                torch.cuda.synchronize()
            started = time.perf_counter()
        with autocast:
            _, loss = model(x, y)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), o.grad_clip)
        opt.step()
        opt.zero_grad(set_to_none=True)
    loss.item()  # waits for the device
    return (steps - warmup) * B * T / (time.perf_counter() - started)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--rounds", type=int, default=2)
    args, overrides = ap.parse_known_args()
    log = max(1, args.steps // 10)  # kiln's steady tokens/s leaves out its first log interval
    job = ["launcher=local", "model=tiny", "logger=none", "precision=fp32", "parallelism=zero0",
           "data.num_workers=1", f"trainer.max_steps={args.steps}", f"trainer.log_interval={log}",
           f"trainer.eval_interval={10 * args.steps}", "trainer.checkpoint_interval=0", *overrides]
    rates: dict[str, list[float]] = {"kiln": [], "hand": []}
    with tempfile.TemporaryDirectory(prefix="kiln-bench-overhead-") as tmp:
        for r in range(args.rounds):
            for side in ("hand", "kiln"):
                rate = (hand_side(job, args.steps, log) if side == "hand"
                        else kiln_side(job, Path(tmp) / f"{side}-{r}"))
                rates[side].append(rate)
                print(f"round {r + 1} {side}: {rate:,.0f} tokens/s", flush=True)
    ratio = sum(rates["kiln"]) / sum(rates["hand"])
    print(f"ratio kiln/hand tokens/s {ratio:.2f}  ({' '.join(job)})")


if __name__ == "__main__":
    sys.exit(main())
