"""Credentials out of the configs Hydra itself saves: before kiln's task runs, Hydra writes the
overrides as typed (`.hydra/overrides.yaml`), the composed config (`.hydra/config.yaml`,
`.hydra/hydra.yaml`) and, for a sweep, `multirun.yaml`. A token typed literally on the command
line (`data.path='https://user:token@host/...'`) would sit in all of them in plain text.

RedactSavedConfigs (a Hydra callback, conf/train.yaml) rewrites them with kiln.config.redact's
rules as each job starts, right after Hydra wrote them."""

from __future__ import annotations

from pathlib import Path

from hydra.experimental.callback import Callback
from hydra.types import RunMode

from kiln.config.redact import redact_text, secret_values


def redact_file(path: Path, secrets: list[tuple[str, str]]) -> bool:
    """Rewrite `path` with its credentials redacted (atomically); True when it changed."""
    try:
        text = path.read_text()
    except (FileNotFoundError, UnicodeDecodeError):
        return False
    clean = redact_text(text, secrets)
    if clean == text:
        return False
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(clean)
    tmp.replace(path)
    return True


def saved_config_files(hydra_cfg) -> list[Path]:
    out = Path(hydra_cfg.runtime.output_dir)
    files = sorted((out / hydra_cfg.output_subdir).glob("*.yaml")) if hydra_cfg.output_subdir else []
    if hydra_cfg.mode == RunMode.MULTIRUN:
        files.append(Path(hydra_cfg.sweep.dir) / "multirun.yaml")
    return files


class RedactSavedConfigs(Callback):
    def on_job_start(self, config, **kwargs) -> None:
        secrets = secret_values()
        for path in saved_config_files(config.hydra):
            redact_file(path, secrets)
