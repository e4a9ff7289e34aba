"""The loss-spike guard (trainer.spike_threshold; off by default).

A loss spike that does not recover can ruin days of training; the practice of the large runs
(PaLM, OLMo) is to go back to a checkpoint from before it and skip the data that led to it.
kiln does that automatically: at each log interval (where the ranks already agree on the mean
loss, so the guard costs no collective), an interval's mean loss more than `threshold` standard
deviations above the mean of the last `window` intervals is a spike. The run then reloads its
last checkpoint (step c) and skips the data batches of steps c+1 .. the spike, so they are never
trained on again; the event goes to events.jsonl, the console and W&B. More than
`max_rollbacks` spikes stop the run (its checkpoints kept): the cause is then not a few batches.
"""

from __future__ import annotations

import math
import statistics
from collections import deque

from kiln.errors import TrainingError

MIN_HISTORY = 5  # intervals seen before the guard arms (or the whole window, if it is smaller)
STD_FLOOR = 0.01  # of the mean: a flat curve's tiny spread must not make noise a spike


class SpikeGuard:
    def __init__(self, threshold: float | None, window: int, max_rollbacks: int):
        self.threshold, self.max_rollbacks = threshold, max_rollbacks
        self.history: deque[float] = deque(maxlen=window)
        self.rollbacks = 0

    @property
    def enabled(self) -> bool:
        return self.threshold is not None

    def limit(self, mean: float) -> float | None:
        """The loss above which an interval is a spike, or None while the guard is not armed."""
        if not self.enabled or len(self.history) < min(MIN_HISTORY, self.history.maxlen):
            return None
        std = statistics.pstdev(self.history)
        return mean + self.threshold * max(std, STD_FLOOR * abs(mean))

    def is_spike(self, loss: float) -> dict | None:
        """Whether this interval's mean loss (the same on every rank) is a spike: its statistics
        if so; otherwise the loss joins the history."""
        if not self.enabled or not math.isfinite(loss):  # non-finite: trainer.on_nonfinite's to handle
            return None
        mean = statistics.fmean(self.history) if self.history else loss
        limit = self.limit(mean)
        if limit is not None and loss > limit:
            return {"loss": loss, "recent_mean": mean, "limit": limit}
        self.history.append(loss)
        return None

    def check_allowed(self, step: int) -> None:
        """Before a rollback: one more than trainer.spike_max_rollbacks stops the run instead."""
        if self.rollbacks >= self.max_rollbacks:
            raise TrainingError(
                f"loss spike at step {step}: the {self.rollbacks + 1}th, more than trainer.spike_max_rollbacks="
                f"{self.max_rollbacks}; the run stops here, its checkpoints kept. Lower optim.lr or optim.grad_clip "
                f"(or raise trainer.spike_threshold), then run the same command to resume")
