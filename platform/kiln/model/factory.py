"""The model a config describes: kiln's GPT or Llama (the one place that picks between them)."""

from __future__ import annotations

import torch.nn as nn

from kiln.model.config import GPTConfig, LlamaConfig


def build_model(cfg: GPTConfig | LlamaConfig) -> nn.Module:
    if isinstance(cfg, LlamaConfig):
        from kiln.model.llama import Llama

        return Llama(cfg)
    from kiln.model.gpt import GPT

    return GPT(cfg)
