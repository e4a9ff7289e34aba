"""What a checkpoint holds besides DeepSpeed's shards, and restoring all of it exactly."""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import torch

from kiln.checkpoint.meta import read_meta
from kiln.checkpoint.safe_load import weights_only_loads
from kiln.checkpoint.tokenizer_files import CHECKPOINT_TOKENIZER_DIR, write_tokenizer
from kiln.errors import ConfigError


def rng_state() -> dict:
    """Every generator's state as tensors, lists and numbers (loadable with weights_only=True)."""
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    state = {"python": random.getstate(), "numpy": (kind, torch.from_numpy(keys.astype(np.int64)), pos, has_gauss,
                                                      cached), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict) -> None:
    random.setstate(state["python"])
    kind, keys, pos, has_gauss, cached = state["numpy"]
    keys = keys.numpy() if torch.is_tensor(keys) else keys  # an ndarray in checkpoints written before this format
    np.random.set_state((kind, keys.astype(np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(local_dir: Path, *, engine, rank: int, step: int, loop_state: dict, meta: dict,
                     tokenizer=None) -> None:
    """This rank's part of a checkpoint: DeepSpeed shards (collective), loop state, and (rank 0)
    the run's metadata and the data's tokenizer (so kiln-export and kiln-generate never need the
    dataset, nor trust what its config names)."""
    (local_dir / "kiln").mkdir(parents=True, exist_ok=True)
    engine.save_checkpoint(str(local_dir / "ds"), tag=f"step{step}", save_latest=False)
    torch.save({**loop_state, "rng": rng_state()}, local_dir / "kiln" / f"rank_{rank}.pt")
    if rank == 0:
        if tokenizer is not None:
            tok_dir = local_dir / "kiln" / CHECKPOINT_TOKENIZER_DIR
            tok_dir.mkdir(exist_ok=True)
            write_tokenizer(tokenizer, tok_dir, meta["model_shape"]["block_size"])
        (local_dir / "kiln" / "meta.json").write_text(json.dumps(meta, indent=2, default=str) + "\n")


def load_checkpoint(ckpt: Path, *, engine, rank: int, world_size: int) -> tuple[dict, dict]:
    """Restore DeepSpeed's engine (weights, optimizer, LR schedule) and this rank's loop state.
    Returns (meta, loop_state); the caller restores loop_state["rng"] last, once nothing
    else that draws random numbers (model init, DataLoader start-up) is left to run."""
    meta = read_meta(ckpt)
    if meta["world_size"] != world_size:
        raise ConfigError("launcher.num_workers",
                          f"checkpoint {ckpt} was written by {meta['world_size']} rank(s), this run has {world_size}",
                          f"resume with launcher.num_workers={meta['world_size']}")
    with weights_only_loads():  # DeepSpeed's own torch.load calls included
        path, _ = engine.load_checkpoint(str(Path(ckpt) / "ds"), tag=f"step{meta['step']}",
                                         load_optimizer_states=True, load_lr_scheduler_states=True)
        state = torch.load(Path(ckpt) / "kiln" / f"rank_{rank}.pt")
    if path is None:
        raise FileNotFoundError(f"DeepSpeed found no checkpoint under {ckpt}/ds (tag step{meta['step']})")
    _realign_optimizer_state(engine)
    schedule = getattr(engine, "lr_scheduler", None)
    if hasattr(schedule, "apply"):
        # kiln's scheduler (engine/schedule.py) came back with its step count; DeepSpeed may load
        # the optimizer's own param groups after it: the next step's rate is the schedule's.
        schedule.apply()
    return meta, state


def _realign_optimizer_state(engine) -> None:
    """Give every loaded optimizer-state tensor a fresh allocation, as in an uninterrupted run:
    vectorised CPU kernels split work by memory alignment, and tensors that torch.load placed
    at other offsets round differently in the last bit."""
    opt = getattr(engine, "optimizer", None)
    inner = getattr(opt, "optimizer", opt)
    for st in getattr(inner, "state", {}).values():
        for k, v in list(st.items()):
            if torch.is_tensor(v) and v.dim() > 0:
                st[k] = v.clone()
