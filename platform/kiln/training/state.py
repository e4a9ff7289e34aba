"""The train state: what a rank needs, besides DeepSpeed's engine, to continue exactly where it
stopped. It saves and loads itself (kiln/rank_<r>.pt in a checkpoint; RNG states are added by
the checkpoint writer, restored last by `fit`)."""

from __future__ import annotations

import torch

from kiln.training.timing import Ledger


class TrainState:
    def __init__(self, device: torch.device):
        self.step = 0
        # The running loss of the current log interval continues across a resume (its steps'
        # losses are real); throughput history is kept so a resumed summary can fall back on it.
        self.interval_loss = torch.zeros((), device=device)
        self.interval_steps = 0
        self.last: dict = {}  # the latest logged loss / step / eval_loss
        self.throughput: list[float] = []
        self.data: dict | None = None  # the data stream's position, as loaded (or None)
        self.rng: dict | None = None
        self.resumed_from = 0
        self.ledger = Ledger()  # productive and wall time, restarts (kiln/training/timing.py)
        self.saved_ledger: dict = {}  # as loaded, for Checkpointer.restore

    def add(self, step_loss: torch.Tensor) -> None:
        self.step += 1
        self.interval_loss += step_loss
        self.interval_steps += 1

    def start_interval(self) -> None:
        self.interval_loss.zero_()
        self.interval_steps = 0

    def state_dict(self, data_position: dict) -> dict:
        return {"step": self.step, "data": data_position, "interval_loss": self.interval_loss.detach().cpu().clone(),
                "interval_steps": self.interval_steps, "last": dict(self.last), "throughput": list(self.throughput),
                "ledger": self.ledger.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        self.step = self.resumed_from = state["step"]
        self.interval_loss = state.get("interval_loss", torch.zeros(())).to(self.interval_loss.device)
        self.interval_steps = state.get("interval_steps", 0)
        self.last = dict(state.get("last", {}))
        self.throughput = list(state.get("throughput", []))
        self.data, self.rng = state.get("data"), state.get("rng")
        self.saved_ledger = dict(state.get("ledger", {}))
