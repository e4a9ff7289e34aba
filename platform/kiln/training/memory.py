"""Peak memory of this process's training: the device's on a GPU, the host's on a CPU."""

from __future__ import annotations

import resource
import sys

import torch


def peak_memory(device: torch.device) -> dict:
    """{"peak_memory_gib", "memory_basis"}: torch's peak allocated bytes on a CUDA device (what
    the model, optimizer states and activations held at once; the caching allocator reserves a
    little more), else this process's peak resident set size."""
    if device.type == "cuda":
        return {"peak_memory_gib": torch.cuda.max_memory_allocated(device) / 2**30,
                "memory_basis": "torch.cuda.max_memory_allocated"}
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux, bytes on macOS
    return {"peak_memory_gib": rss / (2**30 if sys.platform == "darwin" else 2**20), "memory_basis": "host peak RSS"}


def memory_metrics(device: torch.device) -> dict:
    """This interval's memory, for the metrics: on a GPU torch's allocated and peak bytes (the
    peak since the run started), on a CPU the process's resident and peak resident set."""
    if device.type == "cuda":
        return {"memory/allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
                "memory/peak_gib": torch.cuda.max_memory_allocated(device) / 2**30}
    out = peak_memory(device)
    try:
        with open("/proc/self/statm") as f:
            resident_pages = int(f.read().split()[1])
        out_now = {"memory/rss_gib": resident_pages * resource.getpagesize() / 2**30}
    except (OSError, ValueError, IndexError):
        out_now = {}
    return {**out_now, "memory/peak_rss_gib": out["peak_memory_gib"]}
