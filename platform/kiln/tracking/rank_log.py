"""<output_dir>/logs/rank_<r>.log: everything one rank's process writes to stdout and stderr while it
trains, as plain text (no colour codes), appended across restarts and resumes.

The tee is at the file-descriptor level (1 and 2 become pipes that a thread copies to the file and to
the real stdout/stderr), so it holds what C and C++ code (gloo, NCCL, DeepSpeed's op builds) and
child processes (data loader workers) print, not only Python's prints. Under Ray the real stdout is
Ray's worker log, which Ray forwards to the driver's console as before."""

from __future__ import annotations

import os
import re
import select
import socket
import sys
import threading
import time
import traceback
from pathlib import Path

from kiln.tracking.progress import Terminal, write_all

LOGS_DIR = "logs"
# CSI (colours, cursor moves, line erases) and OSC (window titles, links) escape sequences
ANSI = re.compile(rb"\x1b\[[0-?]*[ -/]*[@-~]|\x1b\][^\x07\x1b]*(?:\x07|\x1b\\)|\x1b[@-Z\\-_]")
LONE_CR = re.compile(rb"\r(?!\n)")  # a bar's in-place redraw: one line per state in a file


def rank_log_path(output_dir: Path, rank: int) -> Path:
    return Path(output_dir) / LOGS_DIR / f"rank_{rank}.log"


def plain(data: bytes) -> bytes:
    return LONE_CR.sub(b"\n", ANSI.sub(b"", data))


class RankLog:
    """`with RankLog(output_dir, rank) as log:` tees this process's stdout and stderr into the rank's
    log file. terminal: where the output goes on (default: the real stdout/stderr; a ProgressBar keeps
    its bar below the text). log.record(text) writes to the file alone (kiln's lines that a bar shows,
    or that other ranks keep off the console), in order with what was printed before it."""

    def __init__(self, output_dir: Path, rank: int, terminal: Terminal | None = None):
        self.path = rank_log_path(output_dir, rank)
        self.rank, self.terminal, self.own_terminal = rank, terminal, terminal is None
        self.lock = threading.RLock()
        self.file = None
        self.pipes: dict[int, int] = {}  # fd (1, 2) -> read end of its pipe
        self.saved: dict[int, int] = {}  # fd -> the original, restored on exit

    def __enter__(self) -> "RankLog":
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.file = open(self.path, "ab", buffering=0)  # unbuffered: a killed process loses nothing written
        except OSError as e:  # a log file is never a reason to stop a run
            print(f"[kiln] warning: rank {self.rank} keeps no log file ({e}); its output goes to the console "
                  f"alone", file=sys.stderr, flush=True)
            return self
        started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.file.write(f"=== rank {self.rank}: pid {os.getpid()} on {socket.gethostname()}, {started} ===\n".encode())
        if self.terminal is None:
            self.terminal = Terminal.of_this_process()
        sys.stdout.flush(), sys.stderr.flush()
        for fd in (1, 2):
            self.saved[fd] = os.dup(fd)
            read, write = os.pipe()
            os.set_blocking(read, False)  # read only when select says so, or when draining
            os.dup2(write, fd)
            os.close(write)
            self.pipes[fd] = read
            threading.Thread(target=self._pump, args=(fd, read), daemon=True, name=f"kiln-rank-log-{fd}").start()
        return self

    def record(self, text: str) -> bool:
        """Whether the text went to the file (not where the file could not be opened)."""
        if self.file is None:
            return False
        sys.stdout.flush(), sys.stderr.flush()
        with self.lock:
            self._drain()
            if self.file is None:
                return False
            self.file.write(plain(text.encode("utf-8", "replace")))
            return True

    def __exit__(self, exc_type, exc, tb) -> None:
        if self.file is None:
            return
        sys.stdout.flush(), sys.stderr.flush()
        for fd, original in self.saved.items():
            os.dup2(original, fd)  # this process writes to the real stdout/stderr again
            os.close(original)
        with self.lock:
            self._drain()
            if exc is not None and not isinstance(exc, (KeyboardInterrupt, SystemExit)):
                # the caller (Ray, kiln-train) prints it after this block: the file keeps a copy
                self.file.write(plain("".join(traceback.format_exception(exc_type, exc, tb)).encode()))
            self.file.close()
            self.file = None
            if self.own_terminal:
                self.terminal.close()
            self.terminal = None

    def _pump(self, fd: int, read: int) -> None:
        """Copies one pipe until every writer is gone (this process's fd, then child processes that
        inherited it); after the block it forwards to the restored descriptor alone."""
        while True:
            try:
                select.select([read], [], [])
            except (OSError, ValueError):
                return
            with self.lock:
                if not self._copy(fd, read):
                    if self.pipes.get(fd) == read:
                        del self.pipes[fd]
                    os.close(read)
                    return

    def _drain(self) -> None:
        for fd, read in self.pipes.items():
            while self._copy(fd, read, until_empty=True):
                pass

    def _copy(self, fd: int, read: int, until_empty: bool = False) -> bool:
        """One read from the pipe to the file and on; False at its end (or, draining, when empty)."""
        try:
            data = os.read(read, 65536)
        except BlockingIOError:
            return not until_empty
        except OSError:
            return False
        if not data:
            return False
        if self.file is not None:
            try:
                self.file.write(plain(data))
            except OSError:
                pass  # a full or vanished disk must not block the run's own output
        try:
            if self.terminal is not None:
                self.terminal.write(data, err=fd == 2)
            else:
                write_all(fd, data)
        except OSError:
            pass  # the reader of our output went away: keep reading, or the writers would block
        return True
