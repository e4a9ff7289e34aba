"""Bounded reads of remote shards: a shard that streams through a process (an http(s) URL read
by curl, a `pipe:` command, gs:// by gsutil ...) and sends no byte for `data.read_timeout_s`
fails, naming the shard, instead of stalling its reader, and with it the run, for ever.

webdataset opens such a shard as a gopen Pipe. kiln reads the pipe's file descriptor only when
select() says a byte is there; after timeout_s of silence it kills the process (and what it
started: a `pipe:` command runs under a shell) and raises StalledRead."""

from __future__ import annotations

import io
import os
import select
import signal
import subprocess
from pathlib import Path

from webdataset.gopen import Pipe, gopen


class StalledRead(TimeoutError):
    pass


def descendants(pid: int) -> list[int]:
    """The processes `pid` started, and theirs (Linux /proc; elsewhere none are found)."""
    parents: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            ppid = int(stat.read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        parents.setdefault(ppid, []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = parents.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def kill_tree(pid: int) -> None:
    for p in [pid, *descendants(pid)]:
        try:
            os.kill(p, signal.SIGKILL)
        except ProcessLookupError:
            pass


class GuardedPipe(io.RawIOBase):
    """A gopen.Pipe's output, read with a bound on silence; EOF checks the exit status as
    webdataset does (a failed curl or command raises, naming it)."""

    def __init__(self, pipe: Pipe, timeout_s: float):
        self.pipe, self.timeout_s, self.fd = pipe, timeout_s, pipe.stream.fileno()
        self.eof = False

    def readable(self) -> bool:
        return True

    def readinto(self, buf) -> int:
        ready, _, _ = select.select([self.fd], [], [], self.timeout_s)
        if not ready:
            kill_tree(self.pipe.proc.pid)
            raise StalledRead(f"no data for {self.timeout_s:g} s (data.read_timeout_s): the storage or command "
                              f"behind it stalled")
        data = os.read(self.fd, len(buf))
        buf[:len(data)] = data
        if not data and not self.eof:
            self.eof = True
            self.wait_for_exit()
        return len(data)

    def wait_for_exit(self) -> None:
        # EOF comes as the command closes its output, a moment before its exit status can be
        # read: wait for it (poll() alone races, and a failed command would pass as a good one).
        try:
            self.pipe.proc.wait(self.timeout_s)
        except subprocess.TimeoutExpired:
            kill_tree(self.pipe.proc.pid)
            raise StalledRead(f"the command closed its output but did not exit within {self.timeout_s:g} s "
                              f"(data.read_timeout_s)") from None
        status = self.pipe.status = self.pipe.proc.returncode
        if status not in self.pipe.ignore_status and not self.pipe.ignore_errors:
            raise OSError(f"its command failed (exit {status}) after sending the whole stream")

    def close(self) -> None:
        if not self.closed:
            super().close()
            if not self.eof and self.pipe.proc.poll() is None:  # abandoned mid-shard: do not wait for it
                kill_tree(self.pipe.proc.pid)
            self.pipe.proc.wait()
            self.pipe.stream.close()


def open_remote(url: str, timeout_s: float | None):
    """The shard's byte stream as webdataset would open it, bounded when it comes from a process."""
    stream = gopen(url)
    if timeout_s and isinstance(stream, Pipe):
        return io.BufferedReader(GuardedPipe(stream, timeout_s), buffer_size=1 << 20)
    return stream
