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
Directories leave the same way: renamed hidden first (`.step_N.old` while a re-saved step
replaces it, `.step_N.deleting` while pruned), so a kill at any point never leaves a partial
directory under a step name; `recover` puts back a `.old` whose replacement never arrived.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import time
from pathlib import Path
from typing import Callable, Iterator

from kiln.errors import CheckpointError

STEP_DIR = re.compile(r"^step_(\d{9})$")


def step_dir_name(step: int) -> str:
    return f"step_{step:09d}"


def recover(run_dir: Path) -> None:
    """Finish what a killed save left: a step moved aside for its replacement comes back if the
    replacement never arrived; half-deleted directories go."""
    if not run_dir.is_dir():
        return
    for p in run_dir.iterdir():
        name = p.name[1:].rsplit(".", 1)[0] if p.name.startswith(".") else ""
        if p.name.endswith(".old") and STEP_DIR.match(name):
            final = run_dir / name
            if (final / "kiln" / "meta.json").is_file():
                shutil.rmtree(p, ignore_errors=True)
            else:
                if final.exists():
                    retire(final)
                os.replace(p, final)
        elif p.name.endswith(".deleting") and STEP_DIR.match(name):
            shutil.rmtree(p, ignore_errors=True)


def retire(path: Path) -> None:
    """Delete a checkpoint directory: renamed hidden first, so it vanishes at once, whole."""
    trash = path.with_name(f".{path.name}.deleting")
    if trash.exists():
        shutil.rmtree(trash, ignore_errors=True)
    os.replace(path, trash)
    shutil.rmtree(trash, ignore_errors=True)


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

    def last_saved(self) -> contextlib.AbstractContextManager[Path | None]:
        """The newest checkpoint this run has saved (mid-run: what a rollback goes back to)."""
        return self.latest()


class LocalStore(CheckpointStore):
    """A directory on a filesystem every rank sees (launcher=local: just this machine)."""

    def __init__(self, run_dir: Path, keep: int, barrier: Callable[[], None], rank: int,
                 resume_from: Path | None = None):
        self.run_dir, self.keep, self.barrier, self.rank = Path(run_dir), keep, barrier, rank
        self.resume_from = resume_from

    @contextlib.contextmanager
    def latest(self) -> Iterator[Path | None]:
        if self.rank == 0:
            recover(self.run_dir)
        self.barrier()
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
        with abandoned_on_failure(tmp, step, self.run_dir):
            write(tmp)
        fault_injection_pause(tmp, step)
        self.barrier()  # every rank has written its files
        if self.rank == 0:
            aside = final.with_name(f".{final.name}.old")  # (recover() puts it back if killed here)
            if final.exists():  # re-saving a step (e.g. after a restart): replace it whole
                if aside.exists():
                    shutil.rmtree(aside)
                os.replace(final, aside)
            os.replace(tmp, final)
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            for old in complete_checkpoints(self.run_dir)[:-self.keep] if self.keep > 0 else []:
                retire(old)
        self.barrier()


FULL_BELOW_BYTES = 1 << 20  # a failed write with less free than this: the disk filled up


def disk_full(error: BaseException, path: Path) -> bool:
    """Whether `error` came from a full disk. torch.save reports one as a RuntimeError about
    a zip-file position, so the filesystem is asked too (before the partial files go)."""
    if isinstance(error, OSError) and error.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    try:
        return shutil.disk_usage(path).free < FULL_BELOW_BYTES
    except OSError:
        return False


@contextlib.contextmanager
def abandoned_on_failure(tmp: Path, step: int, run_dir: Path | None = None):
    """A save that fails removes its partial files (giving a full disk its space back) and,
    where the disk is full, says so, naming the checkpoint that is kept (the newest complete one
    in `run_dir`; None where the store does not know the run's checkpoints, as under Ray)."""
    try:
        yield
    except BaseException as e:
        full = disk_full(e, tmp)
        shutil.rmtree(tmp, ignore_errors=True)
        if not full:
            raise
        previous = None if run_dir is None else complete_checkpoints(run_dir)  # (listed only on failure)
        kept = ("the previous checkpoint is kept" if previous is None else
                f"the previous checkpoint {previous[-1]} is kept" if previous else "no earlier checkpoint exists")
        raise CheckpointError(
            f"saving the step-{step} checkpoint into {tmp.parent}: no space left on its disk ({e}); the save was "
            f"abandoned and its partial files removed; {kept}. Free space there, or set launcher.storage_path "
            f"to a disk with room (trainer.keep_checkpoints sets how many are kept), then run the same command "
            f"to resume") from e


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
