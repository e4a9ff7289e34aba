"""Full (unsharded) model weights from a kiln checkpoint, for model.init_from and kiln-export."""

from __future__ import annotations

from pathlib import Path

import torch

from kiln.errors import ConfigError


def consolidated_state_dict(ckpt: str | Path) -> dict[str, torch.Tensor]:
    """The model's fp32 weights gathered from a checkpoint's DeepSpeed shards (any ZeRO stage),
    on the CPU, without a process group: what one process needs to export or start from."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from kiln.checkpoint.state import read_meta

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


def load_init_weights(model: torch.nn.Module, source: str, shape: dict) -> None:
    """model.init_from: copy weights from a kiln checkpoint or a kiln-export directory."""
    from kiln.checkpoint.state import check_model_shape, read_meta

    path = Path(source).expanduser()
    if (path / "kiln" / "meta.json").is_file():
        check_model_shape(read_meta(path), shape, path)
        sd = consolidated_state_dict(path)
    elif (path / "model.safetensors").is_file():
        from kiln.checkpoint.export import read_export

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
