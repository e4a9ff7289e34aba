"""The model's own config: what GPT is built from (no torch here: the config side imports it)."""

from __future__ import annotations

from dataclasses import dataclass

# The fields a checkpoint's weights depend on (dropout does not change them).
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0
    bias: bool = True

    def shape(self) -> dict:
        """What a checkpoint of this model must match (saved in its meta.json as model_shape)."""
        return {k: getattr(self, k) for k in SHAPE_KEYS}
