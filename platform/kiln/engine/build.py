"""Wrap the model in a DeepSpeed engine. The model itself knows nothing of DeepSpeed."""

from __future__ import annotations

import contextlib
import io
import logging
import sys

import torch

from kiln.engine.ds_config import deepspeed_config
from kiln.engine.schedule import client_scheduler, schedule_params


class _DropKnownNoise(logging.Filter):
    # Harmless: DeepSpeed asks the scheduler for its LR once before the first step.
    NOISE = ("Attempting to get learning rate from scheduler before it has started",)

    def filter(self, record: logging.LogRecord) -> bool:
        return not any(n in record.getMessage() for n in self.NOISE)


def quiet_deepspeed() -> None:
    """DeepSpeed logs every config key and every step at INFO; kiln prints its own progress."""
    from deepspeed.utils import logger as ds_logger

    ds_logger.setLevel(logging.WARNING)
    if not any(isinstance(f, _DropKnownNoise) for f in ds_logger.filters):
        ds_logger.addFilter(_DropKnownNoise())


@contextlib.contextmanager
def captured_stdout():
    """DeepSpeed prints op-build chatter ("... built successfully") on every start; keep it,
    but show it only if the block fails."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    except BaseException:
        sys.stdout.write(buf.getvalue())
        raise


def skip_unused_deepspeed_ops() -> None:
    """Call after importing deepspeed, before its comm backend starts. On a CPU, that backend
    JIT-builds a shared-memory all-reduce op (deepspeed_shm_comm) that only DeepSpeed's inference
    and tensor-parallel paths call, never training; on a fresh machine the build is about two
    minutes of g++ before the first step. DeepSpeed keeps its op table for such edits. (On a GPU
    the op does not exist: the table, whose first read probes compilers, is left unread.)"""
    import deepspeed.ops  # here: launchers set DeepSpeed's accelerator environment before its first import

    if not model_on_gpu():
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False


def model_on_gpu() -> bool:
    from deepspeed.accelerator import get_accelerator

    return get_accelerator().device_name() != "cpu"


def build_engine(model: torch.nn.Module, cfg, world_size: int):
    """The DeepSpeed engine, with kiln's LR schedule as its client scheduler (DeepSpeed steps it
    after every applied optimizer step and saves/loads its state with the model states)."""
    import deepspeed  # here: launchers set DeepSpeed's accelerator environment before its first import

    quiet_deepspeed()
    skip_unused_deepspeed_ops()  # (a Ray worker's comm backend starts inside initialize)
    ds_cfg = deepspeed_config(cfg, world_size, on_gpu=model_on_gpu())
    ds_json = {k: v for k, v in ds_cfg.items() if k != "scheduler"}  # kiln's schedule, given below
    with captured_stdout():
        engine, _, _, _ = deepspeed.initialize(
            model=model,
            model_parameters=model.param_groups(cfg.optim.weight_decay),
            config=ds_json,
            lr_scheduler=client_scheduler(schedule_params(cfg)),
        )
    return engine, ds_cfg


def needs_own_grad_norm(engine) -> bool:
    """DeepSpeed records the global gradient norm in its ZeRO and mixed-precision optimizers; a
    ZeRO-0 fp32 run steps the plain torch optimizer, which records none: kiln computes it."""
    return not hasattr(engine.optimizer, "_global_grad_norm")
