"""AdamW parameter groups, the same rule for every kiln model."""

from __future__ import annotations

import torch.nn as nn


def decay_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Decay the matrices (2-D and up), never biases or norm gains; a tied matrix once
    (parameters() yields it once)."""
    decay, no_decay = [], []
    for p in model.parameters():
        if p.requires_grad:
            (decay if p.dim() >= 2 else no_decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
