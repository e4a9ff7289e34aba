"""kiln-report: a run's curves as PNG files, and a short text summary, from its metrics.jsonl.

    kiln-report outputs/mine/2026-12-01_13-51-06          # one run -> <run>/report/*.png
    kiln-report multirun/lr-sweep                         # a sweep: one curve per trial, the trials table
    kiln-report outputs/a/<ts> outputs/b/<ts> --out cmp   # several runs overlaid

Draws loss.png (train and eval), lr.png, throughput.png, mfu.png (when logged), grad_norm.png and
other.png (any other numeric key, e.g. data/*). A resumed run's repeated steps count once: the
last record of each step wins. Unreadable input (no metrics.jsonl, an empty one, a malformed
line) is refused with exit code 2, naming the file and line.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kiln.errors import KilnError
from kiln.report.plots import draw
from kiln.report.series import (METRICS, ReportError, Run, distinct_labels, is_sweep, load_run, load_sweep,
                                run_labels)
from kiln.report.summary import best_trial, run_lines, trials_table


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="kiln-report", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("dirs", nargs="+", type=Path, metavar="DIR",
                   help="a run directory (holds metrics.jsonl), a sweep directory, or several run directories")
    p.add_argument("--out", type=Path, default=None,
                   help="where the PNG files go (default: DIR/report; required for several directories)")
    return p.parse_args(argv)


def sweep_report(sweep: Path) -> tuple[list[Run], list[str], list[str]]:
    """(the trials that logged steps, their labels, the text: the trials table)."""
    trials = load_sweep(sweep)
    labels, common = distinct_labels([t.overrides for t in trials])
    lines = [f"sweep {sweep}: {len(trials)} trial(s)" + (f"; all with {' '.join(common)}" if common else ""),
             trials_table(trials, labels), *best_trial(trials, labels)]
    drawn = [(t.run, label) for t, label in zip(trials, labels) if t.run and t.run.records]
    return [run for run, _ in drawn], [label for _, label in drawn], lines


def report(dirs: list[Path], out: Path | None) -> list[str]:
    """Draw the pictures; return the text to print."""
    dirs = [d.parent if d.name == METRICS and d.is_file() else d for d in dirs]  # the file itself: its run
    if len(dirs) == 1 and is_sweep(dirs[0]):
        runs, labels, lines = sweep_report(dirs[0])
        title = f"sweep {dirs[0].name}"
        if not runs:
            return lines + ["no trial has logged a step yet: nothing to draw"]
    else:
        if len(dirs) > 1 and out is None:
            raise ReportError(f"{len(dirs)} run directories: their overlay needs a place\n  fix: add --out DIR")
        runs = [load_run(d) for d in dirs]
        labels = run_labels(runs)
        title = " vs ".join(labels) if len(" vs ".join(labels)) <= 60 else f"{len(runs)} runs"
        lines = [line for run, label in zip(runs, labels) for line in run_lines(run, f"run {label}")]
    pictures, undrawn = draw(runs, labels, title, out or dirs[0] / "report")
    lines += ["pictures:", *(f"  {p}" for p in pictures)]
    if undrawn:
        lines.append(f"  (not drawn, over the limit of other.png: {', '.join(undrawn)})")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        lines = report(args.dirs, args.out)
    except KilnError as e:
        print(f"kiln-report: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # e.g. --out not writable: the error names the path
        print(f"kiln-report: cannot write the pictures: {e}", file=sys.stderr)
        return 2
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
