"""kiln-report's text: a few lines per run, the trials table of a sweep."""

from __future__ import annotations

import math

from kiln.report.series import Run, Trial, describe_event


def best(run: Run | None, key: str) -> tuple[float, int] | None:
    """(lowest value, its step); the earliest step on a tie."""
    if run is None:
        return None
    x, y = run.series(key)
    return min(zip(y, x)) if y else None


def mean(run: Run, key: str) -> tuple[float, int] | None:
    y = run.series(key)[1]
    return (sum(y) / len(y), len(y)) if y else None


def run_lines(run: Run, label: str) -> list[str]:
    s = run.summary
    replaced = f"; {run.replaced} record(s) replaced by a resumed run's" if run.replaced else ""
    state = "" if s else "; no summary.json yet (running, or killed)"
    lines = [f"{label}: {run.path}",
             f"  steps       {run.records[-1]['step']} ({len(run.records)} records{replaced}){state}"]
    x, y = run.series("loss")
    if y:
        lines.append(f"  train loss  final {y[-1]:.4f} at step {x[-1]}")
    x, y = run.series("eval_loss")
    if y:
        low, at = best(run, "eval_loss")
        lines.append(f"  eval loss   final {y[-1]:.4f} at step {x[-1]}; best {low:.4f} at step {at}")
    else:
        lines.append("  eval loss   none logged (trainer.eval_interval sets how often)")
    if tps := mean(run, "tokens_per_s"):
        steady = f"; steady {s['tokens_per_s']:,.0f} (summary.json)" if s.get("tokens_per_s") else ""
        lines.append(f"  tokens/s    mean {tps[0]:,.0f} over {tps[1]} intervals{steady}")
    if m := mean(run, "mfu"):
        steady = f"; steady {100 * s['mfu']:.1f}% (summary.json)" if s.get("mfu") is not None else ""
        lines.append(f"  MFU         mean {100 * m[0]:.1f}% over {m[1]} intervals{steady}")
    else:
        lines.append(f"  MFU         n/a: {s.get('mfu_basis') or 'none logged'}")
    for i, e in enumerate(run.events):
        lines.append(f"  {'events' if i == 0 else '':<12}{describe_event(e)}")
    return lines


def table(header: list[str], rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in [header, *rows])


def trials_table(trials: list[Trial], labels: list[str]) -> str:
    rows = []
    for t, label in zip(trials, labels):
        low = best(t.run, "eval_loss")
        rows.append(["-" if t.num is None else str(t.num), label,
                     "-" if t.final_eval_loss is None else f"{t.final_eval_loss:.4f}",
                     "-" if low is None else f"{low[0]:.4f} @ {low[1]}", t.status])
    return table(["trial", "overrides", "final eval loss", "best eval loss @ step", "status"], rows)


def best_trial(trials: list[Trial], labels: list[str]) -> list[str]:
    """The line naming the trial with the lowest final eval loss (none if no trial has one)."""
    finished = [(t.final_eval_loss, t, label) for t, label in zip(trials, labels)
                if isinstance(t.final_eval_loss, (int, float)) and math.isfinite(t.final_eval_loss)]
    if not finished:
        return []
    low, t, label = min(finished, key=lambda f: f[0])
    return [f"best: trial {t.name if t.num is None else t.num} ({label}): final eval loss {low:.4f}"]
