"""Weights & Biases from rank 0: online with credentials, offline without, or off."""

from __future__ import annotations

import os
from pathlib import Path

from kiln.config.redact import redact


def has_wandb_credentials() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path(os.environ.get("NETRC", Path.home() / ".netrc"))
    try:
        return "api.wandb.ai" in netrc.read_text()
    except OSError:
        return False


def resolve_mode(logger_cfg) -> str:
    """auto -> online when credentials exist, else offline; 'none' logger -> disabled."""
    if logger_cfg.name == "none":
        return "disabled"
    if logger_cfg.mode == "auto":
        return "online" if has_wandb_credentials() else "offline"
    return str(logger_cfg.mode)


class WandbRun:
    def __init__(self, cfg, output_dir: Path, resume_id: str | None = None, public_config: dict | None = None):
        import wandb  # here: W&B takes seconds to import, and only rank 0 of a logged run needs it

        self.mode = resolve_mode(cfg.logger)
        lg = cfg.logger
        os.environ.setdefault("WANDB_SILENT", "true")  # W&B's banner would break kiln's console
        self.run = wandb.init(
            project=lg.project,
            entity=lg.entity,
            group=lg.group,
            tags=list(lg.tags) or None,
            name=cfg.trainer.run_name,
            # A resumed kiln run continues its W&B run: same id, the step axis carrying on.
            id=resume_id,
            resume="allow" if resume_id else None,
            dir=str(output_dir),
            mode=self.mode,
            config=public_config if public_config is not None else redact(cfg.to_dict()),
            settings=wandb.Settings(console="off", x_disable_stats=True),
        )
        self.dir = Path(self.run.dir).parent if self.run is not None else None  # .../wandb/<run>

    def log(self, metrics: dict, step: int) -> None:
        self.run.log({k: v for k, v in metrics.items() if k != "step"}, step=step)

    def finish(self, summary: dict) -> dict:
        for k, v in summary.items():
            self.run.summary[k] = v
        info = {"mode": self.mode, "id": self.run.id, "dir": str(self.dir)}
        if self.mode == "online":
            info["url"] = self.run.url
        self.run.finish()
        return info
