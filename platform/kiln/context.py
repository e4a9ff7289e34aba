"""What a launcher tells the training loop about the process it runs in.

The loop never imports Ray: the local launcher and the Ray launcher each build one of these.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

from kiln.checkpoint.store import CheckpointStore


@dataclass(frozen=True)
class Context:
    rank: int
    world_size: int
    local_rank: int
    node_rank: int
    device: torch.device
    output_dir: Path  # the run's directory (absolute; on shared storage for multi-node runs)
    checkpoints: CheckpointStore | None = None
    # True once this process was asked to stop (SIGTERM / preemption); ranks agree in the loop.
    stop_requested: Callable[[], bool] = field(default=lambda: False)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank}/{self.world_size} (node {self.node_rank}, local {self.local_rank}, {self.device})"
