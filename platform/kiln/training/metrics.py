"""The metrics logger: owns the log interval, throughput timing and the tracker (rank 0's
console, metrics.jsonl, W&B). Every rank keeps the same books; only rank 0's tracker writes."""

from __future__ import annotations

import contextlib
import time

import torch

from kiln.context import Context
from kiln.data.stream import ResumableLoader
from kiln.model.flops import device_peak, flops_per_token, mfu
from kiln.plan import RunPlan
from kiln.training.memory import memory_metrics
from kiln.training.state import TrainState
from kiln.training.timing import StepTimer
from kiln.training.step import _all_reduce


def data_metrics(batches: ResumableLoader, plan: RunPlan, device: torch.device) -> dict:
    """Skipped shards/samples (data.on_error=skip) and, for mixtures, the realised share of each
    source: summed over all ranks (a collective: every rank calls this at the same steps)."""
    stats = batches.stats()
    counts = [stats.get("skipped_shards", 0), stats.get("skipped_samples", 0), *stats["source_blocks"]]
    totals = [int(v) for v in _all_reduce(torch.tensor(counts, dtype=torch.float64, device=device)).tolist()]
    out = {f"data/{k}": v for k, v in zip(("skipped_shards", "skipped_samples"), totals[:2]) if v}
    blocks = totals[2:]
    if len(blocks) > 1 and sum(blocks):
        for s, n in zip(plan.data.sources, blocks):
            out[f"data/share_{s.name}"] = n / sum(blocks)
    return out


class MetricsLogger:
    def __init__(self, plan: RunPlan, ctx: Context, state: TrainState, tracker, tokens_per_step: int,
                 n_params: int):
        """tokens_per_step: of all ranks together (micro-batch x accumulation x sequence x ranks)."""
        tr = plan.config.trainer
        self.plan, self.ctx, self.state, self.tracker = plan, ctx, state, tracker
        self.interval, self.max_steps, self.tokens_per_step = tr.log_interval, tr.max_steps, tokens_per_step
        self.flops_per_token = flops_per_token(n_params, plan.model, plan.config.data.seq_len)
        gpu = torch.cuda.get_device_name(ctx.device) if ctx.device.type == "cuda" else None
        self.peak_tflops, self.peak_basis = device_peak(gpu, tr.peak_tflops)
        self.timed = 0  # steps timed in this process since the last record
        self.started = time.perf_counter()
        self.timer = StepTimer(ctx.device)  # where the interval's time went (time/*_s)
        self.seq_len = plan.config.data.seq_len
        self.first_here = len(state.throughput)  # the intervals before are a previous process's

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.max_steps

    def step_done(self) -> None:
        self.timed += 1

    def record(self, loss: float, lr: float, grad: float | None, batches: ResumableLoader) -> dict:
        """This interval's metrics (before any evaluation is added); tokens/s counts only steps
        timed in this process, so the first interval after a resume is not inflated."""
        step = self.state.step
        elapsed = time.perf_counter() - self.started
        tokens_per_s = self.timed * self.tokens_per_step / elapsed
        metrics = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad, "tokens": step * self.tokens_per_step,
                   "tokens_per_s": tokens_per_s, "samples_per_s": tokens_per_s / self.seq_len}
        if self.peak_tflops is not None:
            metrics["mfu"] = self.mfu(metrics["tokens_per_s"])
        metrics.update(data_metrics(batches, self.plan, self.ctx.device))
        self.settle()
        metrics.update(self.timer.collect())
        metrics.update(memory_metrics(self.ctx.device))
        metrics["goodput"] = self.state.ledger.goodput()
        metrics["time"] = time.time()  # when (wall clock): plots against time, lost time after a crash
        self.state.throughput.append(metrics["tokens_per_s"])
        return metrics

    def mfu(self, tokens_per_s: float) -> float:
        return mfu(tokens_per_s, self.flops_per_token, self.ctx.world_size, self.peak_tflops)

    def flops_summary(self) -> dict:
        """The run's MFU (from its steady tokens/s) and what it was measured with."""
        steady = self.steady_tokens_per_s()
        value = self.mfu(steady) if steady and self.peak_tflops is not None else None
        return {"mfu": value, "flops_per_token": self.flops_per_token, "peak_tflops": self.peak_tflops,
                "mfu_basis": self.peak_basis}

    def settle(self) -> None:
        """Hand the productive time timed so far to the ledger (before a record or a save)."""
        self.state.ledger.productive_s += self.timer.settle()

    def write(self, metrics: dict) -> None:
        self.tracker.log(metrics)
        self.state.last.update(loss=metrics["loss"], step=metrics["step"])
        if "eval_loss" in metrics:
            best = self.state.last.get("best_eval_loss")
            self.state.last["eval_loss"] = metrics["eval_loss"]
            if best is None or metrics["eval_loss"] < best:
                self.state.last.update(best_eval_loss=metrics["eval_loss"], best_eval_step=metrics["step"])
        self.state.start_interval()
        self.timed = 0
        self.started = time.perf_counter()  # evaluation time is not training time

    def restart_interval(self) -> None:
        """Time the next interval afresh (after a rollback: the steps since the last record were undone)."""
        self.timed = 0
        self.started = time.perf_counter()

    @contextlib.contextmanager
    def paused(self, phase: str):
        """Time spent inside (saving a checkpoint, a rollback) is not training time either; it
        is counted as `phase` (time/<phase>_s)."""
        began = time.perf_counter()
        try:
            yield
        finally:
            spent = time.perf_counter() - began
            self.started += spent
            self.timer.add(phase, spent)

    def steady_tokens_per_s(self) -> float | None:
        """This process's intervals; its first includes warm-up (allocations, JIT): left out when
        there are others. (A resumed run that logged nothing falls back to the restored history.)"""
        history = self.state.throughput
        here = history[self.first_here:]
        steady = here[1:] or here or history[1:] or history
        return sum(steady) / len(steady) if steady else None
