"""What a run shows on its console, and what each rank keeps in <output_dir>/logs/rank_<r>.log.

- Not a terminal (CI, Slurm, `ray job logs`): one plain `[kiln] step ...` line per log interval.
- A terminal (a pseudo-terminal here): a progress bar redrawn in place, then the closing summary.
- Under Ray: rank 0's lines as it wrote them (no Ray prefixes, no colour codes), no Ray chatter,
  the bar drawn by the driver from rank 0's records, a log file per rank; a worker's error and its
  traceback still shown (kiln's printer of Ray's forwarded output, tested on Ray's log batches)."""

import fcntl
import math
import os
import pty
import re
import select
import struct
import subprocess
import termios
import time

import pytest

from conftest import REPO, assert_ok, kiln_train, with_storage
from kiln.tracking.jsonl import read_jsonl

pytestmark = pytest.mark.integration

STEPS = ["trainer.max_steps=4", "trainer.log_interval=1", "trainer.eval_interval=4", "trainer.eval_batches=1",
         "logger=none", "data.num_workers=0", "trainer.checkpoint_interval=0"]
COLOUR = re.compile(r"\x1b\[[0-9;]*[1-9][0-9;]*m")  # an SGR sequence that sets a colour (a plain reset does not)


def args(data, *more) -> list[str]:
    return [f"data.path={data}", *STEPS, *more]


def kiln_train_on_a_terminal(overrides: list[str], run_dir, env: dict | None = None, timeout: float = 240):
    """The real kiln-train with stdout and stderr on a pseudo-terminal (120 columns); returns
    (exit status, everything it wrote there)."""
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 120, 0, 0))
    cmd = ["kiln-train", *with_storage(overrides, run_dir), f"hydra.run.dir={run_dir}"]
    proc = subprocess.Popen(cmd, cwd=REPO, stdin=slave, stdout=slave, stderr=slave,
                            env={**os.environ, "TERM": "xterm", **(env or {})})
    os.close(slave)
    out, deadline = b"", time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                data = os.read(master, 65536)
            except OSError:  # EIO: the last writer closed the terminal
                break
            if not data:
                break
            out += data
        else:
            proc.kill()
            raise AssertionError(f"kiln-train on a terminal did not finish in {timeout}s:\n{out.decode()[-3000:]}")
    finally:
        os.close(master)
    text = out.decode("utf-8", "replace")
    (run_dir.parent / f"{run_dir.name}.tty.log").write_text(text)
    return proc.wait(timeout=30), text


def screen_lines(text: str) -> list[str]:
    """The lines as a terminal leaves them: each line's text after its last carriage return, without
    escape sequences."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", text.replace("\r\n", "\n"))
    return [ln.rsplit("\r", 1)[-1] for ln in text.split("\n")]


@pytest.mark.timeout(300)
def test_plain_lines_and_a_rank_log_where_stdout_is_not_a_terminal(tmp_path, small_dataset):
    run = tmp_path / "run"
    proc = kiln_train(["launcher=local", *args(small_dataset)], run)
    assert_ok(proc)
    steps = [ln for ln in proc.stdout.splitlines() if ln.startswith("[kiln] step ")]
    assert [ln.split()[2] for ln in steps] == ["1/4", "2/4", "3/4", "4/4"], proc.stdout
    assert "eval " in steps[-1] and "tok/s" in steps[-1]
    assert "\x1b" not in proc.stdout + proc.stderr and "\r" not in proc.stdout, "no bar, no escape codes off a terminal"
    tail = proc.stdout.splitlines()[-5:]
    assert tail[0].startswith("[kiln] done: 4 steps | final train loss ") and "final eval loss " in tail[0]
    assert tail[1].startswith("[kiln] totals: ") and " wall" in tail[1] and "goodput " in tail[1], tail
    assert tail[2].startswith(f"[kiln] outputs: {run} ") and tail[-1].startswith("[kiln] checkpoints: ")

    log = (run / "logs" / "rank_0.log").read_text()
    assert log.startswith("=== rank 0: pid ")
    for line in steps:  # the same lines, in the same order
        assert line in log
    assert log.index(steps[0]) < log.index(steps[-1]) and "\x1b" not in log


@pytest.mark.timeout(300)
def test_a_terminal_gets_a_progress_bar_and_then_the_summary(tmp_path, small_dataset):
    run = tmp_path / "run"
    rc, out = kiln_train_on_a_terminal(["launcher=local", *args(small_dataset)], run)
    assert rc == 0, out[-3000:]
    assert "\r" in out and "\x1b[K" in out, "the bar is redrawn in place"
    assert re.search(r"step 0/4 \S+ +0% \| starting, \d+s", out), "the bar shows before the first interval"
    assert re.search(r"step 2/4 \S+ +50% \| loss \d\.\d{4} \| [\d,]+ tok/s \| \d+s, ETA \d+s", out), out[-3000:]
    assert re.search(r"step 4/4 .*\| eval \d\.\d{4} \|", out), "the eval loss joins the bar"
    assert "[kiln] step " not in out, "on a terminal the bar replaces the step lines"
    assert not COLOUR.search(out)
    lines = [ln for ln in screen_lines(out) if ln.strip()]
    assert lines[-5].startswith("[kiln] done: 4 steps") and lines[-1].startswith("[kiln] checkpoints: "), lines[-8:]
    assert lines[-6].startswith("step 4/4 "), "the bar's last state stays on screen above the summary"

    log = (run / "logs" / "rank_0.log").read_text()  # the file keeps plain lines, not the bar
    assert "[kiln] step 4/4 | loss " in log and "ETA" not in log and "\x1b" not in log and "\r" not in log


@pytest.mark.timeout(400)
def test_ray_console_is_rank_0_alone_as_it_wrote_it_and_every_rank_logs(tmp_path, small_dataset, ray_head):
    run = tmp_path / "run"
    # (ZeRO-0 in bf16 over two workers: no other 2-worker run uses that stage)
    rc, out = kiln_train_on_a_terminal(args(small_dataset, "parallelism=zero0", "precision=bf16"), run,
                                       env=ray_head.driver_env, timeout=360)
    assert rc == 0, out[-3000:]
    assert "2 rank(s) on cpu; ZeRO-0 bf16" in out
    records = read_jsonl(run / "metrics.jsonl")
    assert [r["step"] for r in records] == [1, 2, 3, 4]
    assert all(math.isfinite(r["loss"]) and r["grad_norm"] > 0 for r in records), records
    assert "(RayTrainWorker pid=" not in out and "(TrainController pid=" not in out, out[-3000:]
    assert "PreemptionWatcher" not in out and "core_worker.cc" not in out
    assert "Requesting resources" not in out and "Setting up process group" not in out
    assert not COLOUR.search(out), repr(COLOUR.search(out))
    lines = screen_lines(out)
    assert "[kiln] ranks: 2 on 1 node" in out and any(ln.startswith("[kiln] model: ") for ln in lines)
    assert re.search(r"step [123]/4 .*ETA \d+s", out), "the driver draws rank 0's progress"
    assert "[kiln] step " not in out
    lines = [ln for ln in lines if ln.strip()]
    assert lines[-5].startswith("[kiln] done: 4 steps") and lines[-1].startswith("[kiln] checkpoints: "), lines[-8:]

    rank0, rank1 = ((run / "logs" / f"rank_{r}.log").read_text() for r in (0, 1))
    assert rank0.startswith("=== rank 0: pid ") and rank1.startswith("=== rank 1: pid ")
    assert "[kiln] step 4/4 | loss " in rank0 and "[kiln] ranks: 2 on 1 node" in rank0
    assert "[kiln] step" not in rank1, "other ranks stay quiet"
    assert "\x1b" not in rank0 + rank1


def batch(lines: list[str], actor: str = "RayTrainWorker", err: bool = False, pid: int = 4242) -> dict:
    """One log batch as Ray's log monitor publishes it to the driver."""
    return {"ip": "10.0.0.1", "localhost": "10.0.0.1", "pid": pid, "job": "01000000", "is_err": err,
            "lines": lines, "actor_name": actor, "task_name": ""}


def test_ray_output_printer_keeps_errors_and_drops_prefixes_colours_and_chatter(capsys):
    from kiln.launch.ray_console import WorkerOutput

    printer = WorkerOutput()
    printer(batch(["[kiln] step 10/20 | loss 5.3144 | lr 3.16e-04 | 4,490 tok/s"]))
    printer(batch(["[kiln] step 11/20 | loss 5.3001 | lr 3.10e-04 | 4,480 tok/s"], pid=4444))  # a restarted rank 0
    printer(batch(["[2026-12-01 22:07:45,321 E 8303 8336] core_worker.cc:2465: Actor with class name: "
                   "'PreemptionWatcher' and ID: '25' has constructor arguments in the object store and "
                   "max_restarts > 0. If the arguments ...", "Resources requested: \x1b[33m2 CPU\x1b[0m"],
                  actor="TrainController", err=True, pid=8303))
    traceback = ["Error in training function:", "Traceback (most recent call last):",
                 '  File "kiln/launch/ray_launcher.py", line 139, in _worker_fn', "    summary = _train_rank(plan)",
                 '  File "kiln/training/fit.py", line 77, in fit', "    batches = next(stream)",
                 "kiln.errors.DataError: shard 3 is truncated", ""]
    printer(batch(traceback, err=True))
    printer(batch(traceback, err=True, pid=4343))  # rank 1 (or the restarted rank 0) fails alike
    printer.error_message({"lines": ["A worker died or was killed while executing a task."], "pid": "raylet",
                           "is_err": False}, ignore_prefix=False)  # as Ray's error listener calls it
    printer.flush()
    cap = capsys.readouterr()
    assert cap.out == ("[kiln] step 10/20 | loss 5.3144 | lr 3.16e-04 | 4,490 tok/s\n"
                       "[kiln] step 11/20 | loss 5.3001 | lr 3.10e-04 | 4,480 tok/s\n"
                       "[ray] A worker died or was killed while executing a task.\n"), "kiln's lines are never folded"
    err = cap.err.split("\n")
    assert "PreemptionWatcher" not in cap.err
    assert err[0] == "[ray] Resources requested: 2 CPU", "Ray's own processes: marked, colour codes dropped"
    assert err[1:9] == traceback, "a worker's error and its traceback pass whole, as the worker wrote them"
    assert err[9:] == ["Error in training function:", "Traceback (most recent call last):",
                       "  ... (4 lines as in the same traceback above)", "kiln.errors.DataError: shard 3 is truncated",
                       ""], "a repeat: its first lines and its error, never cut up line by line"
