"""Full (unsharded) model weights from any source kiln reads: a kiln checkpoint (a step_*
directory, or a run directory: its newest) or an export directory (kiln-export's output, or any
GPT-2 directory `save_pretrained` wrote; its files: kiln.checkpoint.export). For model.init_from,
kiln-generate and kiln-export.

`consolidated_state_dict(ckpt)` gathers a checkpoint's shards; `read_export(path, shape)` reads an
export as a kiln state dict, checked against the model shape of the run; `load_init_weights`
copies either into a model.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from kiln.checkpoint.state import SHAPE_KEYS, check_model_shape, read_meta
from kiln.checkpoint.store import complete_checkpoints
from kiln.errors import ConfigError, DataError
from kiln.model.hf_gpt2 import from_hf_state_dict, hf_config_problems, shape_from_hf_config, tensor_problems

# An export directory's files.
WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FILE = "kiln_export.json"


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


def consolidated_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights gathered from a checkpoint's DeepSpeed shards (any ZeRO stage),
    on the CPU, without a process group: what one process needs to export or start from."""
    # Lazy: DeepSpeed must be imported after the accelerator is chosen (kiln.launch.env), and costs seconds.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    tag = f"step{meta['step']}"
    ds_dir = ckpt / "ds"
    if meta["config"]["parallelism"]["zero_stage"] == 0:
        # Stage 0 keeps whole weights in rank 0's model-states file.
        states = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu", weights_only=False)
        sd = {k: v.float() for k, v in states["module"].items()}
    else:
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    # The LM head is tied to the token embedding; DeepSpeed may list it under either name.
    if "lm_head.weight" not in sd and "transformer.wte.weight" in sd:
        sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


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


def read_export(path: str | os.PathLike, shape: dict | None) -> dict[str, torch.Tensor]:
    """A kiln GPT state dict (fp32, lm_head tied to wte) from a kiln-export or GPT-2
    save_pretrained directory; `shape` (n_layer, n_head, n_embd, block_size, vocab_size, bias),
    when given, must match the export's, else ConfigError("model.<key>")."""
    p = Path(path).expanduser()
    info = export_info(p)
    found = info["shape"]
    if shape is not None:
        check_export_shape(found, shape, p)
    sd = from_hf_state_dict(load_file(str(p / WEIGHTS_FILE), device="cpu"))
    wte = sd.get("transformer.wte.weight")
    if wte is None:
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} has no transformer.wte.weight",
                          "use a kiln-export directory")
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, wte):
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} has an LM head that differs from its "
                          f"token embedding; kiln's GPT ties them", "use weights with a tied LM head")
    problems = tensor_problems(sd, found)
    if problems:
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} does not match its {CONFIG_FILE} ({problems})",
                          "re-export the checkpoint with kiln-export")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def load_init_weights(model: torch.nn.Module, source: str, shape: dict) -> None:
    """model.init_from: copy weights from a kiln checkpoint or a kiln-export directory."""
    path = Path(source).expanduser()
    if (path / "kiln" / "meta.json").is_file():
        check_model_shape(read_meta(path), shape, path)
        sd = consolidated_state_dict(path)
    elif (path / WEIGHTS_FILE).is_file():
        sd = read_export(path, shape)
    else:
        raise ConfigError("model.init_from", f"{path} is neither a kiln checkpoint (kiln/meta.json) "
                          f"nor a kiln-export directory (model.safetensors)",
                          "point it at a step_* checkpoint directory or at kiln-export's output")
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise ConfigError("model.init_from", f"weights in {path} do not fit the model "
                          f"(missing {missing[:3]}, unexpected {unexpected[:3]})",
                          "use weights of the same model configuration")
