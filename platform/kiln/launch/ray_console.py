"""What kiln-train shows of the output Ray forwards to it from its processes (log_to_driver).

Ray's own printer puts "(RayTrainWorker pid=21781)" and a colour code before every worker line.
kiln's prints each line as the worker wrote it (rank 0's `[kiln]` lines read as under
launcher=local), marks the lines of Ray's own processes (controller, raylet) with `[ray]`, and keeps
Ray's folding of lines that many workers print alike ("[repeated 3x across cluster]"), except for
kiln's own lines (rank 0's alone) and tracebacks (folded line by line they come out cut up): the
first traceback is shown whole, a repeat from another rank or a restarted worker by its first lines
and its error. Nothing is dropped by level: warnings, errors and tracebacks always pass. Ray's
routine chatter is kept out at its source instead (ray_launcher.py: Ray Train's log level, its
PreemptionWatcher); ROUTINE below is what remains.

Ray has no public hook for this: kiln's printer takes the place of Ray's in Ray's private stdstream
dispatcher, and of the function Ray's error listener prints with. Where a Ray version moves them,
Ray's own printer stays (prefixed lines; nothing lost)."""

from __future__ import annotations

import re
import sys

HANDLER = "ray_print_logs"  # the name Ray gives its printer (and removes at ray.shutdown)
WORKER_ACTOR = "RayTrainWorker"
COLOUR = re.compile(r"\x1b\[[0-9;]*m")
TRACEBACK = "Traceback (most recent call last):"
KILN_LINE = r"^\[kiln\] "
NUMBER = re.compile(r"\d+")
ROUTINE = [
    # Ray Train's PreemptionWatcher, where a user turns it back on: an E-level core_worker line at
    # every start that only says the actor's arguments live in the object store (harmless).
    re.compile(r"core_worker\.cc.*'PreemptionWatcher'.*constructor arguments in the object store"),
]


def routine(line: str) -> bool:
    return any(p.search(line) for p in ROUTINE)


class WorkerOutput:
    """Ray's log batches -> kiln's console (sys.stdout / sys.stderr as they are at each line: a
    progress bar may have replaced them)."""

    def __init__(self):
        from ray._private import ray_constants as rc
        from ray._private.ray_logging import LogDeduplicator
        from ray._private.worker import print_to_stdstream

        # Ray's own printer (not a printer of ours that an earlier ray.init put in its place)
        printer = getattr(print_to_stdstream, "__self__", None)
        self.ray_print = printer.ray_print if isinstance(printer, WorkerOutput) else print_to_stdstream

        # kiln's own lines come from rank 0 alone: never folded (Ray's key drops every word with a
        # digit, so a restarted rank 0's step lines would read as repeats of the last one's)
        allow = "|".join(f"(?:{p})" for p in (KILN_LINE, rc.RAY_DEDUP_LOGS_ALLOW_REGEX) if p)

        def dedup():
            return LogDeduplicator(rc.RAY_DEDUP_LOGS_AGG_WINDOW_S, allow, rc.RAY_DEDUP_LOGS_SKIP_REGEX)

        self.dedup = {False: dedup(), True: dedup()}  # stdout, stderr
        self.tracebacks: set[tuple[str, ...]] = set()  # the blocks of traceback lines shown whole

    def __call__(self, data: dict) -> None:
        if data.get("pid") == "autoscaler":  # cluster events (nodes added, ...): Ray's own formatting
            self.ray_print(data, ignore_prefix=True)
            return
        data = dict(data, lines=[ln for ln in data.get("lines", []) if not routine(ln)])
        if any(TRACEBACK in ln for ln in data["lines"]):
            self.print(self.traceback(data))
        elif data["lines"]:
            for batch in self.dedup[bool(data.get("is_err"))].deduplicate(data):
                self.print(batch)

    def traceback(self, batch: dict) -> dict:
        """A batch with a traceback, whole the first time; a repeat (numbers aside) by its first
        lines and its error (the full text is in that rank's logs/rank_<r>.log)."""
        lines = batch["lines"]
        key = tuple(NUMBER.sub("0", ln) for ln in lines)
        if key not in self.tracebacks or len(lines) <= 5:
            self.tracebacks.add(key)
            return batch
        first = next(i for i, ln in enumerate(lines) if TRACEBACK in ln)
        last = max(i for i, ln in enumerate(lines) if ln.strip())  # the error itself
        return dict(batch, lines=[*lines[:first + 1], f"  ... ({last - first - 1} lines as in the same traceback "
                                  "above)", lines[last]])

    def print(self, batch: dict) -> None:
        sink = sys.stderr if batch.get("is_err") else sys.stdout
        mark = "" if batch.get("actor_name") == WORKER_ACTOR else "[ray] "
        for line in batch.get("lines", []):
            print(mark + COLOUR.sub("", line), file=sink)
        sink.flush()

    def error_message(self, data: dict, ignore_prefix: bool = False) -> None:
        """Ray's errors pushed to the driver ("A worker died or was killed ..."), which Ray prints
        itself with a coloured "(raylet)" prefix: printed here like the rest."""
        self(data)

    def flush(self) -> None:
        """Lines Ray's de-duplication still holds back (counts of repeats): at the end of a run."""
        for dedup in self.dedup.values():
            for batch in dedup.flush():
                self.print(batch)


def show_worker_output() -> WorkerOutput | None:
    """Put kiln's printer in place of Ray's (after every ray.init: Ray adds its own again).
    None where Ray forwards nothing (log_to_driver=False) or keeps its printer elsewhere."""
    try:
        from ray._private.ray_logging import global_worker_stdstream_dispatcher as dispatcher
    except ImportError:
        return None
    handlers = dict(dispatcher.handlers)
    if HANDLER not in handlers:
        return None
    if isinstance(handlers[HANDLER], WorkerOutput):
        return handlers[HANDLER]
    try:
        printer = WorkerOutput()
    except (ImportError, AttributeError):
        return None
    with dispatcher._lock:  # swapped in place: a batch arriving meanwhile is printed by one or the other
        dispatcher.handlers = [(name, printer if name == HANDLER else h) for name, h in dispatcher.handlers]
    import ray._private.worker as ray_worker

    ray_worker.print_to_stdstream = printer.error_message  # (what Ray's error listener calls, by name)
    return printer
