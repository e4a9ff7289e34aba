"""The driver's line to its Ray workers, as a Ray actor. Its own module, importing nothing else of
kiln (nor torch): the actor's process imports only this, not the training stack (about 4 CPU-s
per run saved; scripts/bench_launcher.py)."""

from __future__ import annotations


class RunChannel:
    """The stop flag (set on SIGTERM, polled by every worker), rank 0's latest progress record (the
    driver draws its bar from it, kiln/tracking/progress.py) and the summary rank 0 hands back at
    the end (so the driver needs no shared filesystem)."""

    _ray_options = {"num_cpus": 0}  # ray.remote(**_ray_options), applied by the launcher (no Ray import here)

    def __init__(self):
        self.stop, self.result, self.latest = False, None, None

    def request_stop(self) -> None:
        self.stop = True

    def stop_requested(self) -> bool:
        return self.stop

    def put_progress(self, record: dict) -> None:
        self.latest = record

    def progress(self) -> dict | None:
        return self.latest

    def put_summary(self, summary: dict) -> None:
        self.result = summary

    def summary(self) -> dict | None:
        return self.result
