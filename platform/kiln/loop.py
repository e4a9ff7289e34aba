"""The training loop: one function, used unchanged by every launcher. It never imports Ray.

    build tokenizer, stream, model, engine
    for step in 1..max_steps:  next batch -> forward/backward/step -> log -> eval
    summary
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch
import torch.distributed as dist

from kiln.context import Context
from kiln.data.plan import DataPlan, plan_data
from kiln.data.stream import ResumableLoader
from kiln.data.validation import eval_set
from kiln.engine.build import build_engine, needs_own_grad_norm
from kiln.model.gpt import GPT, GPTConfig
from kiln.tracking.tracker import NullTracker, Tracker


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's seed after model init (dropout masks, sampling): distinct per rank and per run
    seed, derived from both (seed + rank would give run seed 1's rank 1 the stream of seed 2's rank 0)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def mean_across_ranks(value: torch.Tensor) -> float:
    value = value.detach().float().clone()
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        value /= dist.get_world_size()
    return value.item()


def local_grad_norm(engine) -> torch.Tensor:
    """2-norm of the gradients DeepSpeed is about to clip and apply. Called after the boundary
    micro-batch's backward, where ZeRO-0 has all-reduced them: the global pre-clipping norm,
    the same on every rank. Stays on the device (no host sync)."""
    params = list(engine.module.parameters())
    norms = [torch.linalg.vector_norm(p.grad.detach().float()) for p in params if p.grad is not None]
    if not norms:
        return torch.zeros((), device=params[0].device)
    return torch.linalg.vector_norm(torch.stack(norms))


def train_step(engine, batches, device: torch.device, grad_accum: int, own_norm: bool = False
               ) -> tuple[torch.Tensor, object]:
    """One optimizer step over `grad_accum` micro-batches. Returns their mean loss (local) and
    the step's global gradient norm before clipping (a tensor or a float; None if unknown)."""
    total = torch.zeros((), device=device)
    norm = None
    for i in range(grad_accum):
        x, y = next(batches)
        _, loss = engine(x.to(device, non_blocking=True), y.to(device, non_blocking=True))
        engine.backward(loss)
        if own_norm and i == grad_accum - 1:
            norm = local_grad_norm(engine)
        engine.step()  # DeepSpeed steps the optimizer only at the accumulation boundary
        total += loss.detach().float()
    if not own_norm:
        norm = engine.get_global_grad_norm()
    return total / grad_accum, norm


@torch.no_grad()
def evaluate(engine, batches: list) -> float:
    """Mean loss over this rank's fixed validation batches, averaged over ranks; every rank
    takes part (ZeRO-3 gathers parameters collectively inside forward)."""
    engine.eval()
    total = torch.zeros((), device=batches[0][0].device)
    for x, y in batches:
        _, loss = engine(x, y)
        total += loss.float()
    engine.train()
    return mean_across_ranks(total / len(batches))


def as_float(value) -> float | None:
    if value is None:
        return None
    return float(value.item() if torch.is_tensor(value) else value)


class GradWatch:
    """Counts the steps since the last check whose gradient norm was not finite, on the device
    (no host sync per step). Under fp16 a non-finite norm is loss scaling at work (DeepSpeed
    skips the step and lowers the scale), so it does not count there."""

    def __init__(self, device: torch.device, dtype: str):
        self.device, self.counts = device, dtype != "fp16"
        self.on_device = torch.zeros((), device=device)
        self.on_host = 0

    def add(self, norm) -> None:
        if not self.counts or norm is None:
            return
        if torch.is_tensor(norm):
            self.on_device += (~torch.isfinite(norm.detach().float())).float().to(self.device)
        elif not math.isfinite(float(norm)):
            self.on_host += 1

    def total(self) -> torch.Tensor:
        return self.on_device + self.on_host

    def reset(self) -> None:
        self.on_device.zero_()
        self.on_host = 0


def reduce_check(interval_loss: torch.Tensor, interval_steps: int, watch: GradWatch) -> tuple[float, int]:
    """Mean loss of the steps since the last log, and the number of steps since the last check
    with a non-finite gradient norm on any rank: one all-reduce (a collective: every rank calls
    this at the same steps; it also syncs the device)."""
    t = torch.stack([interval_loss.detach().float() / interval_steps, watch.total().float()])
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
        t[0] /= dist.get_world_size()
    loss, bad = t.tolist()
    return loss, int(bad)


def data_metrics(batches: ResumableLoader, plan: DataPlan, device: torch.device) -> dict:
    """Skipped shards/samples (data.on_error=skip) and, for mixtures, the realised share of each
    source: summed over all ranks (a collective: every rank calls this at the same steps)."""
    stats = batches.stats()
    counts = [stats.get("skipped_shards", 0), stats.get("skipped_samples", 0), *stats["source_blocks"]]
    t = torch.tensor(counts, dtype=torch.float64, device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    totals = [int(v) for v in t.tolist()]
    out = {f"data/{k}": v for k, v in zip(("skipped_shards", "skipped_samples"), totals[:2]) if v}
    blocks = totals[2:]
    if len(blocks) > 1 and sum(blocks):
        for s, n in zip(plan.sources, blocks):
            out[f"data/share_{s.name}"] = n / sum(blocks)
    return out


def any_rank(flag: bool, device: torch.device) -> bool:
    """True on every rank if it is true on any: how ranks agree on a step to stop at."""
    t = torch.tensor([1 if flag else 0], device=device)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def model_shape(model: GPT) -> dict:
    c = model.config
    return {"n_layer": c.n_layer, "n_head": c.n_head, "n_embd": c.n_embd, "block_size": c.block_size,
            "vocab_size": c.vocab_size, "bias": c.bias}


def check_finite(loss: float, grad: float | None, bad_steps: int, step: int, since: int, lr: float) -> None:
    """A diverged run stops with an error (its last checkpoint kept) instead of training on NaNs.
    Checked on every step that logs, evaluates or saves, so no checkpoint is ever written from a
    diverged run: `loss` is the mean loss of the steps since the last log, `bad_steps` counts the
    steps after `since` whose gradient norm was not finite (outside fp16, where loss scaling
    makes that normal, a non-finite norm means DeepSpeed skipped the step: the run has diverged).
    All values are global (the same on every rank): all ranks stop together."""
    if math.isfinite(loss) and not bad_steps:
        return
    from kiln.errors import TrainingError

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


def train(cfg: dict, ctx: Context) -> dict:
    """Run `trainer.max_steps` optimizer steps, continuing from the latest checkpoint if there is
    one; returns the run summary (rank 0's is complete)."""
    from kiln.checkpoint.state import check_model_shape, load_checkpoint, read_meta, set_rng_state, write_checkpoint
    from kiln.checkpoint.weights import load_init_weights
    from kiln.tracking.console import print_line

    tr, data = cfg["trainer"], cfg["data"]
    seed_everything(tr["seed"])  # same seed on every rank: identical initial weights

    plan = plan_data(cfg)
    model = GPT(GPTConfig.from_model_section(cfg["model"], plan.tokenizer.vocab_size))
    shape = model_shape(model)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    if cfg["model"].get("init_from"):
        load_init_weights(model, cfg["model"]["init_from"], shape)
    # From here on each rank draws its own random numbers (dropout masks differ across ranks).
    # A resumed rank restores its own saved RNG state below.
    seed_everything(rank_seed(tr["seed"], ctx.rank))
    engine, _ = build_engine(model, cfg, ctx.world_size, cfg["optim"]["weight_decay"])
    own_norm = needs_own_grad_norm(engine)

    meta, loop_state = {}, {}
    with ctx.checkpoints.latest() as ckpt:
        if ckpt is not None:
            check_model_shape(read_meta(ckpt), shape, ckpt)
            meta, loop_state = load_checkpoint(ckpt, engine=engine, rank=ctx.rank, world_size=ctx.world_size)
            if ctx.is_main:
                print_line(f"resumed from {ckpt} at step {meta['step']}")
    start_step = meta.get("step", 0)
    data_state = loop_state.get("data") if data["resume_stream"] else None
    batches = ResumableLoader(plan.spec, rank=ctx.rank, world=ctx.world_size, num_workers=data["num_workers"],
                              state=data_state)
    if loop_state:
        set_rng_state(loop_state["rng"])  # last: creating the loader above draws from the RNG
    tracker = (Tracker(cfg, ctx.output_dir, resume_id=meta.get("wandb_id")) if ctx.is_main else NullTracker())
    if ctx.is_main:
        print_line(f"model: {n_params:,} parameters; {ctx.world_size} rank(s) on {ctx.device}; "
                   f"ZeRO-{cfg['parallelism']['zero_stage']} {cfg['precision']['dtype']}")
        for warning in plan.warnings:
            print_line(f"warning: {warning}")

    max_steps, grad_accum = tr["max_steps"], tr["grad_accum_steps"]
    tokens_per_step = tr["micro_batch_size"] * grad_accum * data["seq_len"] * ctx.world_size
    # The running loss of the current log interval continues across a resume (its steps' losses
    # are real); throughput counts only the steps timed in this process.
    interval_loss = loop_state.get("interval_loss", torch.zeros(())).to(ctx.device)
    interval_steps = loop_state.get("interval_steps", 0)
    timed_steps, interval_start = 0, time.perf_counter()
    last: dict = dict(loop_state.get("last", {}))
    throughput: list[float] = list(loop_state.get("throughput", []))
    first_here = len(throughput)
    watch, checked_at = GradWatch(ctx.device, cfg["precision"]["dtype"]), start_step
    val: list | None = None  # this rank's evaluation batches, read at the first eval and kept
    stopped_at = None

    def save(step: int, metrics: dict) -> None:
        run_meta = {"step": step, "tokens": step * tokens_per_step, "world_size": ctx.world_size,
                    "model_shape": shape, "wandb_id": getattr(tracker, "wandb_id", None),
                    "data_fingerprint": plan.spec.fingerprint, "config": cfg}
        state = {"step": step, "data": batches.state_dict(), "interval_loss": interval_loss.detach().cpu().clone(),
                 "interval_steps": interval_steps, "last": last, "throughput": throughput}
        ctx.checkpoints.save(step, lambda d: write_checkpoint(d, engine=engine, rank=ctx.rank, step=step,
                                                              loop_state=state, meta=run_meta), metrics)

    if start_step >= max_steps and ctx.is_main:
        print_line(f"run {tr['run_name']} already reached step {start_step} of trainer.max_steps={max_steps}; "
                   f"raise trainer.max_steps to train on, or set trainer.run_name for a new run")

    try:
        for step in range(start_step + 1, max_steps + 1):
            lr = float(engine.get_lr()[0])  # the rate this step applies (the scheduler moves after it)
            step_loss, norm = train_step(engine, batches, ctx.device, grad_accum, own_norm)
            interval_loss += step_loss
            interval_steps += 1
            timed_steps += 1
            watch.add(norm)
            stop = any_rank(ctx.stop_requested(), ctx.device)
            do_log = step % tr["log_interval"] == 0 or step == max_steps or stop
            do_eval = step % tr["eval_interval"] == 0 or step == max_steps
            do_save = (tr["checkpoint_interval"] > 0 and step % tr["checkpoint_interval"] == 0) or step == max_steps or stop
            metrics = {"step": step}
            if do_log or do_eval or do_save:  # never save (nor log) without checking for divergence
                loss, bad_steps = reduce_check(interval_loss, interval_steps, watch)  # also syncs the device
                grad = as_float(norm)
                check_finite(loss, grad, bad_steps, step, checked_at, lr)
                watch.reset()
                checked_at = step
            if do_log or do_eval:
                elapsed = time.perf_counter() - interval_start
                metrics.update({
                    "loss": loss,
                    "lr": lr,
                    "grad_norm": grad,
                    "tokens": step * tokens_per_step,
                    "tokens_per_s": timed_steps * tokens_per_step / elapsed,
                })
                metrics.update(data_metrics(batches, plan, ctx.device))
                throughput.append(metrics["tokens_per_s"])
                if do_eval:
                    if val is None:
                        val = eval_set(plan.val_urls, rank=ctx.rank, world=ctx.world_size, seq_len=data["seq_len"],
                                       batch_size=tr["micro_batch_size"], num_batches=tr["eval_batches"],
                                       eos_id=plan.tokenizer.eos_id, dtype=plan.val_dtype,
                                       on_error=data["on_error"], device=ctx.device)
                    metrics["eval_loss"] = evaluate(engine, val)
                    if plan.val_split != "val":
                        metrics["eval_split"] = plan.val_split  # labelled: not a validation loss
                    last["eval_loss"] = metrics["eval_loss"]
                tracker.log(metrics)
                last.update(loss=loss, step=step)
                interval_loss.zero_()
                interval_steps = timed_steps = 0
                interval_start = time.perf_counter()  # eval time is not train time
            if do_save:
                began = time.perf_counter()
                save(step, {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
                interval_start += time.perf_counter() - began  # nor is save time
            if stop:
                stopped_at = step
                if ctx.is_main:
                    print_line(f"stop requested: saved a checkpoint at step {step}; run the same command to resume")
                break
    finally:
        batches.close()  # stop reader processes before interpreter exit

    # This process's intervals; its first includes warm-up (allocations, JIT): left out when
    # there are others. (A resumed run that logged nothing falls back to the restored history.)
    here = throughput[first_here:]
    steady = here[1:] or here or throughput[1:] or throughput
    summary = {
        "steps": last.get("step", start_step),
        "resumed_from_step": start_step or None,
        "stopped_early_at": stopped_at,
        "final_loss": last.get("loss"),
        "final_eval_loss": last.get("eval_loss"),
        "eval_split": plan.val_split,
        "tokens": last.get("step", start_step) * tokens_per_step,
        "tokens_per_s": sum(steady) / len(steady) if steady else None,
        "parameters": n_params,
        "world_size": ctx.world_size,
        "data": batches.stats(),
        "output_dir": str(ctx.output_dir),
    }
    return tracker.finish(summary)
