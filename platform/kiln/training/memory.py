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
