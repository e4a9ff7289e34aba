"""The checkpointer: owns the launcher's store, the save interval, writing and loading."""

from __future__ import annotations

from kiln.checkpoint.state import load_checkpoint, write_checkpoint
from kiln.context import Context
from kiln.plan import RunPlan
from kiln.tracking.console import print_line
from kiln.training.state import TrainState


class Checkpointer:
    def __init__(self, plan: RunPlan, ctx: Context, engine, tokens_per_step: int):
        tr = plan.config.trainer
        self.store, self.ctx, self.engine, self.tokenizer = ctx.checkpoints, ctx, engine, plan.data.tokenizer
        self.interval, self.max_steps, self.tokens_per_step = tr.checkpoint_interval, tr.max_steps, tokens_per_step
        self.meta = {"world_size": ctx.world_size, "model_shape": plan.model.shape(),
                     "data_fingerprint": plan.data.spec.fingerprint, "config": plan.public_config}

    def due(self, step: int) -> bool:
        return (self.interval > 0 and step % self.interval == 0) or step == self.max_steps

    def restore(self, state: TrainState) -> dict:
        """Load the run's latest checkpoint (or the one it branches from) into the engine and
        `state`; returns its meta ({} when starting fresh)."""
        with self.store.latest() as ckpt:
            if ckpt is None:
                return {}
            meta, loop_state = load_checkpoint(ckpt, engine=self.engine, rank=self.ctx.rank,
                                               world_size=self.ctx.world_size)
            if self.ctx.is_main:
                print_line(f"resumed from {ckpt} at step {meta['step']}")
        state.load_state_dict(loop_state)
        state.ledger.load_state_dict(state.saved_ledger, state.step, self.ctx.output_dir)
        return meta

    def roll_back(self, state: TrainState) -> int | None:
        """Reload the last checkpoint this run saved (the loss-spike guard); returns its step,
        or None when there is none yet. The run's own records (throughput, where it resumed
        from) are kept: it is the same run, gone back."""
        with self.store.last_saved() as ckpt:
            if ckpt is None:
                return None
            _, loop_state = load_checkpoint(ckpt, engine=self.engine, rank=self.ctx.rank,
                                            world_size=self.ctx.world_size)
        kept, undone = (state.throughput, state.resumed_from), state.step
        state.load_state_dict(loop_state)
        state.throughput, state.resumed_from = kept
        # the steps undone were not productive after all; the time spent on them stays wall time
        state.ledger.productive_s = state.saved_ledger.get("productive_s", state.ledger.productive_s)
        state.ledger.lost_steps += undone - state.step
        return state.step

    def save(self, state: TrainState, data_position: dict, metrics: dict, wandb_id: str | None) -> None:
        step = state.step
        meta = dict(self.meta, step=step, tokens=step * self.tokens_per_step, wandb_id=wandb_id)
        loop_state = state.state_dict(data_position)
        self.store.save(step, lambda d: write_checkpoint(d, engine=self.engine, rank=self.ctx.rank, step=step,
                                                         loop_state=loop_state, meta=meta, tokenizer=self.tokenizer),
                        {k: v for k, v in metrics.items() if isinstance(v, (int, float))})
