"""Full (unsharded) model weights from any source kiln reads: a kiln checkpoint (a step_*
directory, or a run directory: its newest) or an export directory (kiln-export's output, or any
GPT-2 or Llama directory `save_pretrained` wrote; its files: kiln.checkpoint.export). For model.init_from,
kiln-generate and kiln-export.

`consolidated_state_dict(ckpt)` gathers a checkpoint's shards; `read_export(path, shape)` reads an
export as a kiln state dict, checked against the model shape of the run; `load_init_weights`
copies either into a model.
"""

from __future__ import annotations

import os
from pathlib import Path

import torch
from safetensors.torch import load_file

from kiln.checkpoint.meta import (CONFIG_FILE, HF_ADAPTERS, WEIGHTS_FILE, check_export_shape, check_model_shape,
                                  export_info, read_meta)
from kiln.checkpoint.safe_load import weights_only_loads
from kiln.errors import ConfigError
from kiln.model.config import arch_of, tied_embedding


def consolidated_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights gathered from a checkpoint's DeepSpeed shards (any ZeRO stage),
    on the CPU, without a process group: what one process needs to export or start from."""
    # Lazy: DeepSpeed must be imported after the accelerator is chosen (kiln.launch.env), and costs seconds.
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    ckpt = Path(ckpt)
    meta = read_meta(ckpt)
    tag = f"step{meta['step']}"
    ds_dir = ckpt / "ds"
    with weights_only_loads():  # zero_to_fp32's torch.load calls included
        if meta["config"]["parallelism"]["zero_stage"] == 0:
            # Stage 0 keeps whole weights in rank 0's model-states file.
            states = torch.load(ds_dir / tag / "mp_rank_00_model_states.pt", map_location="cpu")
            sd = {k: v.float() for k, v in states["module"].items()}
        else:
            sd = get_fp32_state_dict_from_zero_checkpoint(str(ds_dir), tag=tag)
    # A tied LM head is one tensor under two names; DeepSpeed may list it under either.
    embedding = tied_embedding(meta.get("model_shape", {}))
    if embedding is not None:
        if "lm_head.weight" not in sd and embedding in sd:
            sd["lm_head.weight"] = sd[embedding]
        elif embedding not in sd and "lm_head.weight" in sd:
            sd[embedding] = sd["lm_head.weight"]
    return sd


def read_export(path: str | os.PathLike, shape: dict | None) -> dict[str, torch.Tensor]:
    """A kiln state dict (fp32, a tied LM head under both names) from a kiln-export or a GPT-2 /
    Llama save_pretrained directory; `shape` (the run's model shape), when given, must match the
    export's, else ConfigError("model.<key>")."""
    p = Path(path).expanduser()
    info = export_info(p)
    found = info["shape"]
    if shape is not None:
        check_export_shape(found, shape, p)
    adapter = HF_ADAPTERS[arch_of(found)]
    sd = adapter.from_hf_state_dict(load_file(str(p / WEIGHTS_FILE), device="cpu"))
    embedding = tied_embedding(found)
    if embedding is not None:
        if embedding not in sd:
            raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} has no {embedding}", "use a kiln-export directory")
        head = sd.pop("lm_head.weight", None)
        if head is not None and not torch.equal(head, sd[embedding]):
            raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} has an LM head that differs from its "
                              f"token embedding, but its {CONFIG_FILE} ties them", "use weights with a tied LM head")
    problems = adapter.tensor_problems(sd, found)
    if problems:
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} does not match its {CONFIG_FILE} ({problems})",
                          "re-export the checkpoint with kiln-export")
    if embedding is not None:
        sd["lm_head.weight"] = sd[embedding]
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
