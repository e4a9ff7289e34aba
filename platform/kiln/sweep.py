"""Hydra --multirun sweeps: every trial is its own run (own output directory, checkpoint folder and
W&B run, grouped by the sweep) on the one Ray instance the sweep started.

    multirun/<sweep>/                      hydra.sweep.dir (stable: the same command finds it again)
        trials.md, trials.json             the table of trials, rewritten after every trial
        <trial>/                           one trial's output dir: metrics.jsonl, summary.json, trial.json
    <storage_path>/<sweep>/<trial>/step_*  its checkpoints

<trial> is the trial's own overrides (`model=tiny,optim.lr=0.0003`), so running the same sweep
again maps every trial to its previous directory and checkpoints: finished trials are skipped,
interrupted ones resume, failed ones are tried again.
"""

from __future__ import annotations

import hashlib
import json
import math
import re
import sys
import traceback
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from hydra.core.override_parser.overrides_parser import OverridesParser
from hydra.core.utils import JobStatus
from hydra.experimental.callback import Callback
from hydra.types import RunMode

from kiln.config.redact import redact, redact_text
from kiln.config.schema import LauncherName, load_config
from kiln.errors import KilnError
from kiln.estimate import check_plan
from kiln.identity import SweepTrial
from kiln.launch.launcher import LocalLauncher, RayLauncher, run
from kiln.plan import plan_run
from kiln.tracking.console import print_line

TRIAL_FILE = "trial.json"
_UNSAFE = re.compile(r"[^A-Za-z0-9._=,+\-]")


def swept_keys(sweeper_params: Any) -> set[str]:
    """Keys the sweep varies: sweep overrides on the command line (`optim.lr=1e-4,3e-4`, range(),
    choice()...) and the keys of hydra.sweeper.params (basic and Optuna sweepers)."""
    keys = set(dict(sweeper_params or {}))
    args = [a for a in sys.argv[1:] if not a.startswith("-") and "=" in a]
    try:
        parsed = OverridesParser.create().parse_overrides(overrides=args)
    except Exception:  # not our command line (e.g. tests composing configs): no sweep keys from it
        parsed = []
    keys.update(o.get_key_element() for o in parsed if o.is_sweep_override())
    return {k.lstrip("+~") for k in keys if not k.lstrip("+~").startswith("hydra")}


def trial_dir_name(task_overrides: Any, sweeper_params: Any = None) -> str:
    """hydra.sweep.subdir of a trial: its values of the swept keys (`optim.lr=0.0003,model=tiny`),
    filesystem-safe and bounded; all its overrides where nothing is swept."""
    overrides = [str(o) for o in (task_overrides or [])]
    swept = swept_keys(sweeper_params)
    chosen = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") in swept] or overrides
    # (redacted first: a credential typed into an override must not name a directory, a W&B run)
    name = _UNSAFE.sub("_", redact_text(",".join(sorted(chosen)))) or "defaults"
    if len(name) > 120:  # keep paths well under filesystem limits, still unique
        name = f"{name[:100]}-{hashlib.sha1(name.encode()).hexdigest()[:12]}"
    return name


def current_trial() -> SweepTrial | None:
    """The trial this process is running under `--multirun`, or None for a single run."""
    if not HydraConfig.initialized():
        return None
    hc = HydraConfig.get()
    if hc.mode != RunMode.MULTIRUN:
        return None
    # The trial is named by its directory (hydra.sweep.subdir, from the kiln_trial resolver).
    return SweepTrial(sweep_name=Path(hc.sweep.dir).name, trial=Path(hc.runtime.output_dir).name,
                      num=hc.job.num, overrides=list(hc.overrides.task))


class Sweep:
    """The --multirun sweep this process runs, trial after trial (Hydra calls kiln-train's task
    function once per trial). Its Ray trials share one launcher, so one Ray instance; a failed
    trial is recorded and the sweep goes on; a stopped one (SIGTERM) is checkpointed and the rest
    are recorded as not run."""

    _this_process: "Sweep | None" = None

    def __init__(self):
        self.stopped = False
        self.ray = RayLauncher(keep_ray=True)  # Ray stays up for the next trial

    @classmethod
    def of_this_process(cls) -> "Sweep":
        if cls._this_process is None:
            cls._this_process = cls()
        return cls._this_process

    def run_trial(self, cfg, trial: SweepTrial, output_dir: Path) -> float:
        """One trial of Hydra's composed config; returns the objective Hydra's sweepers minimise."""
        label = trial.trial.replace(",", " ")
        if self.stopped:
            record_trial(output_dir, trial, "not run (sweep stopped)")
            return math.inf
        print_line(f"trial {trial.num}: {label}")
        try:
            plan = plan_run(load_config(cfg), output_dir, trial=trial)
            if not plan.finished:
                check_plan(plan, print_line)  # a trial that cannot fit in device memory fails before launch
            launcher = LocalLauncher() if plan.config.launcher.name == LauncherName.local else self.ray
            summary = run(plan, launcher)
        except Exception as e:
            if not isinstance(e, KilnError):
                traceback.print_exc()
            print(f"kiln-train: trial {trial.num} ({label}) failed: {e}", file=sys.stderr, flush=True)
            record_trial(output_dir, trial, "failed", error=failure_text(e))
            return math.inf
        if summary.get("stopped_early_at"):
            self.stopped = True
            status = "interrupted"
            print_line("sweep stopped: the remaining trials are not run; run the same command to continue")
        else:
            status = "skipped (finished before)" if summary.get("skipped") else "done"
        record_trial(output_dir, trial, status, summary)
        return objective(summary)


def record_trial(output_dir: Path, trial: SweepTrial, status: str, summary: dict | None = None,
                 error: str | None = None) -> None:
    """trial.json in the trial's output dir: what the table (and a re-run) reads."""
    s = summary or {}
    record = {
        "num": trial.num, "trial": trial.trial, "overrides": redact(list(trial.overrides)), "status": status,
        "final_eval_loss": s.get("final_eval_loss"), "final_loss": s.get("final_loss"),
        "tokens_per_s": s.get("tokens_per_s"), "steps": s.get("steps"), "error": redact(error),
        "output_dir": str(output_dir),
    }
    output_dir.mkdir(parents=True, exist_ok=True)
    tmp = output_dir / (TRIAL_FILE + ".tmp")
    tmp.write_text(json.dumps(record, indent=2) + "\n")
    tmp.replace(output_dir / TRIAL_FILE)


def failure_text(exc: BaseException) -> str:
    if isinstance(exc, KilnError):
        return str(exc)
    return "".join(traceback.format_exception_only(type(exc), exc)).strip()


def objective(summary: dict | None) -> float:
    """What sweepers minimise: the final eval loss. A trial without one (failed, diverged, not
    run) reports +inf, the worst value: Optuna's sweeper aborts the whole search on NaN."""
    value = (summary or {}).get("final_eval_loss")
    return float(value) if value is not None and math.isfinite(value) else math.inf


def format_table(rows: list[dict]) -> str:
    def fmt(v: Any, spec: str) -> str:
        return "-" if v is None else format(v, spec)

    header = "| # | trial | status | eval loss | tokens/s | steps |"
    lines = [header, "|---|---|---|---|---|---|"]
    for r in rows:
        over = r["trial"].replace(",", " ")  # its swept values; all its overrides are in trials.json
        error = " ".join(line.strip() for line in (r.get("error") or "").splitlines() if line.strip())
        status = r["status"] + (f": {error[:160]}" if error else "")
        lines.append(f"| {r['num']} | {over} | {status} | {fmt(r['final_eval_loss'], '.4f')} | "
                     f"{fmt(r['tokens_per_s'], ',.0f')} | {fmt(r['steps'], 'd')} |")
    return "\n".join(lines)


class TrialsTable(Callback):
    """Hydra callback: after every trial, rewrite <sweep dir>/trials.{md,json}; print it at the end."""

    def __init__(self) -> None:
        self.rows: dict[int, dict] = {}
        self.sweep_dir: Path | None = None

    def on_multirun_start(self, config, **kwargs) -> None:
        self.sweep_dir = Path(config.hydra.sweep.dir).resolve()

    def on_job_end(self, config, job_return, **kwargs) -> None:
        if self.sweep_dir is None:  # a single run (callbacks fire for those too)
            return
        out = Path(job_return.hydra_cfg.hydra.runtime.output_dir)
        record_path = out / TRIAL_FILE
        num = job_return.hydra_cfg.hydra.job.num
        if record_path.is_file():
            row = json.loads(record_path.read_text())
        else:  # the trial died before kiln could record it (Hydra caught the exception)
            err = job_return._return_value if job_return.status == JobStatus.FAILED else None
            row = {"num": num, "trial": out.name, "overrides": redact(list(job_return.overrides or [])),
                   "status": "failed", "final_eval_loss": None, "final_loss": None, "tokens_per_s": None,
                   "steps": None, "error": failure_text(err) if err else "no trial record", "output_dir": str(out)}
        row["num"] = num
        self.rows[num] = row
        self.write()

    def write(self) -> None:
        if self.sweep_dir is None or not self.rows:
            return
        rows = [self.rows[k] for k in sorted(self.rows)]
        self.sweep_dir.mkdir(parents=True, exist_ok=True)
        (self.sweep_dir / "trials.json").write_text(json.dumps(rows, indent=2) + "\n")
        (self.sweep_dir / "trials.md").write_text(format_table(rows) + "\n")

    def on_multirun_end(self, config, **kwargs) -> None:
        if not self.rows:
            return
        rows = [self.rows[k] for k in sorted(self.rows)]
        counts: dict[str, int] = {}
        for r in rows:
            counts[r["status"]] = counts.get(r["status"], 0) + 1
        print_line(f"sweep: {len(rows)} trial(s): " + ", ".join(f"{n} {s}" for s, n in sorted(counts.items())))
        print(format_table(rows), flush=True)
        print_line(f"trials table: {self.sweep_dir}/trials.md (and trials.json)")
