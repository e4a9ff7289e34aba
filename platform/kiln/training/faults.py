"""Faults tests inject into a real run (never set in normal use). Read from the environment once,
when the loop starts, not on every step."""

from __future__ import annotations

import os
import time
from dataclasses import dataclass


@dataclass(frozen=True)
class Faults:
    stall: tuple[int, int, float] | None = None  # (rank, step, seconds)
    nan: tuple[int, int | None] | None = None  # (step, rank or None: every rank)
    spike: tuple[int, float] | None = None  # (step, factor)

    @classmethod
    def from_env(cls) -> "Faults":
        """KILN_FAULT_STALL="<rank>:<step>:<seconds>": that rank stops answering after that step, as a
        hung reader or a stuck device would, while the others wait in the next collective.
        KILN_FAULT_NAN_STEP="<step>[:<rank>]": that step's loss is NaN on that rank (every rank when
        none is named), as a numerically bad batch makes it.
        KILN_FAULT_SPIKE_STEP="<step>[:<factor>]": the first time the run reaches that step, its loss
        (and so its gradients) is multiplied by factor (default 20) on every rank: a loss spike."""
        stall = nan = spike = None
        if os.environ.get("KILN_FAULT_STALL"):
            r, s, seconds = os.environ["KILN_FAULT_STALL"].split(":")
            stall = (int(r), int(s), float(seconds))
        if os.environ.get("KILN_FAULT_NAN_STEP"):
            at, _, on = os.environ["KILN_FAULT_NAN_STEP"].partition(":")
            nan = (int(at), int(on) if on else None)
        if os.environ.get("KILN_FAULT_SPIKE_STEP"):
            at, _, factor = os.environ["KILN_FAULT_SPIKE_STEP"].partition(":")
            spike = (int(at), float(factor or 20))
        return cls(stall, nan, spike)

    def stall_if_asked(self, rank: int, step: int) -> None:
        if self.stall is not None and self.stall[:2] == (rank, step):
            time.sleep(self.stall[2])

    def nan_loss_asked(self, rank: int, step: int) -> bool:
        return self.nan is not None and self.nan[0] == step and self.nan[1] in (None, rank)

    def loss_factor(self, step: int, seen: set) -> float:
        """The spike fault's factor at `step` the first time it is reached (seen: steps already
        spiked in this process; a rollback replays the step without it), else 1."""
        if self.spike is None or self.spike[0] != step or step in seen:
            return 1.0
        seen.add(step)
        return self.spike[1]
