"""The local checkpoint store, in-process: what becomes visible, when, and what is kept."""

import json

from kiln.checkpoint.store import LocalStore, complete_checkpoints, step_dir_name


def writer(step: int):
    def write(d):
        (d / "kiln").mkdir(parents=True, exist_ok=True)
        (d / "kiln" / "meta.json").write_text(json.dumps({"step": step}))
        (d / "ds").mkdir()
        (d / "ds" / "shard.pt").write_bytes(b"x" * step)
    return write


def test_saves_become_visible_whole_newest_kept(tmp_path):
    seen_during_write = []
    store = LocalStore(tmp_path / "run", keep=2, barrier=lambda: None, rank=0)
    with store.latest() as ckpt:
        assert ckpt is None  # a fresh run
    for step in (10, 20, 30):
        def write(d, step=step):
            seen_during_write.append([p.name for p in complete_checkpoints(tmp_path / "run")])
            writer(step)(d)
        store.save(step, write, {"loss": 1.0})
    # while step 30 was being written, only the finished ones were visible
    assert seen_during_write[-1] == [step_dir_name(10), step_dir_name(20)]
    assert [p.name for p in complete_checkpoints(tmp_path / "run")] == [step_dir_name(20), step_dir_name(30)]
    with store.latest() as ckpt:
        assert ckpt.name == step_dir_name(30) and (ckpt / "ds" / "shard.pt").read_bytes() == b"x" * 30
    assert not list((tmp_path / "run").glob(".*.tmp"))


def test_a_killed_save_is_never_chosen_and_is_cleared_by_the_next(tmp_path):
    run = tmp_path / "run"
    store = LocalStore(run, keep=0, barrier=lambda: None, rank=0)
    store.save(5, writer(5), {})
    partial = run / f".{step_dir_name(6)}.tmp"  # what a process killed mid-save leaves
    writer(6)(partial.mkdir(parents=True) or partial)
    with store.latest() as ckpt:
        assert ckpt.name == step_dir_name(5)
    store.save(6, writer(6), {})
    assert not partial.exists() and [p.name for p in complete_checkpoints(run)] == [step_dir_name(5), step_dir_name(6)]


def test_a_branch_source_is_used_only_until_the_run_has_its_own(tmp_path):
    other = tmp_path / "other" / step_dir_name(3)
    writer(3)(other.mkdir(parents=True) or other)
    store = LocalStore(tmp_path / "run", keep=1, barrier=lambda: None, rank=0, resume_from=other)
    with store.latest() as ckpt:
        assert ckpt == other
    store.save(4, writer(4), {})
    with store.latest() as ckpt:
        assert ckpt.name == step_dir_name(4)


# ------------------------------------------------------------- kills at random points of saves

def _checksummed_writer(step: int):
    """Like the real writer: many files (DeepSpeed's shards), meta.json last; plus the checksum
    of every file, so a check can tell a whole checkpoint from a partial one."""
    import hashlib
    import os

    def write(d):
        sums = {}
        (d / "ds").mkdir(parents=True)
        for i in range(16):
            data = os.urandom(64 * 1024)
            (d / "ds" / f"part_{i}.bin").write_bytes(data)
            sums[f"ds/part_{i}.bin"] = hashlib.sha256(data).hexdigest()
        (d / "kiln").mkdir()
        (d / "kiln" / "sums.json").write_text(json.dumps(sums))
        (d / "kiln" / "meta.json").write_text(json.dumps({"step": step}))
    return write


def _save_forever(run_dir: str, first_step: int, progress: str) -> None:
    """A child process: re-saves `first_step` (a restart recomputes the steps after its last
    checkpoint), then saves every step after it, recording each save that returned."""
    from pathlib import Path

    store = LocalStore(Path(run_dir), keep=2, barrier=lambda: None, rank=0)
    step = first_step
    while True:
        store.save(step, _checksummed_writer(step), {})
        with open(progress, "a") as f:
            f.write(f"{step}\n")
        step += 1


def _whole(ckpt) -> bool:
    import hashlib

    try:
        sums = json.loads((ckpt / "kiln" / "sums.json").read_text())
        return all(hashlib.sha256((ckpt / f).read_bytes()).hexdigest() == h for f, h in sums.items())
    except FileNotFoundError:  # (the old store: a pruned or replaced step, deleted file by file)
        return False


def test_kills_at_random_points_of_saves_never_lose_or_expose_a_partial_checkpoint(tmp_path):
    import multiprocessing as mp
    import random
    import time

    run, progress = tmp_path / "run", tmp_path / "progress"
    LocalStore(run, keep=2, barrier=lambda: None, rank=0).save(0, _checksummed_writer(0), {})
    rng, ctx = random.Random(1234), mp.get_context("fork")
    for kill in range(25):
        with LocalStore(run, keep=2, barrier=lambda: None, rank=0).latest() as latest:  # recovers first
            start = json.loads((latest / "kiln" / "meta.json").read_text())["step"]
        child = ctx.Process(target=_save_forever, args=(str(run), start, str(progress)))
        child.start()
        time.sleep(rng.uniform(0.0, 0.25))  # anywhere: writing, committing, replacing, pruning
        child.kill()
        child.join()
        store = LocalStore(run, keep=2, barrier=lambda: None, rank=0)
        with store.latest() as latest:
            found = complete_checkpoints(run)
            assert found and latest == found[-1], f"kill {kill}: no checkpoint chosen"
            assert all(_whole(c) for c in found), f"kill {kill}: a partial checkpoint is visible"
            saved = [int(s) for s in progress.read_text().split()] if progress.exists() else []
            step = json.loads((latest / "kiln" / "meta.json").read_text())["step"]
            assert step >= max(saved, default=0), f"kill {kill}: step {max(saved)} was saved, latest is {step}"
    # and a run goes on from there as usual
    store.save(step + 1, _checksummed_writer(step + 1), {})
    assert [p.name for p in complete_checkpoints(run)][-1] == step_dir_name(step + 1)
    assert not [p for p in run.iterdir() if p.name.startswith(".")]
