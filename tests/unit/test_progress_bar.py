"""The progress bar on its own (the console tests run it inside real runs): it shows from launch,
before the first log interval, and a run that logged nothing leaves no bar behind."""

import os
import re
import time

import pytest

from kiln.tracking.progress import ProgressBar


def screen(data: bytes) -> str:
    """What the bar's line shows last: the text after its last carriage return, no escapes, the
    bar's cells as ASCII (block characters where stdout is UTF-8)."""
    text = re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", data.decode())
    return text.rsplit("\r", 1)[-1].replace("\u2588", "#").replace("\u2591", "-")


def drain(fd: int) -> bytes:
    out = b""
    while True:
        try:
            chunk = os.read(fd, 65536)
        except BlockingIOError:
            return out
        out += chunk


@pytest.mark.timeout(30)
def test_the_bar_shows_from_launch_then_each_interval_and_clears_if_nothing_was_logged():
    r, w = os.pipe()
    os.set_blocking(r, False)
    bar = ProgressBar(os.dup(w), os.dup(w), max_steps=10, tick_s=0.05)
    assert re.fullmatch(r"step  0/10 \[-{16}\]   0% \| starting, \d+s", screen(drain(r)))
    time.sleep(1.2)  # the ticker redraws: the clock moves while the workers start
    assert re.search(r"\| starting, [1-9]\d*s$", screen(drain(r)))
    bar.update({"step": 5, "loss": 3.25, "tokens": 5000, "tokens_per_s": 1000.0, "time": time.time()})
    line = screen(drain(r))
    assert line.startswith("step  5/10 [########--------]  50% | loss 3.2500 | 1,000 tok/s"), line
    assert re.search(r"ETA \ds$", line), line
    bar.close()
    assert drain(r).endswith(b"\n"), "the last state stays on screen, on its own line"

    quiet = ProgressBar(os.dup(w), os.dup(w), max_steps=10, tick_s=0.05)
    assert "starting" in screen(drain(r))
    quiet.close()  # (a run that failed before its first interval)
    assert screen(drain(r)) == "", "no starting line is left above the error"
    os.close(r), os.close(w)
