"""Process environment shared by both launchers: quiet libraries, pick the accelerator."""

from __future__ import annotations

import os
import socket
import warnings


def cuda_available() -> bool:
    import torch  # here: prepare_checkpoint_tool must run before torch is first imported

    return torch.cuda.is_available()


def set_worker_env(socket_ifname: str | None = None, use_gpu: bool | None = None) -> None:
    """Call before importing deepspeed in a process that trains (use_gpu: the run's device
    decision, where this process knows it)."""
    if use_gpu is False or not cuda_available():
        # DeepSpeed would otherwise print a warning that it fell back to the CPU accelerator.
        os.environ.setdefault("DS_ACCELERATOR", "cpu")
    if socket_ifname:
        # Multi-node: without this gloo may advertise 127.0.0.1 (hostname -> loopback).
        os.environ["GLOO_SOCKET_IFNAME"] = socket_ifname
        os.environ["NCCL_SOCKET_IFNAME"] = socket_ifname
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    warnings.filterwarnings("ignore", category=UserWarning, module="torch")
    warnings.filterwarnings("ignore", category=FutureWarning)


def prepare_checkpoint_tool() -> None:
    """For one-process tools that read DeepSpeed checkpoints (kiln-export, kiln-generate):
    no shard-loading progress bar (set before torch imports tqdm), and the CPU accelerator
    chosen without a warning (before deepspeed is imported)."""
    os.environ.setdefault("TQDM_DISABLE", "1")
    set_worker_env()


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
