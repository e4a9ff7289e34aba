"""The models' own configs: what GPT (kiln.model.gpt) and Llama (kiln.model.llama) are built from.
No torch here: the config side imports it.

A model's `shape()` is what its weights depend on (saved in a checkpoint's meta.json as
model_shape, and checked before a resume or model.init_from): dropout is not in it.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import ClassVar, Union

# The fields a GPT checkpoint's weights depend on (a shape without "arch" is a GPT: kiln wrote
# those before Llama existed).
SHAPE_KEYS = ("n_layer", "n_head", "n_embd", "block_size", "vocab_size", "bias")
LLAMA_SHAPE_KEYS = ("n_layer", "n_head", "n_kv_head", "n_embd", "ffn_hidden", "block_size", "vocab_size",
                    "tie_embeddings", "rope_theta", "norm_eps")


@dataclass(frozen=True)
class GPTConfig:
    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    dropout: float = 0.0
    bias: bool = True
    arch: ClassVar[str] = "gpt2"

    def shape(self) -> dict:
        """What a checkpoint of this model must match (saved in its meta.json as model_shape)."""
        return {"arch": self.arch, **{k: getattr(self, k) for k in SHAPE_KEYS}}


@dataclass(frozen=True)
class LlamaConfig:
    """A Llama-style decoder (Touvron et al. 2023): RMSNorm, SwiGLU, rotary positions, no biases,
    grouped-query attention (n_kv_head key/value heads shared by n_head query heads)."""

    vocab_size: int
    n_layer: int
    n_head: int
    n_embd: int
    block_size: int
    n_kv_head: int
    ffn_hidden: int
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: bool = False
    dropout: float = 0.0
    arch: ClassVar[str] = "llama"

    def shape(self) -> dict:
        return {"arch": self.arch, **{k: getattr(self, k) for k in LLAMA_SHAPE_KEYS}}


ModelShapeConfig = Union[GPTConfig, LlamaConfig]
ARCHS = {"gpt2": GPTConfig, "llama": LlamaConfig}


def arch_of(shape: dict) -> str:
    return shape.get("arch", "gpt2")


def shape_keys(arch: str) -> tuple[str, ...]:
    return ("arch",) + (LLAMA_SHAPE_KEYS if arch == "llama" else SHAPE_KEYS)


# Where each architecture keeps its token embedding (the LM head's twin when they are tied).
EMBEDDING = {"gpt2": "transformer.wte.weight", "llama": "model.embed_tokens.weight"}


def tied_embedding(shape: dict) -> str | None:
    """The state-dict name of the token embedding when the LM head shares it, else None."""
    arch = arch_of(shape)
    tied = True if arch == "gpt2" else bool(shape.get("tie_embeddings"))
    return EMBEDDING[arch] if tied else None


def config_from_shape(shape: dict, dropout: float = 0.0) -> ModelShapeConfig:
    """The model config a saved model_shape describes (kiln-generate, kiln-export)."""
    cls = ARCHS[arch_of(shape)]
    names = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in shape.items() if k in names}, dropout=dropout)
