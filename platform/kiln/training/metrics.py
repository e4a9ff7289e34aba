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
from kiln.training.state import TrainState
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
        metrics = {"step": step, "loss": loss, "lr": lr, "grad_norm": grad, "tokens": step * self.tokens_per_step,
                   "tokens_per_s": self.timed * self.tokens_per_step / elapsed}
        if self.peak_tflops is not None:
            metrics["mfu"] = self.mfu(metrics["tokens_per_s"])
        metrics.update(data_metrics(batches, self.plan, self.ctx.device))
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

    def write(self, metrics: dict) -> None:
        self.tracker.log(metrics)
        self.state.last.update(loss=metrics["loss"], step=metrics["step"])
        if "eval_loss" in metrics:
            self.state.last["eval_loss"] = metrics["eval_loss"]
        self.state.start_interval()
        self.timed = 0
        self.started = time.perf_counter()  # evaluation time is not training time

    @contextlib.contextmanager
    def paused(self):
        """Time spent inside (saving a checkpoint) is not training time either."""
        began = time.perf_counter()
        try:
            yield
        finally:
            self.started += time.perf_counter() - began

    def steady_tokens_per_s(self) -> float | None:
        """This process's intervals; its first includes warm-up (allocations, JIT): left out when
        there are others. (A resumed run that logged nothing falls back to the restored history.)"""
        history = self.state.throughput
        here = history[self.first_here:]
        steady = here[1:] or here or history[1:] or history
        return sum(steady) / len(steady) if steady else None
