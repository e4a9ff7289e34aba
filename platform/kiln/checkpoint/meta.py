"""What kiln reads about a checkpoint or an export without loading a tensor: a checkpoint's
kiln/meta.json, an export's config.json and kiln_export.json. The driver plans a run (the resume
source, model.init_from, shape checks) from these alone; the tensors are kiln.checkpoint.weights'
and kiln.checkpoint.state's, which only the processes that train, export or generate import.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from kiln.checkpoint.store import complete_checkpoints
from kiln.errors import ConfigError, DataError
from kiln.model.config import SHAPE_KEYS
from kiln.model.hf_gpt2 import hf_config_problems, shape_from_hf_config

# An export directory's files.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FILE = "kiln_export.json"


def read_meta(ckpt: Path) -> dict:
    return json.loads((Path(ckpt) / "kiln" / "meta.json").read_text())


def check_model_shape(meta: dict, model_shape: dict, where: Path) -> None:
    """A checkpoint of another model shape cannot be loaded: name every differing key."""
    saved = meta.get("model_shape", {})
    diff = [k for k in SHAPE_KEYS if saved.get(k) != model_shape.get(k)]
    if diff:
        detail = ", ".join(f"model.{k}: checkpoint {saved.get(k)} vs config {model_shape.get(k)}" for k in diff)
        raise ConfigError(f"model.{diff[0]}", f"the checkpoint {where} has another model shape ({detail})",
                          "use the checkpoint's model settings, or start a new run (trainer.run_name=...) "
                          "or use model.init_from for weights of the same shape")


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step_* checkpoint directory, or a run directory (its newest complete checkpoint)."""
    p = Path(path).expanduser().resolve()
    if (p / "kiln" / "meta.json").is_file():
        return p
    found = complete_checkpoints(p)
    if found:
        return found[-1]
    raise DataError(f"{p} is not a kiln checkpoint (no kiln/meta.json) nor a run directory with one; "
                    f"pass a <storage_path>/<run_name>/step_* directory")


def export_info(path: str | os.PathLike) -> dict:
    """What an export directory holds: {"shape", "dropout", "config" (config.json), "export"
    (kiln_export.json, or {} for a directory kiln did not write)}."""
    p = Path(path).expanduser()
    cfg_file = p / CONFIG_FILE
    if not (p / WEIGHTS_FILE).is_file() or not cfg_file.is_file():
        raise ConfigError("model.init_from", f"{p} is not an export directory (needs {WEIGHTS_FILE} and "
                          f"{CONFIG_FILE})", "run kiln-export CHECKPOINT OUT_DIR and point at OUT_DIR")
    cfg = json.loads(cfg_file.read_text())
    if cfg.get("model_type") != "gpt2":
        raise ConfigError("model.init_from", f"{p}/{CONFIG_FILE} has model_type "
                          f"{cfg.get('model_type')!r}; kiln loads GPT-2 models only", "use a kiln-export "
                          "directory or a GPT-2 save_pretrained directory")
    unsupported = hf_config_problems(cfg)
    if unsupported:
        raise ConfigError("model.init_from", f"{p}/{CONFIG_FILE} describes a GPT-2 that kiln's GPT "
                          f"cannot reproduce: {'; '.join(unsupported)}", "use a kiln-export directory")
    shape = shape_from_hf_config(cfg)
    exp = json.loads((p / EXPORT_FILE).read_text()) if (p / EXPORT_FILE).is_file() else {}
    return {"shape": shape, "dropout": float(cfg.get("resid_pdrop", 0.0)), "config": cfg, "export": exp}


def check_export_shape(found: dict, shape: dict, where: Path) -> None:
    """An export's model shape (`found`, from export_info) against the run's, else ConfigError("model.<key>")."""
    diff = [k for k in SHAPE_KEYS if k in shape and found.get(k) != shape.get(k)]
    if diff:
        detail = ", ".join(f"model.{k}: export {found.get(k)} vs config {shape.get(k)}" for k in diff)
        fix = ("train without model.bias=false to start from a GPT-2 export" if diff == ["bias"] else
               "set the model config to the export's shape (see its kiln_export.json / config.json)")
        raise ConfigError(f"model.{diff[0]}", f"the export {where} has another model shape ({detail})", fix)
