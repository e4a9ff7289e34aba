"""Everything rank 0 records about a run: console, metrics.jsonl, W&B, and summary.json."""

from __future__ import annotations

import json
from pathlib import Path

from kiln.tracking import wandb_run
from kiln.tracking.console import show_progress
from kiln.tracking.jsonl import JsonlWriter

SUMMARY = "summary.json"


class Tracker:
    """Only rank 0 builds a real Tracker; the other ranks get NullTracker."""

    def __init__(self, cfg, output_dir: Path, resume_id: str | None = None, public_config: dict | None = None):
        """cfg: the run's TrainConfig; public_config: what W&B records of it (credentials redacted)."""
        self.cfg, self.output_dir = cfg, output_dir
        self.max_steps = cfg.trainer.max_steps
        self.jsonl = JsonlWriter(output_dir / "metrics.jsonl")
        enabled = wandb_run.resolve_mode(cfg.logger) != "disabled"
        # None also where W&B could not start at all (it warned): W&B never stops training.
        self.wandb = wandb_run.start(cfg, output_dir, resume_id, public_config) if enabled else None
        # Saved in checkpoints, so that a resumed run continues the same W&B run.
        self.wandb_id = self.wandb.run.id if self.wandb else None

    def log(self, metrics: dict) -> None:
        self.jsonl.log(metrics)
        if self.wandb:
            self.wandb.log(metrics, step=metrics["step"])
        show_progress(metrics, self.max_steps)  # a line, or the bar on a terminal

    def finish(self, summary: dict) -> dict:
        self.jsonl.close()
        summary = dict(summary, metrics_file=str(self.jsonl.path))
        summary["wandb"] = self.wandb.finish(summary) if self.wandb else None
        tmp = self.output_dir / (SUMMARY + ".tmp")
        tmp.write_text(json.dumps(summary, indent=2) + "\n")
        tmp.replace(self.output_dir / SUMMARY)
        return summary


class NullTracker:
    def log(self, metrics: dict) -> None:
        pass

    def finish(self, summary: dict) -> dict:
        return summary
