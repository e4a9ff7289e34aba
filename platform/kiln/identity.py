"""A run's identity: its name, and whether the user gave it.

Checkpoints live under <storage>/<run name>/, and only a run the user named continues them by
itself (trainer.resume=auto), as Composer's autoresume needs a run name: a new experiment never
silently resumes, or is refused by, someone else's checkpoints. An unnamed run gets a fresh name
(it says how to continue it). Launchers that restart a job (Slurm requeue, sweeps, KubeRay)
name their runs.
"""

from __future__ import annotations

import hashlib
import secrets
import sys
import time
from dataclasses import dataclass


def fresh_run_name() -> str:
    """run-<UTC date>-<time>-<random>: sortable, and distinct for runs started in the same second."""
    return f"run-{time.strftime('%Y%m%d-%H%M%S', time.gmtime())}-{secrets.token_hex(2)}"


def name_or(name: str | None, default: str) -> str:
    """Resolver `kiln_name`: the run's name in paths Hydra makes before kiln runs (hydra.run.dir)."""
    return name if name not in (None, "None", "null") else default


def sweep_name(name: str | None, _task_overrides=None) -> str:
    """Resolver `kiln_sweep_name` (hydra.sweep.dir): the sweep's run name, or for an unnamed sweep
    a name made from its command line, so that running the same sweep again finds its trials (and
    their checkpoints) again while another sweep gets its own."""
    if name not in (None, "None", "null"):
        return name
    args = sorted(a for a in sys.argv[1:] if a not in ("-m", "--multirun"))
    return "sweep-" + hashlib.sha1("\0".join(args).encode()).hexdigest()[:8]


@dataclass(frozen=True)
class SweepTrial:
    """One trial of a --multirun sweep: run `trial` of sweep `sweep_name` (checkpoints under
    <storage>/<sweep_name>/<trial>/; the trial is named by its overrides, so the same sweep run
    again maps every trial to its previous checkpoints)."""

    sweep_name: str
    trial: str
    num: int
    overrides: list[str]
