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
from kiln.model import hf_gpt2, hf_llama
from kiln.model.config import arch_of, shape_keys

# The Hugging Face model types kiln exports and loads, and the adapter of each.
HF_ADAPTERS = {"gpt2": hf_gpt2, "llama": hf_llama}

# An export directory's files.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FILE = "kiln_export.json"


def read_meta(ckpt: Path) -> dict:
    """A checkpoint's kiln/meta.json; a damaged one is named (DataError), never half-read."""
    path = Path(ckpt) / "kiln" / "meta.json"
    try:
        meta = json.loads(path.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise DataError(f"{path} is damaged: not JSON ({e}); use another checkpoint of the run (an earlier "
                        f"step_*) or copy this one again") from None
    if not (isinstance(meta, dict) and isinstance(meta.get("step"), int) and isinstance(meta.get("model_shape"), dict)):
        raise DataError(f"{path} is damaged: not the meta.json of a kiln checkpoint (no step and model_shape); "
                        f"use another checkpoint of the run (an earlier step_*) or copy this one again")
    return meta


def shape_diff(found: dict, shape: dict) -> list[str]:
    """The model-shape keys in which two shapes differ (a saved shape without "arch" is a GPT)."""
    found, shape = {**found, "arch": arch_of(found)}, {**shape, "arch": arch_of(shape)}
    if found["arch"] != shape["arch"]:
        return ["arch"]
    return [k for k in shape_keys(shape["arch"]) if found.get(k) != shape.get(k)]


def check_model_shape(meta: dict, model_shape: dict, where: Path) -> None:
    """A checkpoint of another model shape cannot be loaded: name every differing key."""
    saved = meta.get("model_shape", {})
    diff = shape_diff(saved, model_shape)
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
    try:
        cfg = json.loads(cfg_file.read_text())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError("model.init_from", f"{cfg_file} is not JSON ({e})", "re-export the checkpoint") from None
    adapter = HF_ADAPTERS.get(cfg.get("model_type")) if isinstance(cfg, dict) else None
    if adapter is None:
        found = cfg.get("model_type") if isinstance(cfg, dict) else None
        raise ConfigError("model.init_from", f"{p}/{CONFIG_FILE} has model_type {found!r}; kiln loads "
                          f"{' and '.join(HF_ADAPTERS)} models only", "use a kiln-export directory or a "
                          "GPT-2 / Llama save_pretrained directory")
    unsupported = adapter.hf_config_problems(cfg)
    if unsupported:
        raise ConfigError("model.init_from", f"{p}/{CONFIG_FILE} describes a {cfg['model_type']} model that "
                          f"kiln cannot reproduce: {'; '.join(unsupported)}", "use a kiln-export directory")
    shape = adapter.shape_from_hf_config(cfg)
    dropout = cfg.get("resid_pdrop", cfg.get("attention_dropout", 0.0))
    exp = json.loads((p / EXPORT_FILE).read_text()) if (p / EXPORT_FILE).is_file() else {}
    return {"shape": shape, "dropout": float(dropout), "config": cfg, "export": exp}


def check_export_shape(found: dict, shape: dict, where: Path) -> None:
    """An export's model shape (`found`, from export_info) against the run's, else ConfigError("model.<key>")."""
    diff = shape_diff(found, shape)
    if diff:
        detail = ", ".join(f"model.{k}: export {found.get(k)} vs config {shape.get(k)}" for k in diff)
        fix = ("train without model.bias=false to start from a GPT-2 export" if diff == ["bias"] else
               "set the model config to the export's shape (see its kiln_export.json / config.json)")
        raise ConfigError(f"model.{diff[0]}", f"the export {where} has another model shape ({detail})", fix)
