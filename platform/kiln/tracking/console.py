"""One readable progress line per log interval, from rank 0 only."""

from __future__ import annotations

import sys


def format_line(m: dict, max_steps: int) -> str:
    parts = [f"step {m['step']:>{len(str(max_steps))}}/{max_steps}", f"loss {m['loss']:.4f}"]
    if "eval_loss" in m:
        split = m.get("eval_split")
        parts.append(f"eval {m['eval_loss']:.4f}" + (f" (on {split} shards)" if split else ""))
    parts.append(f"lr {m['lr']:.2e}")
    if m.get("grad_norm") is not None:
        parts.append(f"grad {m['grad_norm']:.3f}")
    parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
    if m.get("mfu") is not None:
        parts.append(f"MFU {100 * m['mfu']:.1f}%")
    return " | ".join(parts)


def print_line(text: str) -> None:
    print(f"[kiln] {text}", file=sys.stdout, flush=True)
