"""trainer.resume on the driver: decide before any worker starts, and never silently start over."""

from __future__ import annotations

from pathlib import Path

from kiln.checkpoint.store import complete_checkpoints
from kiln.errors import ConfigError


def storage_root(cfg: dict) -> str:
    """launcher.storage_path made absolute (cloud URIs, for Ray, pass through)."""
    path = cfg["launcher"]["storage_path"] or "checkpoints"
    if "://" in path:
        return path
    return str(Path(path).expanduser().resolve())


def run_dir(cfg: dict) -> Path:
    return Path(storage_root(cfg)) / cfg["trainer"]["run_name"]


def resolve_resume(cfg: dict) -> Path | None:
    """Checks trainer.resume against what storage holds; returns an explicit checkpoint to start
    from (resume=PATH), or None (start fresh, or let the store find this run's latest)."""
    mode = str(cfg["trainer"]["resume"])
    name = cfg["trainer"]["run_name"]
    if "://" in storage_root(cfg):
        if mode.lower() not in ("auto", "true"):
            raise ConfigError("trainer.resume", f"resume={mode} needs storage kiln can list; "
                              f"{storage_root(cfg)} is a remote URI", "use trainer.resume=auto with remote storage")
        return None
    rd = run_dir(cfg)
    existing = complete_checkpoints(rd)
    where = f"{rd} (latest: {existing[-1].name})" if existing else str(rd)
    if mode.lower() == "auto":
        return None
    if mode.lower() == "true":
        if not existing:
            raise ConfigError("trainer.resume", f"trainer.resume=true but run {name!r} has no checkpoint in {rd}",
                              "check trainer.run_name and launcher.storage_path, or use trainer.resume=auto")
        return None
    if mode.lower() == "false":
        if existing:
            raise ConfigError("trainer.resume", f"run {name!r} already has checkpoints in {where}; "
                              f"refusing to start it over and mix old and new checkpoints",
                              "continue it with trainer.resume=auto, choose another trainer.run_name, "
                              "or delete that directory")
        return None
    path = Path(mode).expanduser().resolve()
    if not (path / "kiln" / "meta.json").is_file():
        raise ConfigError("trainer.resume", f"{path} is not a kiln checkpoint (no kiln/meta.json)",
                          "point trainer.resume at a step_* directory, or use auto/true/false")
    if existing:
        raise ConfigError("trainer.resume", f"trainer.resume={path} but run {name!r} already has checkpoints "
                          f"in {where}", "use a new trainer.run_name to branch from that checkpoint")
    return path


def latest_for_check(cfg: dict, explicit: Path | None) -> Path | None:
    """The checkpoint a run will continue from, when the driver can see it (for early checks)."""
    if explicit is not None:
        return explicit
    if "://" in storage_root(cfg) or str(cfg["trainer"]["resume"]).lower() == "false":
        return None
    found = complete_checkpoints(run_dir(cfg))
    return found[-1] if found else None
