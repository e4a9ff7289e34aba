"""kiln's learning-rate schedule: linear warmup, then cosine decay to lr * min_lr_ratio.

`lr_at(step)` is the rate optimizer step `step` (1-based) uses: step 1 takes the first warmup value
lr * 1/warmup_steps, step warmup_steps the peak lr, step max_steps lr * min_lr_ratio. With
warmup_steps=0 the decay starts at step 1.

DeepSpeed runs it as a client LR scheduler (`WarmupCosine`): DeepSpeed's own WarmupCosineLR
gives the first two steps lr 0 and raises for warmup_steps=0 or max_steps=1.
"""

from __future__ import annotations

import math

from torch.optim.lr_scheduler import LRScheduler


def schedule_params(cfg) -> dict:
    """The schedule's settings from a TrainConfig's optim and trainer sections. Warmup is capped
    at max_steps - 1, so that every run ends its schedule at lr * min_lr_ratio."""
    opt, tr = cfg.optim, cfg.trainer
    max_steps = max(tr.max_steps, 1)
    return {"lr": opt.lr, "warmup_steps": min(max(opt.warmup_steps, 0), max_steps - 1),
            "max_steps": max_steps, "min_lr_ratio": opt.min_lr_ratio}


def lr_at(step: int, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """The learning rate of optimizer step `step` (1, 2, ...)."""
    if warmup_steps > 0 and step <= warmup_steps:
        return lr * step / warmup_steps
    progress = min(max(step - warmup_steps, 0) / max(max_steps - warmup_steps, 1), 1.0)
    low = lr * min_lr_ratio
    return low + (lr - low) * 0.5 * (1.0 + math.cos(math.pi * progress))


class WarmupCosine(LRScheduler):
    """`lr_at` as a torch scheduler. DeepSpeed calls step() after every optimizer step that was
    applied, so after k steps `last_epoch` is k and the optimizer holds lr_at(k + 1): the rate of
    the next step. Its state (saved in DeepSpeed's model states) is just that count; the schedule's
    settings come from the config, as they did with DeepSpeed's scheduler."""

    def __init__(self, optimizer, *, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float):
        self.params = {"lr": lr, "warmup_steps": warmup_steps, "max_steps": max_steps, "min_lr_ratio": min_lr_ratio}
        super().__init__(optimizer)  # sets last_epoch 0 and the optimizer's lr to lr_at(1)

    def rate(self, step: int) -> float:
        return lr_at(step, **self.params)

    def get_lr(self) -> list[float]:
        return [self.rate(self.last_epoch + 1) for _ in self.optimizer.param_groups]

    def state_dict(self) -> dict:
        return {"last_epoch": self.last_epoch, "_step_count": self._step_count}

    def load_state_dict(self, state_dict: dict) -> None:
        if "last_epoch" in state_dict:
            self.last_epoch = int(state_dict["last_epoch"])
            self._step_count = int(state_dict.get("_step_count", self.last_epoch + 1))
        elif "last_batch_iteration" in state_dict:  # a checkpoint of DeepSpeed's WarmupCosineLR
            self.last_epoch = int(state_dict["last_batch_iteration"]) + 1
            self._step_count = self.last_epoch + 1
        self.apply()

    def apply(self) -> None:
        """Put the next step's rate into the optimizer (after a load: the optimizer's own restored
        state may carry a rate of another config, e.g. a raised trainer.max_steps)."""
        values = self.get_lr()
        for group, value in zip(self.optimizer.param_groups, values):
            group["lr"] = value
        self._last_lr = values


def client_scheduler(params: dict):
    """What deepspeed.initialize takes as lr_scheduler: a callable that builds the scheduler on
    the optimizer DeepSpeed creates."""
    return lambda optimizer: WarmupCosine(optimizer, **params)
