"""Faults tests inject into a real run (never set in normal use)."""

from __future__ import annotations

import os
import time


def stall_if_asked(rank: int, step: int) -> None:
    """KILN_FAULT_STALL="<rank>:<step>:<seconds>": that rank stops answering after that step, as a
    hung reader or a stuck device would, while the others wait in the next collective."""
    spec = os.environ.get("KILN_FAULT_STALL", "")
    if spec:
        r, s, seconds = spec.split(":")
        if int(r) == rank and int(s) == step:
            time.sleep(float(seconds))


def nan_loss_asked(rank: int, step: int) -> bool:
    """KILN_FAULT_NAN_STEP="<step>[:<rank>]": that step's loss is NaN on that rank (every rank
    when none is named), as a numerically bad batch makes it."""
    spec = os.environ.get("KILN_FAULT_NAN_STEP", "")
    if not spec:
        return False
    at, _, on = spec.partition(":")
    return int(at) == step and (not on or int(on) == rank)
