"""What kiln-report reads: a run directory (metrics.jsonl, summary.json, .hydra/overrides.yaml)
and a sweep directory (one run directory per trial, trial.json in each, trials.json beside them)."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from kiln.errors import KilnError

METRICS, SUMMARY, TRIAL, TRIALS = "metrics.jsonl", "summary.json", "trial.json", "trials.json"
EVENTS = "events.jsonl"  # kiln/tracking/events.py
OVERRIDES = Path(".hydra") / "overrides.yaml"
WHERE = "a run's output directory (outputs/<run_name>/<timestamp>) or a sweep's (multirun/<run_name>)"


class ReportError(KilnError):
    """A run or sweep directory kiln-report cannot read; the message names the file (and line)."""


def is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def read_metrics(path: Path) -> list[dict]:
    """metrics.jsonl's records in file order; each must be a JSON object with an integer step."""
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except UnicodeDecodeError:
        raise ReportError(f"{path}: not UTF-8 text\n  fix: point kiln-report at a kiln run's metrics.jsonl") from None
    records = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ReportError(f"{path}:{n}: not valid JSON ({e.msg}, column {e.colno})\n  fix: repair or delete "
                              "that line (a run killed mid-write can leave a partial last line)") from None
        step = record.get("step") if isinstance(record, dict) else None
        if not isinstance(step, int) or isinstance(step, bool):
            raise ReportError(f"{path}:{n}: not a metrics record (a JSON object with an integer `step`)\n"
                              "  fix: repair or delete that line")
        records.append(record)
    return records


def last_per_step(records: list[dict]) -> list[dict]:
    """One record per step, in step order, the last one written. A resumed run appends to
    metrics.jsonl from its checkpoint on, so the steps after that checkpoint appear again: the
    restart's records replace the abandoned ones, and those it did not log again are dropped too
    (they belong to the timeline the restart threw away)."""
    kept: list[dict] = []
    for r in records:
        while kept and kept[-1]["step"] >= r["step"]:
            kept.pop()
        kept.append(r)
    return kept


def read_json(path: Path):
    """A JSON file's value, or None when it does not exist."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid JSON ({e})\n  fix: repair or delete it") from None


def read_overrides(run_dir: Path) -> list[str] | None:
    """The run's command-line overrides as Hydra recorded them, or None without that file."""
    path = run_dir / OVERRIDES
    try:
        value = yaml.safe_load(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (yaml.YAMLError, UnicodeDecodeError) as e:
        raise ReportError(f"{path}: not valid YAML ({e})\n  fix: repair or delete it") from None
    return [str(o) for o in value] if isinstance(value, list) else None


@dataclass
class Run:
    path: Path
    records: list[dict]          # one per step (last_per_step)
    replaced: int                # records a resumed run logged again (or abandoned)
    summary: dict                # summary.json; {} while the run has none (running, or killed)
    overrides: list[str] | None  # .hydra/overrides.yaml
    events: list[dict] = field(default_factory=list)  # events.jsonl: loss spikes rolled back, ...

    @property
    def name(self) -> str:
        return self.summary.get("run_name") or self.path.name

    def series(self, key: str) -> tuple[list[int], list[float]]:
        """(steps, values) of the records where `key` is a finite number (NaN loss: left out)."""
        points = [(r["step"], float(r[key])) for r in self.records if is_number(r.get(key))]
        return [s for s, _ in points], [v for _, v in points]


def read_run(path: Path) -> Run:
    """A run directory as it is (its metrics may be empty)."""
    metrics = path / METRICS
    if not path.is_dir():
        problem = "not a directory" if path.exists() else "no such directory"
        raise ReportError(f"{path}: {problem}\n  fix: pass {WHERE}")
    if not metrics.is_file():
        hint = "; it is a sweep directory: give it on its own" if is_sweep(path) else ""
        raise ReportError(f"{metrics}: not found, so {path} is not a kiln run directory{hint}\n  fix: pass {WHERE}")
    raw = read_metrics(metrics)
    records = last_per_step(raw)
    summary = read_json(path / SUMMARY)
    return Run(path, records, len(raw) - len(records), summary if isinstance(summary, dict) else {},
               read_overrides(path), read_events(path / EVENTS))


def read_events(path: Path) -> list[dict]:
    """events.jsonl's events that have a kind and a step; a line cut short by a kill (the last)
    or anything else unreadable is left out: events annotate the curves, they are not the data."""
    try:
        lines = path.read_text(encoding="utf-8", errors="replace").splitlines()
    except FileNotFoundError:
        return []
    events = []
    for line in lines:
        try:
            e = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(e, dict) and isinstance(e.get("event"), str) and isinstance(e.get("step"), int):
            events.append(e)
    return events


def describe_event(e: dict) -> str:
    """One line for an event: its kind, and what the run did about it."""
    if e["event"] == "loss_spike":
        loss = f"loss {e['loss']:.4g}" if is_number(e.get("loss")) else "loss"
        limit = f" > limit {e['limit']:.4g}" if is_number(e.get("limit")) else ""
        back = e.get("rolled_back_to")
        done = (f"rolled back to step {back}, skipped {e.get('skipped_micro_batches', '?')} micro-batch(es)"
                if back is not None else "no checkpoint to roll back to")
        return f"step {e['step']}: loss spike ({loss}{limit}); {done}"
    return f"step {e['step']}: {e['event']}"


def load_run(path: Path) -> Run:
    """A run directory with at least one logged step."""
    run = read_run(path)
    if not run.records:
        raise ReportError(f"{path / METRICS}: empty: the run logged no step yet (the first record comes "
                          "after trainer.log_interval steps)\n  fix: wait for it, or lower trainer.log_interval")
    return run


def trial_dirs(path: Path) -> list[Path]:
    """Subdirectories that are trials: each holds metrics.jsonl or kiln's trial.json."""
    if not path.is_dir():
        return []
    return [d for d in path.iterdir() if d.is_dir() and ((d / METRICS).is_file() or (d / TRIAL).is_file())]


def is_sweep(path: Path) -> bool:
    return not (path / METRICS).is_file() and ((path / TRIALS).is_file() or bool(trial_dirs(path)))


@dataclass
class Trial:
    num: int | None
    name: str                    # its directory's name
    overrides: list[str]
    status: str
    final_eval_loss: float | None
    run: Run | None              # None: it failed before it logged anything


def load_sweep(path: Path) -> list[Trial]:
    """Every trial: those kiln's trials.json lists (some may have no directory: they failed
    early) and every trial directory, in trial order."""
    rows = {}
    for r in read_json(path / TRIALS) or []:
        if isinstance(r, dict) and (r.get("output_dir") or r.get("trial")):
            rows[Path(r.get("output_dir") or r["trial"]).name] = r
    for d in trial_dirs(path):
        record = read_json(d / TRIAL)
        rows[d.name] = record if isinstance(record, dict) else rows.get(d.name, {})
    trials = []
    for name, row in rows.items():
        d = path / name
        run = read_run(d) if (d / METRICS).is_file() else None
        summary = run.summary if run else read_json(d / SUMMARY) or {}
        if "final_eval_loss" in row:  # kiln's own record: None for a failed trial
            final = row["final_eval_loss"]
        else:
            evals = run.series("eval_loss")[1] if run else []
            final = summary.get("final_eval_loss", evals[-1] if evals else None)
        status = row.get("status") or ("done" if summary else "no summary.json (running, or killed)")
        if summary.get("stopped_early_at") and not row.get("status"):
            status = f"stopped at step {summary['stopped_early_at']}"
        overrides = (run.overrides if run else read_overrides(d)) or row.get("overrides") or [name]
        num = row.get("num", int(name) if name.isdigit() else None)  # Hydra's default subdirs: 0/, 1/...
        trials.append(Trial(num, name, overrides, status, final, run))
    return sorted(trials, key=lambda t: (t.num is None, t.num or 0, t.name))


def distinct_labels(overrides: list[list[str]]) -> tuple[list[str], list[str]]:
    """(a label per trial: the overrides that differ between trials, the overrides all share)."""
    common = set.intersection(*map(set, overrides)) if len(overrides) > 1 else set()
    labels = [" ".join(o for o in over if o not in common) or "(defaults)" for over in overrides]
    return labels, [o for o in overrides[0] if o in common] if overrides else []


def run_labels(runs: list[Run]) -> list[str]:
    """run_name where it tells the runs apart, else the directory name, else the whole path."""
    for label in (lambda r: r.name, lambda r: r.path.name, lambda r: str(r.path)):
        labels = [label(r) for r in runs]
        if len(set(labels)) == len(labels):
            return labels
    return labels
