"""events.jsonl: what happened to a run besides its metrics (a loss spike rolled back, ...), one
JSON object per event with its step and kind; rank 0 appends, across restarts and resumes."""

from __future__ import annotations

import json
import time
from pathlib import Path

EVENTS = "events.jsonl"


def record_event(output_dir: Path, kind: str, step: int, **fields) -> dict:
    event = {"event": kind, "step": step, "time": time.time(), **fields}
    with open(Path(output_dir) / EVENTS, "a") as f:
        f.write(json.dumps(event) + "\n")
    return event
