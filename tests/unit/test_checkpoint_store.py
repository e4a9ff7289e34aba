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
