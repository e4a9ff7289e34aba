"""fit: the training loop, the same for every launcher.

    build the model (shared seed) and its engine; restore the train state from a checkpoint
    for step in step+1 .. max_steps: forward/backward/step -> check -> log -> eval -> save
    summary
"""

from __future__ import annotations

import math
import random
import time

import numpy as np
import torch

from kiln.checkpoint.state import set_rng_state
from kiln.checkpoint.weights import load_init_weights
from kiln.context import Context
from kiln.data.stream import ResumableLoader
from kiln.engine.build import build_engine, needs_own_grad_norm
from kiln.model.factory import build_model as build_network
from kiln.plan import RunPlan
from kiln.tracking.console import print_line
from kiln.tracking.events import record_event
from kiln.tracking.tracker import NullTracker, Tracker
from kiln.training.checkpointer import Checkpointer
from kiln.training.evaluator import Evaluator
from kiln.training.faults import Faults
from kiln.training.memory import peak_memory
from kiln.training.metrics import MetricsLogger
from kiln.training.spikes import SpikeGuard
from kiln.training.state import TrainState
from kiln.training.step import GradWatch, as_float, train_step


def fit(plan: RunPlan, ctx: Context) -> dict:
    """Train to trainer.max_steps from wherever the run's checkpoints left it; returns the run's
    summary (rank 0's is complete)."""
    cfg, tr = plan.config, plan.config.trainer
    began = time.time()  # wall time counts from here: set-up (model, engine, restore) is not productive
    model, n_params = build_model(plan, ctx.rank)
    model.checkpointing = str(tr.activation_checkpointing)
    engine, _ = build_engine(model, cfg, ctx.world_size)
    if compile_enabled(tr.compile, ctx.device):
        engine.compile()  # DeepSpeed's: compiles the module in place, ZeRO hooks and names kept
    tokens_per_step = tr.micro_batch_size * tr.grad_accum_steps * cfg.data.seq_len * ctx.world_size
    state, checkpointer = TrainState(ctx.device), Checkpointer(plan, ctx, engine, tokens_per_step)
    state.ledger.started = began
    meta = checkpointer.restore(state)
    batches = data_loader(plan, ctx, state.data if cfg.data.resume_stream else None)
    if state.rng is not None:
        set_rng_state(state.rng)  # last: creating the loader above draws from the RNG
    tracker = Tracker(cfg, ctx.output_dir, resume_id=meta.get("wandb_id"),
                                            public_config=plan.public_config) if ctx.is_main else NullTracker()
    announce(plan, ctx, n_params)
    meter, evaluator = MetricsLogger(plan, ctx, state, tracker, tokens_per_step, n_params), Evaluator(plan, ctx)
    watch = GradWatch(ctx.device, str(cfg.precision.dtype), skip=tr.on_nonfinite == "skip",
                      max_skipped=tr.max_skipped_steps)
    guard = SpikeGuard(tr.spike_threshold, tr.spike_window, tr.spike_max_rollbacks)
    own_norm, stopped_at, faults, spiked = needs_own_grad_norm(engine), None, Faults.from_env(), set()
    try:
        while state.step < tr.max_steps:
            lr = float(engine.get_lr()[0])  # the rate this step applies (the scheduler moves after it)
            step_loss, norm = train_step(engine, batches, ctx.device, tr.grad_accum_steps, own_norm,
                                         poison=faults.nan_loss_asked(ctx.rank, state.step + 1),
                                         loss_factor=faults.loss_factor(state.step + 1, spiked), timer=meter.timer)
            state.add(watch.usable(step_loss))
            faults.stall_if_asked(ctx.rank, state.step)
            meter.step_done()
            watch.add(norm)
            # The ranks agree on a stop (SIGTERM, preemption) where they already sync: the steps
            # that log, evaluate or save (trainer.log_interval), never with a collective per step.
            log, evaluate, save = meter.due(state.step), evaluator.due(state.step), checkpointer.due(state.step)
            metrics, stop = {"step": state.step}, False
            if log or evaluate or save:  # never save (nor log) without checking for divergence
                loss, stop = watch.check(state.interval_loss, state.interval_steps, norm, state.step, lr,
                                         stop=ctx.stop_requested())
                spike = guard.is_spike(loss)
                if spike is not None:  # every rank sees the same loss: all go back together
                    with meter.paused("rollback"):
                        batches, rolled = roll_back(plan, ctx, state, checkpointer, batches, guard, watch, spike)
                    if rolled:
                        meter.restart_interval()
                        continue
                save = save or stop
            if log or evaluate:
                metrics = meter.record(loss, lr, as_float(norm), batches)
                if evaluate:
                    with meter.paused("eval"):
                        metrics.update(evaluator(engine))
                    metrics["time/eval_s"] = meter.timer.seconds.pop("eval")  # this interval's, not the next
                    metrics["eval_perplexity"] = math.exp(min(metrics["eval_loss"], 700.0))
                meter.write(metrics)
            if save:
                meter.settle()  # the checkpoint carries the productive time up to this step
                with meter.paused("checkpoint"):
                    checkpointer.save(state, batches.state_dict(), metrics, getattr(tracker, "wandb_id", None))
            if stop:
                stopped_at = state.step
                if ctx.is_main:
                    print_line(f"stop requested: saved a checkpoint at step {state.step}; run the same command to resume")
                break
    finally:
        batches.close()  # stop reader processes before interpreter exit
    return tracker.finish(summary(plan, ctx, state, meter, batches, n_params, stopped_at, tokens_per_step,
                                   watch.skipped, guard.rollbacks))


def data_loader(plan: RunPlan, ctx: Context, position: dict | None) -> ResumableLoader:
    """This rank's training batches, from `position` (a saved stream state) or the start."""
    return ResumableLoader(plan.data.spec, rank=ctx.rank, world=ctx.world_size,
                           num_workers=plan.config.data.num_workers, state=position,
                           pin_memory=ctx.device.type == "cuda")


def roll_back(plan: RunPlan, ctx: Context, state: TrainState, checkpointer: Checkpointer, batches: ResumableLoader,
              guard: SpikeGuard, watch: GradWatch, spike: dict) -> tuple[ResumableLoader, bool]:
    """The loss-spike guard's rollback (kiln/training/spikes.py): reload the last checkpoint,
    skip the data batches of the steps from it to the spike, go on from there. Returns the
    loader to go on with (a new one; the old one closed) and whether the run went back (not
    before its first checkpoint: then it trains on)."""
    spike_step = state.step
    guard.check_allowed(spike_step)
    back_to = checkpointer.roll_back(state)
    if back_to is None:
        if ctx.is_main:
            print_line(f"warning: loss spike at step {spike_step} (interval loss {spike['loss']:.4f}, recent mean "
                       f"{spike['recent_mean']:.4f}) but no checkpoint to roll back to yet: training on")
            record_event(ctx.output_dir, "loss_spike", spike_step, rolled_back_to=None, **spike)
        return batches, False
    guard.rollbacks += 1
    batches.close()
    batches = data_loader(plan, ctx, state.data)
    skipped = (spike_step - back_to) * plan.config.trainer.grad_accum_steps
    batches.skip(skipped)
    set_rng_state(state.rng)
    watch.checked_at = back_to
    if ctx.is_main:
        print_line(f"loss spike at step {spike_step}: interval loss {spike['loss']:.4f} against a recent mean of "
                   f"{spike['recent_mean']:.4f} (limit {spike['limit']:.4f}); rolled back to the step-{back_to} "
                   f"checkpoint and skipped the {skipped} micro-batch(es) of steps {back_to + 1}-{spike_step} "
                   f"(rollback {guard.rollbacks} of trainer.spike_max_rollbacks={guard.max_rollbacks})")
        record_event(ctx.output_dir, "loss_spike", spike_step, rolled_back_to=back_to, skipped_micro_batches=skipped,
                     rollback=guard.rollbacks, **spike)
    return batches, True


def compile_enabled(setting: bool | None, device: torch.device) -> bool:
    """trainer.compile: null compiles on GPUs only (on a CPU compiling costs more than it saves)."""
    return device.type == "cuda" if setting is None else bool(setting)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def rank_seed(seed: int, rank: int) -> int:
    """Each rank's seed after model init (dropout masks, sampling): distinct per rank and per run
    seed, derived from both (seed + rank would give run seed 1's rank 1 the stream of seed 2's rank 0)."""
    return int(np.random.SeedSequence([seed, rank]).generate_state(1, dtype=np.uint32)[0])


def build_model(plan: RunPlan, rank: int) -> tuple[torch.nn.Module, int]:
    """The model with the same initial weights on every rank (or model.init_from's); then each
    rank draws its own random numbers (a resumed rank restores its saved RNG state later)."""
    seed = plan.config.trainer.seed
    seed_everything(seed)
    model = build_network(plan.model)
    n_params = model.num_params()  # before ZeRO-3 partitions the parameters away
    if plan.config.model.init_from:
        load_init_weights(model, plan.config.model.init_from, plan.model.shape())
    seed_everything(rank_seed(seed, rank))
    return model, n_params


def announce(plan: RunPlan, ctx: Context, n_params: int) -> None:
    if not ctx.is_main:
        return
    cfg = plan.config
    print_line(f"model: {n_params:,} parameters; {ctx.world_size} rank(s) on {ctx.device}; "
               f"ZeRO-{cfg.parallelism.zero_stage} {cfg.precision.dtype}")
    for warning in plan.data.warnings:
        print_line(f"warning: {warning}")


def summary(plan: RunPlan, ctx: Context, state: TrainState, meter: MetricsLogger, batches: ResumableLoader,
            n_params: int, stopped_at: int | None, tokens_per_step: int, skipped: int = 0,
            rollbacks: int = 0) -> dict:
    last, ledger = state.last, state.ledger
    steps = last.get("step", state.resumed_from)
    return {
        "run_name": plan.run_name,
        "steps": steps,
        "resumed_from_step": state.resumed_from or None,
        "stopped_early_at": stopped_at,
        "final_loss": last.get("loss"),
        "final_eval_loss": last.get("eval_loss"),
        "best_eval_loss": last.get("best_eval_loss"),
        "best_eval_step": last.get("best_eval_step"),
        "eval_split": plan.data.val_split,
        "tokens": steps * tokens_per_step,
        "tokens_per_s": meter.steady_tokens_per_s(),
        "parameters": n_params,
        **meter.flops_summary(),
        **peak_memory(ctx.device),
        "skipped_steps": skipped,  # trainer.on_nonfinite=skip
        "rollbacks": rollbacks,  # trainer.spike_threshold: loss spikes rolled back
        # across restarts and resumes (kiln/training/timing.py)
        "goodput": ledger.goodput(), "productive_s": ledger.productive_s, "wall_s": ledger.wall_now(),
        "restarts": ledger.restarts, "lost_steps": ledger.lost_steps,
        "world_size": ctx.world_size,
        "data": batches.stats(),
        "output_dir": str(ctx.output_dir),
    }
