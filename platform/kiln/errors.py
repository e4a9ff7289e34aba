"""Errors a user can act on: each names what is wrong (config key, file, shard, rank) and the fix."""

from __future__ import annotations


class KilnError(Exception):
    """Base class: kiln-train prints these without a traceback and exits non-zero."""


class ConfigError(KilnError):
    def __init__(self, key: str, problem: str, fix: str):
        self.key = key
        super().__init__(f"config error at `{key}`: {problem}\n  fix: {fix}")


class DataError(KilnError):
    """Missing, empty or unreadable shards; the message names the path or shard URL."""


class CheckpointError(KilnError):
    """A checkpoint that cannot be written (disk full) or read; names the path and what is kept."""


class TrainingError(KilnError):
    """A worker failed; carries the worker's own message."""
