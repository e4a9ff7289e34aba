"""Where a run's time goes, per log interval (metrics `time/*_s`), and its goodput.

Phases: `data` (waiting for the next batch: host time), `forward_backward` and `optimizer`
(device time: on a GPU measured with CUDA events, so no step waits for the device; on a CPU the
host clock), `checkpoint` (the stall of a save) and `eval`. The loop's collectives at each log
step have already synchronised the device when the interval's events are read.

Goodput is productive time over wall time: productive = forward+backward+optimizer time of the
steps the run kept; wall = the time kiln's training processes ran, from the start of the loop's
set-up (building the model and engine, restoring the checkpoint: not productive).
Both travel in checkpoints (TrainState.ledger), so they add up across restarts and resumes.
A process that dies loses the steps after its last checkpoint: their time is not productive
(it is recomputed), and is counted as wall time where the restarted process can see it (Ray's
restart, same output directory: the dead process's last metrics record), with the lost steps.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from pathlib import Path

import torch

DEVICE_PHASES = ("forward_backward", "optimizer")


class StepTimer:
    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.seconds: dict[str, float] = defaultdict(float)
        self.events: list[tuple[str, torch.cuda.Event, torch.cuda.Event]] = []
        self.settled = 0.0  # productive seconds of this interval already handed to the ledger

    @contextlib.contextmanager
    def phase(self, name: str):
        if self.cuda and name in DEVICE_PHASES:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            yield
            end.record()
            self.events.append((name, start, end))
            return
        began = time.perf_counter()
        yield
        self.seconds[name] += time.perf_counter() - began

    def add(self, name: str, seconds: float) -> None:
        self.seconds[name] += seconds

    def settle(self) -> float:
        """Read the recorded device events; returns the productive seconds added since the last
        settle (for the ledger, at log steps and before a save)."""
        for name, start, end in self.events:
            end.synchronize()  # (already done: the step's all-reduce waited for the device)
            self.seconds[name] += start.elapsed_time(end) / 1000
        self.events.clear()
        productive = sum(self.seconds[p] for p in DEVICE_PHASES)
        new, self.settled = productive - self.settled, productive
        return new

    def collect(self) -> dict[str, float]:
        """The interval's seconds per phase ({"time/data_s": ...}); starts the next interval.
        Call settle() first."""
        out = {f"time/{k}_s": v for k, v in self.seconds.items()}
        self.seconds.clear()
        self.settled = 0.0
        return out


class Ledger:
    """The run's productive and wall time, restarts and lost steps, across processes."""

    def __init__(self):
        self.productive_s = 0.0
        self.wall_s = 0.0  # of earlier processes, up to the checkpoint this one started from
        self.restarts = 0
        self.lost_steps = 0
        self.started = time.time()  # this process's loop (fit sets it to its own start)

    def wall_now(self) -> float:
        return self.wall_s + (time.time() - self.started)

    def goodput(self) -> float | None:
        wall = self.wall_now()
        return self.productive_s / wall if wall > 0 else None

    def state_dict(self) -> dict:
        return {"productive_s": self.productive_s, "wall_s": self.wall_now(), "restarts": self.restarts,
                "lost_steps": self.lost_steps, "saved_at": time.time()}

    def load_state_dict(self, saved: dict, step: int, output_dir: Path) -> None:
        """Continue the ledger of the checkpoint at `step`: one restart more, and what the
        process before lost after that checkpoint, where its records are in this output dir."""
        self.productive_s, self.wall_s = saved.get("productive_s", 0.0), saved.get("wall_s", 0.0)
        self.restarts, self.lost_steps = saved.get("restarts", 0) + 1, saved.get("lost_steps", 0)
        last = last_record(Path(output_dir) / "metrics.jsonl")
        if last and last.get("step", 0) > step and "time" in last and "saved_at" in saved:
            self.lost_steps += last["step"] - step
            self.wall_s += max(0.0, last["time"] - saved["saved_at"])


def last_record(path: Path) -> dict | None:
    try:
        lines = path.read_text().splitlines()
        return json.loads(lines[-1]) if lines else None
    except (OSError, ValueError):
        return None
