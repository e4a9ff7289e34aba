"""One launcher interface, `run(plan) -> summary`, for both ways a run starts.

    LocalLauncher   launcher=local: this process, world size 1
    RayLauncher     launcher=ray: Ray Train workers (a local instance or a cluster)

`run` is what kiln-train (and a test, in-process) calls with a plan: it skips a run that already
finished, stores the resolved config beside the run's outputs, and launches.
"""

from __future__ import annotations

import json
from typing import Protocol

from omegaconf import OmegaConf

from kiln.config.schema import LauncherName
from kiln.launch.local import LocalLauncher
from kiln.launch.ray_launcher import RayLauncher
from kiln.plan import RunPlan
from kiln.tracking.console import print_line
from kiln.tracking.tracker import SUMMARY


class Launcher(Protocol):
    def run(self, plan: RunPlan) -> dict: ...


def launcher_for(plan: RunPlan) -> Launcher:
    return LocalLauncher() if plan.config.launcher.name == LauncherName.local else RayLauncher()


def run(plan: RunPlan, launcher: Launcher | None = None) -> dict:
    """Train the planned run; returns its summary (skipped=True: it had already finished)."""
    if plan.finished:
        return finished_summary(plan)
    plan.output_dir.mkdir(parents=True, exist_ok=True)
    # The config as this run uses it (Hydra's .hydra/config.yaml keeps the unresolved one).
    resolved = {**plan.public_config, "output_dir": str(plan.output_dir)}  # credentials redacted
    OmegaConf.save(OmegaConf.create(resolved), plan.output_dir / "resolved_config.yaml")
    if not plan.named:
        print_line(f"run {plan.run_name} (unnamed: a new run; to continue it later, add trainer.run_name="
                   f"{plan.run_name})")
    elif plan.resume.checkpoint is not None and not plan.resume.own:
        print_line(f"run {plan.run_name} starts from {plan.resume.checkpoint} (trainer.resume_from)")
    return (launcher or launcher_for(plan)).run(plan)


def finished_summary(plan: RunPlan) -> dict:
    """Running a finished run (or a sweep's finished trial) again trains nothing."""
    step, max_steps = plan.resume.step, plan.config.trainer.max_steps
    print_line(f"run {plan.run_name} already reached step {step} of trainer.max_steps={max_steps}; raise "
               f"trainer.max_steps to train on, or choose another trainer.run_name for a new run")
    previous = plan.output_dir / SUMMARY  # a sweep trial re-uses its output directory
    if previous.is_file():
        # (finished: even if that last run was stopped exactly at max_steps)
        return dict(json.loads(previous.read_text()), skipped=True, stopped_early_at=None)
    return {"run_name": plan.run_name, "steps": step, "final_loss": None, "final_eval_loss": None,
            "tokens_per_s": None, "output_dir": str(plan.output_dir), "wandb": None, "skipped": True}
