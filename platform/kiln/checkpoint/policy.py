"""Where a run's checkpoints are, and which one it starts from: decided once, on the driver,
before any worker starts, and never by silently starting over."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kiln.checkpoint.meta import read_meta
from kiln.checkpoint.store import complete_checkpoints, recover
from kiln.config.schema import ResumeMode, TrainerConfig
from kiln.errors import ConfigError


def storage_root(storage_path: str | None) -> str:
    """launcher.storage_path made absolute (cloud URIs, for Ray, pass through)."""
    path = storage_path or "checkpoints"
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


@dataclass(frozen=True)
class ResumeSource:
    """What the run starts from. checkpoint None: fresh (or, on remote storage, whatever Ray
    Train holds for the run). own: the run's own latest checkpoint (it continues); otherwise
    trainer.resume_from, another run's checkpoint it branches from."""

    checkpoint: Path | None = None
    step: int = 0
    own: bool = False


def decide_resume(trainer: TrainerConfig, run_name: str, named: bool, storage: str) -> ResumeSource:
    mode, branch_from = trainer.resume, trainer.resume_from
    if mode == ResumeMode.require and not named:
        raise ConfigError("trainer.resume", "trainer.resume=require continues a named run, and this run has no name",
                          "set trainer.run_name to the run to continue")
    branch = None
    if branch_from is not None:
        branch = Path(branch_from).expanduser().resolve()
        if not (branch / "kiln" / "meta.json").is_file():
            raise ConfigError("trainer.resume_from", f"{branch} is not a kiln checkpoint (no kiln/meta.json)",
                              "point trainer.resume_from at a step_* directory")
    if "://" in storage:  # remote: Ray Train finds the run's latest checkpoint itself
        if mode == ResumeMode.never:
            raise ConfigError("trainer.resume", f"resume=never needs storage kiln can list; {storage} is a remote URI",
                              "use trainer.resume=auto with remote storage")
        return ResumeSource(branch, read_meta(branch)["step"] if branch else 0, own=False)
    run_dir = Path(storage) / run_name
    recover(run_dir)  # a save killed while replacing a step leaves it aside: see it as the run's
    existing = complete_checkpoints(run_dir)
    if existing and mode == ResumeMode.never:
        raise ConfigError("trainer.resume", f"run {run_name!r} already has checkpoints in {run_dir} (latest: "
                          f"{existing[-1].name}); refusing to start it over and mix old and new checkpoints",
                          "continue it with trainer.resume=auto, choose another trainer.run_name, or delete that directory")
    if existing and named:  # a named run continues its own checkpoints (a requeued branch too)
        return ResumeSource(existing[-1], read_meta(existing[-1])["step"], own=True)
    if mode == ResumeMode.require:
        raise ConfigError("trainer.resume", f"trainer.resume=require but run {run_name!r} has no checkpoint in {run_dir}",
                          "check trainer.run_name and launcher.storage_path, or use trainer.resume=auto")
    if branch is not None:
        return ResumeSource(branch, read_meta(branch)["step"], own=False)
    return ResumeSource()
