"""Rank 0's live progress bar, drawn on the driver's terminal: one line redrawn in place, which any
other line clears, prints above itself, and draws again. Where the output is not a terminal kiln
prints one plain line per log interval instead (console.py decides).

    step 120/1000 [###-------------] 12% | loss 3.2100 | eval 3.1000 | 6,338 tok/s | 1m02s, ETA 4m12s

The ETA comes from the steady step rate: steps per wall-clock second since the first logged
interval (its warm-up left out; evaluation and checkpoint time left in, as the rest of the run
will spend them too)."""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import threading
import time

CLEAR_LINE = b"\r\x1b[2K"  # back to the line's start and erase it: no colour codes, ever


def write_all(fd: int, data: bytes) -> None:
    while data:
        data = data[os.write(fd, data):]


class Terminal:
    """The real stdout and stderr: duplicates of file descriptors 1 and 2, taken before anything
    redirects those (rank_log.py), written whole. Owns the duplicates."""

    def __init__(self, out_fd: int, err_fd: int):
        self.out_fd, self.err_fd = out_fd, err_fd
        self.lock = threading.RLock()

    @classmethod
    def of_this_process(cls) -> "Terminal":
        sys.stdout.flush(), sys.stderr.flush()
        return cls(os.dup(1), os.dup(2))

    def write(self, data: bytes, err: bool = False) -> None:
        with self.lock:
            write_all(self.err_fd if err else self.out_fd, data)

    def close(self) -> None:
        with self.lock:
            for fd in (self.out_fd, self.err_fd):
                with contextlib.suppress(OSError):
                    os.close(fd)


class ProgressBar(Terminal):
    """A Terminal that keeps a progress line at the bottom. update() takes rank 0's record of a log
    interval (metrics plus the `time` it was logged); a ticker redraws every second so elapsed time
    and ETA move between records."""

    def __init__(self, out_fd: int, err_fd: int, max_steps: int, tick_s: float = 1.0):
        super().__init__(out_fd, err_fd)
        self.max_steps, self.started = max_steps, time.time()
        self.last: dict | None = None
        self.eval_loss: float | None = None
        self.anchor: tuple[float, int] | None = None  # (time, step) of the first record: the rate's start
        self.shown = False  # the bar is on screen, the cursor at its end
        self.line_open = False  # text without its newline yet: no bar until that line ends
        self.closed = False
        self.err_on_screen = same_terminal(out_fd, err_fd)
        self.utf8 = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "") == "utf8"
        self._stop = threading.Event()
        with self.lock:
            self._draw()  # from launch on, not from the first log interval
        threading.Thread(target=self._tick, args=(tick_s,), daemon=True, name="kiln-progress").start()

    @classmethod
    def of_this_process(cls, max_steps: int) -> "ProgressBar":
        sys.stdout.flush(), sys.stderr.flush()
        return cls(os.dup(1), os.dup(2), max_steps)

    def update(self, record: dict) -> None:
        with self.lock:
            if self.last is not None and (record.get("step"), record.get("time")) == \
                    (self.last.get("step"), self.last.get("time")):
                return  # the same record again (the driver polls for it)
            if self.last is not None and record["step"] < self.last["step"]:
                self.anchor = None  # restarted from a checkpoint: measure the rate afresh
            if self.anchor is None:
                self.anchor = (record.get("time", time.time()), record["step"])
            if record.get("eval_loss") is not None:
                self.eval_loss = record["eval_loss"]
            self.last = record
            self._draw()

    def write(self, data: bytes, err: bool = False) -> None:
        with self.lock:
            if self.closed or (err and not self.err_on_screen):
                super().write(data, err)
                return
            self._clear()
            write_all(self.err_fd if err else self.out_fd, data)
            self.line_open = not data.endswith(b"\n")
            self._draw()

    def finish(self) -> None:
        """Leave the last state of the bar on screen, on its own line (not the starting line of a
        run that logged nothing); plain writes from here on."""
        with self.lock:
            self._stop.set()
            if not self.closed:
                if self.last is None:
                    self._clear()
                else:
                    self._draw()
                if self.shown:
                    write_all(self.out_fd, b"\n")
                self.shown, self.closed = False, True

    def close(self) -> None:
        self.finish()
        super().close()

    def steps_per_s(self, now: float) -> float | None:
        m = self.last
        t0, s0 = self.anchor
        t1 = m.get("time", now)
        if m["step"] > s0 and t1 > t0:
            return (m["step"] - s0) / (t1 - t0)
        if m.get("tokens") and m.get("tokens_per_s"):  # one record so far: its own interval's rate
            return m["tokens_per_s"] / (m["tokens"] / m["step"])
        return None

    def eta_s(self, now: float) -> float | None:
        rate = self.steps_per_s(now)
        if not rate:
            return None
        since = now - self.last.get("time", now)
        return max(0.0, (self.max_steps - self.last["step"]) / rate - since)

    def text(self, now: float, width: int) -> str:
        m = self.last
        step = 0 if m is None else m["step"]
        n = len(str(self.max_steps))
        head = f"step {step:>{n}}/{self.max_steps}"
        done = min(1.0, step / self.max_steps) if self.max_steps else 1.0
        cells = 16
        full, empty = ("\u2588", "\u2591") if self.utf8 else ("#", "-")
        bar = f"[{full * round(done * cells)}{empty * (cells - round(done * cells))}] {100 * done:3.0f}%"
        if m is None:  # workers starting, data opening, model building: the clock shows it is alive
            return f"{head} {bar} | starting, {duration(now - self.started)}"[:max(width - 1, 1)]
        parts = [f"loss {m['loss']:.4f}"]
        if self.eval_loss is not None:
            parts.append(f"eval {self.eval_loss:.4f}")
        parts.append(f"{m['tokens_per_s']:,.0f} tok/s")
        if m.get("mfu") is not None:
            parts.append(f"MFU {100 * m['mfu']:.1f}%")
        eta = self.eta_s(now)
        clock = duration(now - self.started)
        parts.append(f"{clock}, done" if m["step"] >= self.max_steps else
                     f"{clock}, ETA {duration(eta) if eta is not None else '?'}")
        line = " | ".join([f"{head} {bar}", *parts])
        if len(line) >= width:  # never wrap: a wrapped line cannot be redrawn in place
            line = " | ".join([head, *parts])
        return line[:max(width - 1, 1)]

    def _clear(self) -> None:
        if self.shown:
            write_all(self.out_fd, CLEAR_LINE)
            self.shown = False

    def _draw(self) -> None:
        if self.closed or self.line_open:
            return
        line = self.text(time.time(), terminal_width(self.out_fd))
        write_all(self.out_fd, b"\r" + line.encode("utf-8", "replace") + b"\x1b[K")
        self.shown = True

    def _tick(self, every: float) -> None:
        while not self._stop.wait(every):
            with self.lock:
                if self.shown:
                    self._draw()


class TerminalStream(io.TextIOBase):
    """sys.stdout / sys.stderr while a bar is on screen (the Ray driver: its own lines and the
    workers' forwarded ones): text goes through the bar, above it."""

    def __init__(self, terminal: Terminal, err: bool, encoding: str = "utf-8"):
        self.terminal, self.err, self._encoding = terminal, err, encoding

    @property
    def encoding(self) -> str:
        return self._encoding

    def write(self, s: str) -> int:
        self.terminal.write(s.encode(self._encoding, "replace"), self.err)
        return len(s)

    def isatty(self) -> bool:
        return True

    def fileno(self) -> int:
        return self.terminal.err_fd if self.err else self.terminal.out_fd


@contextlib.contextmanager
def streams_through(terminal: Terminal):
    """sys.stdout and sys.stderr write through `terminal` inside the block, and so do the logging
    handlers that hold them (Ray's driver-side loggers took sys.stderr when Ray was imported)."""
    saved = sys.stdout, sys.stderr
    for s in saved:
        s.flush()
    sys.stdout = TerminalStream(terminal, False, getattr(saved[0], "encoding", None) or "utf-8")
    sys.stderr = TerminalStream(terminal, True, getattr(saved[1], "encoding", None) or "utf-8")
    swapped = [(h, h.stream) for h in stream_handlers() if h.stream in saved]
    for h, stream in swapped:
        h.setStream(sys.stderr if stream is saved[1] else sys.stdout)
    try:
        yield
    finally:
        for h, stream in swapped:
            h.setStream(stream)
        sys.stdout, sys.stderr = saved


def stream_handlers() -> list[logging.StreamHandler]:
    loggers = [logging.getLogger(), *(lg for lg in logging.Logger.manager.loggerDict.values()
                                      if isinstance(lg, logging.Logger))]
    return [h for lg in loggers for h in lg.handlers
            if isinstance(h, logging.StreamHandler) and not isinstance(h, logging.FileHandler)]


def same_terminal(a: int, b: int) -> bool:
    try:
        return os.isatty(a) and os.isatty(b) and os.fstat(a).st_rdev == os.fstat(b).st_rdev
    except OSError:
        return False


def terminal_width(fd: int) -> int:
    try:
        return os.get_terminal_size(fd).columns or 120
    except OSError:
        return 120


def duration(seconds: float) -> str:
    s = int(seconds)
    if s >= 3600:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"
