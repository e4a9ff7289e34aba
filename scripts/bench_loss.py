"""kiln's LM loss (kiln/model/loss.py) against the usual F.cross_entropy(logits.float()), side by
side in one process on the same logits: the memory autograd keeps for the backward pass (summed
over the tensors it saves, plus the logits the caller holds: exact, on any device) and the time
of forward + backward of the loss alone. Prints ratios (kiln / usual) last.

    python scripts/bench_loss.py                       # GPT-2's padded vocabulary; CPU: 256 rows fp32, GPU: 16384 bf16
    python scripts/bench_loss.py --rows 4096 --dtype bf16           # any size (bf16 matmuls crawl on most CPUs)
"""

from __future__ import annotations

import argparse
import sys
import time

import torch
import torch.nn.functional as F

from kiln.model.loss import cross_entropy


def usual(logits, targets):
    return F.cross_entropy(logits.float().view(-1, logits.size(-1)), targets.view(-1))


def saved_bytes(loss_fn, hidden, head, targets) -> int:
    """Bytes of the tensors autograd saves from the head's output on (the head's own input and
    weight are the same for both sides and left out), plus the logits when the caller keeps them."""
    seen: dict[int, int] = {}

    def pack(t):
        if t.data_ptr() not in (hidden.data_ptr(), head.data_ptr()):
            seen[t.data_ptr()] = t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        logits = hidden @ head.t()
        loss = loss_fn(logits, targets)
    kept = logits.numel() * logits.element_size() if loss_fn is usual else 0  # kiln's model drops them
    total = sum(seen.values()) + kept
    loss.backward()
    return total


def timed(loss_fn, hidden, head, targets, repeats: int) -> float:
    sync = torch.cuda.synchronize if hidden.is_cuda else (lambda: None)
    best = float("inf")
    for _ in range(repeats):
        sync()
        t0 = time.perf_counter()
        loss_fn(hidden @ head.t(), targets).backward()
        sync()
        best = min(best, time.perf_counter() - t0)
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rows", type=int, default=None, help="tokens per micro-batch, B x T (gpt2-small at 16 x 1024 on a GPU)")
    ap.add_argument("--vocab", type=int, default=50304)
    ap.add_argument("--width", type=int, default=768)
    ap.add_argument("--dtype", choices=["bf16", "fp32"], default=None, help="default: bf16 on a GPU, fp32 on a CPU")
    ap.add_argument("--repeats", type=int, default=5)
    args = ap.parse_args()
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    args.rows = args.rows or (16384 if device.type == "cuda" else 256)
    args.dtype = args.dtype or ("bf16" if device.type == "cuda" else "fp32")
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    g = torch.Generator(device=device).manual_seed(0)
    hidden = torch.randn(args.rows, args.width, device=device, dtype=dtype, generator=g, requires_grad=True)
    head = (torch.randn(args.vocab, args.width, device=device, dtype=dtype, generator=g) * 0.02).requires_grad_()
    targets = torch.randint(0, args.vocab, (args.rows,), device=device, generator=g)
    out = {}
    for name, fn in (("usual", usual), ("kiln", cross_entropy)):
        mem = saved_bytes(fn, hidden, head, targets)
        out[name] = (mem, timed(fn, hidden, head, targets, args.repeats))
        print(f"{name:5s}: {mem / 2**20:9.1f} MiB kept for backward | {out[name][1] * 1e3:8.1f} ms forward+backward",
              flush=True)
    print(f"ratio kiln/usual memory {out['kiln'][0] / out['usual'][0]:.2f}  time {out['kiln'][1] / out['usual'][1]:.2f}  "
          f"({args.rows} x {args.vocab} logits, {args.dtype}, {device})")


if __name__ == "__main__":
    sys.exit(main())
