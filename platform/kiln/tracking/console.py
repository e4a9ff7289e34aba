"""kiln's console: `[kiln] ...` lines, and rank 0's progress once per log interval.

Progress is a live bar where the driver's stdout is a terminal (progress.py) and one plain,
greppable line per interval everywhere else (CI, Slurm logs, `ray job logs`, a pipe):

    [kiln] step 210/1000 | loss 2.4512 | eval 2.3021 | lr 5.80e-04 | grad 1.210 | 6,338 tok/s

The launchers route the lines of the process they run in (`routed`): other ranks keep theirs in
their own log file (rank_log.py), and under a bar the step lines go to the file while the bar
shows them."""

from __future__ import annotations

import contextlib
import os
import sys
import time
from typing import Callable

PROGRESS_ENV = "KILN_PROGRESS"  # auto (default) | bar | lines


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


class _Route:
    """Where this process's kiln lines go (set by the launcher, for the run's duration)."""

    log = None  # this rank's RankLog: receives the lines kept off the console
    quiet = False  # a rank other than 0: its lines go to its log file alone
    progress: Callable[[dict], None] | None = None  # under a bar: takes each interval's record


def print_line(text: str) -> None:
    line = f"[kiln] {text}"
    if _Route.quiet and _Route.log is not None and _Route.log.record(line + "\n"):
        return
    print(line, file=sys.stdout, flush=True)


def show_progress(metrics: dict, max_steps: int) -> None:
    """Rank 0, once per log interval: the plain line, or (under a bar) the file gets the line and
    the bar the record."""
    if _Route.progress is None:
        print_line(format_line(metrics, max_steps))
        return
    if _Route.log is not None:
        _Route.log.record(f"[kiln] {format_line(metrics, max_steps)}\n")
    _Route.progress({"time": time.time(), **metrics})  # (when it was logged: the bar's ETA)


@contextlib.contextmanager
def routed(log=None, quiet: bool = False, progress: Callable[[dict], None] | None = None):
    saved = _Route.log, _Route.quiet, _Route.progress
    _Route.log, _Route.quiet, _Route.progress = log, quiet, progress
    try:
        yield
    finally:
        _Route.log, _Route.quiet, _Route.progress = saved


def wants_bar(stream=None) -> bool:
    """Decided once, on the driver (kiln-train's own process): a bar where its stdout is a terminal,
    plain lines where not. Under Ray a worker's stdout is never the terminal, so the workers are
    told (KILN_PROGRESS=bar|lines overrides: `lines` on a terminal that a tool records)."""
    setting = os.environ.get(PROGRESS_ENV, "auto").lower()
    if setting in ("bar", "lines"):
        return setting == "bar"
    stream = stream or sys.stdout
    try:
        return stream.isatty() and os.environ.get("TERM") != "dumb"
    except (AttributeError, ValueError):
        return False
