"""Where checkpoints live and how one becomes visible.

Layout (the same for every launcher):

    <launcher.storage_path>/<trainer.run_name>/
        step_000000100/
            ds/...            DeepSpeed's sharded model and optimizer states (every rank's files)
            kiln/meta.json    step, tokens, W&B run id, model shape, world size, resolved config
            kiln/rank_N.pt    rank N's loop state: data-stream position, RNG states, running sums
        step_000000200/ ...

A checkpoint becomes visible only once every rank has written its part: the local store writes
into a hidden temporary directory and renames it after a barrier (a rename is atomic, so a
process killed mid-save leaves only a `.tmp` directory that is never chosen); under Ray, Ray
Train's checkpoint API registers the checkpoint only after every worker has reported it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def complete_checkpoints(run_dir: Path) -> list[Path]:
    """Committed checkpoints of a run, oldest first (temporary and partial ones ignored)."""
    if not run_dir.is_dir():
        return []
    found = [p for p in run_dir.iterdir() if p.is_dir() and STEP_DIR.match(p.name)
             and (p / "kiln" / "meta.json").is_file()]
    return sorted(found, key=lambda p: int(STEP_DIR.match(p.name).group(1)))


class CheckpointStore:
    """What the loop needs from a launcher's storage. `write(local_dir)` writes this rank's part."""

    def latest(self) -> contextlib.AbstractContextManager[Path | None]:
        raise NotImplementedError

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        raise NotImplementedError


class LocalStore(CheckpointStore):
    """A directory on a filesystem every rank sees (launcher=local: just this machine)."""

    def __init__(self, run_dir: Path, keep: int, barrier: Callable[[], None], rank: int,
                 resume_from: Path | None = None):
        self.run_dir, self.keep, self.barrier, self.rank = Path(run_dir), keep, barrier, rank
        self.resume_from = resume_from

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        found = complete_checkpoints(self.run_dir)
        yield found[-1] if found else self.resume_from

    def save(self, step: int, write: Callable[[Path], None], metrics: dict) -> None:
        final = self.run_dir / step_dir_name(step)
        tmp = self.run_dir / f".{final.name}.tmp"
        if self.rank == 0:
            if tmp.exists():  # left by a save that was killed: never used, safe to clear
                shutil.rmtree(tmp)
            tmp.mkdir(parents=True)
        self.barrier()
        write(tmp)
        fault_injection_pause(tmp, step)
        self.barrier()  # every rank has written its files
        if self.rank == 0:
            if final.exists():  # re-saving a step (e.g. after a restart): replace it whole
                shutil.rmtree(final)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.run_dir)[:-self.keep] if self.keep > 0 else []:
                shutil.rmtree(old, ignore_errors=True)
        self.barrier()


def fault_injection_pause(tmp: Path, step: int) -> None:
    """Tests set KILN_FAULT_SAVE_PAUSE="<step>:<seconds>" to hold that step's save open (every
    file written, nothing committed) so that they can kill the process mid-save; a marker file
    proves the pause was reached."""
    spec = os.environ.get("KILN_FAULT_SAVE_PAUSE", "")
    if not spec:
        return
    at, seconds = spec.split(":")
    if int(at) == step:

        marker = tmp / "kiln" / f"SAVE_IN_PROGRESS.{os.getpid()}"
        marker.write_text(str(step))
        time.sleep(float(seconds))
        marker.unlink()
