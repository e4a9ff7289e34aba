"""The evaluator: owns the eval interval and this rank's fixed validation batches."""

from __future__ import annotations

import torch

from kiln.context import Context
from kiln.data.validation import eval_set
from kiln.plan import RunPlan
from kiln.training.step import mean_across_ranks


class Evaluator:
    def __init__(self, plan: RunPlan, ctx: Context):
        self.plan, self.ctx = plan, ctx
        tr = plan.config.trainer
        self.interval, self.max_steps = tr.eval_interval, tr.max_steps
        self.batches: list | None = None  # read at the first evaluation, then kept

    def due(self, step: int) -> bool:
        return step % self.interval == 0 or step == self.max_steps

    def _batches(self) -> list:
        if self.batches is None:
            d, cfg = self.plan.data, self.plan.config
            self.batches = eval_set(d.val_urls, rank=self.ctx.rank, world=self.ctx.world_size,
                                    seq_len=cfg.data.seq_len, batch_size=cfg.trainer.micro_batch_size,
                                    num_batches=cfg.trainer.eval_batches, eos_id=d.tokenizer.eos_id,
                                    dtype=d.val_dtype, on_error=str(cfg.data.on_error), device=self.ctx.device,
                                    read_timeout_s=cfg.data.read_timeout_s)
        return self.batches

    @torch.no_grad()
    def __call__(self, engine) -> dict:
        """Mean loss over this rank's validation batches, averaged over ranks; every rank takes
        part (ZeRO-3 gathers parameters collectively inside forward). Labelled when the data has
        no validation split (an eval loss on training shards must never pass for a validation loss)."""
        batches = self._batches()
        engine.eval()
        total = torch.zeros((), device=batches[0][0].device)
        for x, y in batches:
            _, loss = engine(x, y)
            total += loss.float()
        engine.train()
        out = {"eval_loss": mean_across_ranks(total / len(batches))}
        if self.plan.data.val_split != "val":
            out["eval_split"] = self.plan.data.val_split
        return out
