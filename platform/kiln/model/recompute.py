"""Activation checkpointing for a stack of Transformer blocks (trainer.activation_checkpointing).

A checkpointed block keeps only its input for the backward pass and runs its forward again
there: less memory, one more forward of that block. "selective" does it for every other block
(half the activation memory for a sixth more compute; torchtitan's per-layer option), "full" for
every block. Dropout draws the same masks when recomputed (checkpoint restores the RNG state).
"""

from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

MODES = ("none", "selective", "full")


def run_blocks(blocks, x: torch.Tensor, mode: str, *args) -> torch.Tensor:
    """x through each block (block(x, *args)), recomputing the ones `mode` picks."""
    recompute = mode != "none" and torch.is_grad_enabled()
    for i, block in enumerate(blocks):
        if recompute and (mode == "full" or i % 2 == 0):
            x = checkpoint(block, x, *args, use_reentrant=False)
        else:
            x = block(x, *args)
    return x
