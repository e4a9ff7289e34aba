"""One optimizer step, and the checks the ranks agree on between steps."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist

from kiln.errors import TrainingError
from kiln.training.timing import StepTimer
from kiln.tracking.console import print_line


def _all_reduce(t: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=op)
    return t


def world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def mean_across_ranks(value: torch.Tensor) -> float:
    return (_all_reduce(value.detach().float().clone()) / world()).item()


def local_grad_norm(engine) -> torch.Tensor:
    """2-norm of the gradients DeepSpeed is about to clip and apply. Called after the boundary
    micro-batch's backward, where ZeRO-0 has all-reduced them: the global pre-clipping norm,
    the same on every rank. Stays on the device (no host sync)."""
    params = list(engine.module.parameters())
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    if not norms:
        return torch.zeros((), device=params[0].device)
    return torch.linalg.vector_norm(torch.stack(norms))


def train_step(engine, batches, device: torch.device, grad_accum: int, own_norm: bool = False,
               poison: bool = False, loss_factor: float = 1.0, timer: StepTimer | None = None
               ) -> tuple[torch.Tensor, object]:
    """One optimizer step over `grad_accum` micro-batches. Returns their mean loss (local) and
    the step's global gradient norm before clipping (a tensor or a float; None if unknown).
    poison, loss_factor: faults tests inject (kiln.training.faults): the loss, and so every
    gradient, is NaN, or multiplied by loss_factor. timer: where the time goes (kiln/training/timing.py)."""
    timer = timer or StepTimer(device)
    total = torch.zeros((), device=device)
    norm = None
    for i in range(grad_accum):
        with timer.phase("data"):
            x, y = next(batches)
        with timer.phase("forward_backward"):
            _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
            if poison:
                loss = loss * float("nan")
            if loss_factor != 1.0:
                loss = loss * loss_factor
            engine.backward(loss)
            if own_norm and i == grad_accum - 1:
                norm = local_grad_norm(engine)
        with timer.phase("optimizer"):
            engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    if not own_norm:
        norm = engine.get_global_grad_norm()
    return total / grad_accum, norm


def as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


class GradWatch:
    """Counts the steps since the last check whose gradient norm was not finite, on the device
    (no host sync per step). Under fp16 a non-finite norm is loss scaling at work (DeepSpeed
    skips the step and lowers the scale), so it does not count there.

    skip=True (trainer.on_nonfinite=skip): such steps are expected to have been skipped by
    DeepSpeed's optimizer (every one but ZeRO-0 fp32's does); they are counted, left out of the
    interval's mean loss, and the run goes on until more than `max_skipped` were."""

    def __init__(self, device: torch.device, dtype: str, skip: bool = False, max_skipped: int = 0):
        self.device, self.counts = device, dtype != "fp16"
        self.on_device = torch.zeros((), device=device)
        self.bad_losses = torch.zeros((), device=device)  # skip mode: non-finite losses this interval
        self.on_host = 0
        self.checked_at = 0  # the last step checked
        self.skip, self.max_skipped, self.skipped = skip, max_skipped, 0

    def usable(self, step_loss: torch.Tensor) -> torch.Tensor:
        """The step's loss as the interval sums it: in skip mode a non-finite one counts as 0
        (and is left out of the mean), on the device."""
        if not self.skip:
            return step_loss
        bad = ~torch.isfinite(step_loss)
        self.bad_losses += bad.float()
        return torch.where(bad, torch.zeros_like(step_loss), step_loss)

    def add(self, norm) -> None:
        if not self.counts or norm is None:
            return
        if torch.is_tensor(norm):
            self.on_device += (~torch.isfinite(norm.detach().float())).float().to(self.device)
        elif not math.isfinite(float(norm)):
            self.on_host += 1

    def check(self, interval_loss: torch.Tensor, interval_steps: int, norm, step: int, lr: float,
              stop: bool = False) -> tuple[float, bool]:
        """(the mean loss of the steps since the last check, whether any rank asked to stop), all
        ranks agreeing: one all-reduce, which also syncs the device, so the stop flag needs no
        collective of its own. Raises if the run diverged since the last check (check_finite)."""
        counted = (interval_steps - self.bad_losses).clamp(min=1)  # bad_losses stays 0 outside skip mode
        t = torch.stack([interval_loss.detach().float() / counted.float(),
                         (self.on_device + self.on_host).float(),
                         torch.tensor(float(stop), device=self.device),
                         self.bad_losses.float()])
        _all_reduce(t)
        t[0] /= world()
        loss, bad, stops, bad_losses = t.tolist()
        if self.skip:
            # The norm is global (each rank counted the same steps); a loss is one rank's own.
            steps = max(round(bad / world()), -(-int(bad_losses) // world()))
            loss = self.count_skipped(loss, steps, interval_steps, step)
        else:
            check_finite(loss, as_float(norm), int(bad), step, self.checked_at, lr)
        self.on_device.zero_()
        self.bad_losses.zero_()
        self.on_host, self.checked_at = 0, step
        return loss, stops > 0

    def count_skipped(self, loss: float, bad: int, interval_steps: int, step: int) -> float:
        """Skip mode: add this interval's `bad` non-finite steps (already agreed across ranks) to
        the run's count; past trainer.max_skipped_steps the run stops, its last checkpoint kept."""
        if not bad:
            return loss
        self.skipped += min(bad, interval_steps)
        if self.skipped > self.max_skipped:
            raise TrainingError(
                f"{self.skipped} optimizer steps had a non-finite loss or gradient (the last by step {step}), more "
                f"than trainer.max_skipped_steps={self.max_skipped}; no checkpoint was written after it. Lower "
                f"optim.lr or optim.grad_clip, check the data around these steps, then resume from the last checkpoint")
        print_line(f"warning: skipped {min(bad, interval_steps)} optimizer step(s) with a non-finite loss or "
                   f"gradient in steps {self.checked_at + 1}-{step} ({self.skipped} of trainer.max_skipped_steps="
                   f"{self.max_skipped} so far); parameters and optimizer state are as before them")
        return loss if bad < interval_steps else float("nan")


def check_finite(loss: float, grad: float | None, bad_steps: int, step: int, since: int, lr: float) -> None:
    """A diverged run stops with an error (its last checkpoint kept) instead of training on NaNs.
    Checked on every step that logs, evaluates or saves, so no checkpoint is ever written from a
    diverged run: `loss` is the mean loss of the steps since the last log, `bad_steps` counts the
    steps after `since` whose gradient norm was not finite (outside fp16, where loss scaling
    makes that normal, a non-finite norm means DeepSpeed skipped the step: the run has diverged).
    All values are global (the same on every rank): all ranks stop together."""
    if math.isfinite(loss) and not bad_steps:
        return
    if not math.isfinite(loss):
        what = f"the loss is {loss} at step {step}"
    elif grad is not None and not math.isfinite(grad):
        what = f"the gradient norm is {grad} (loss {loss:.4g}) at step {step}"
    else:
        what = (f"the gradient norm was not finite at {bad_steps} step(s) of steps {since + 1}-{step} "
                f"(loss {loss:.4g}) at step {step}")
    raise TrainingError(
        f"training diverged: {what} (lr {lr:.2e}); no checkpoint "
        f"was written after it. Lower optim.lr, raise optim.warmup_steps or lower optim.grad_clip, then "
        f"start a new run (trainer.run_name) or resume from an earlier checkpoint")
