"""A Llama-style decoder in one readable module (Touvron et al. 2023): RMSNorm, SwiGLU, rotary
positions, no biases, grouped-query attention.

Parameter names are Hugging Face's `LlamaForCausalLM`'s (model.layers.0.self_attn.q_proj.weight,
...) and the rotary embedding uses its "rotate_half" convention, so an export is a plain copy
(kiln.model.hf_llama). As kiln's GPT, the model knows nothing about DeepSpeed, Ray or data loading.
Shapes: B = batch, T = sequence length, C = n_embd, nh = n_head, nkv = n_kv_head,
hs = C // nh, F = ffn_hidden, V = vocab size.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from kiln.model.config import LlamaConfig
from kiln.model.groups import decay_groups
from kiln.model.loss import cross_entropy
from kiln.model.recompute import run_blocks


class RMSNorm(nn.Module):
    """x / rms(x) * weight (Zhang & Sennrich 2019): no mean, no bias. Normalised in fp32 and cast
    back before the gain, exactly as Hugging Face's LlamaRMSNorm (bf16 sums of squares lose too much)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def rope_cos_sin(head_dim: int, n_pos: int, theta: float, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of the rotary angles pos * theta^(-2i/hs), each (n_pos, hs), in fp32: the
    frequencies repeated for both halves of a head, the layout rotate_half expects."""
    arange = torch.arange(0, head_dim, 2, dtype=torch.float, device=device)
    inv_freq = 1.0 / (theta ** (arange / head_dim))  # (hs/2,)
    freqs = torch.arange(n_pos, dtype=torch.float, device=device)[:, None] * inv_freq[None, :]  # (n_pos, hs/2)
    emb = torch.cat((freqs, freqs), dim=-1)  # (n_pos, hs)
    return emb.cos(), emb.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """(x1, x2) -> (-x2, x1) over the two halves of the last dim: dim i is paired with i + hs/2
    (Hugging Face's convention, not the interleaved pairs (2i, 2i+1) of Meta's original code)."""
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate (B, heads, T, hs) queries or keys by their position's angles; cos, sin: (T, hs)."""
    return x * cos + rotate_half(x) * sin


class Attention(nn.Module):
    """Causal self-attention with grouped-query heads: nkv key/value heads, each shared by
    nh // nkv consecutive query heads (nkv = nh is plain multi-head attention)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        assert cfg.n_embd % cfg.n_head == 0, "n_embd must be divisible by n_head"
        assert cfg.n_head % cfg.n_kv_head == 0, "n_head must be divisible by n_kv_head"
        self.n_head, self.n_kv_head = cfg.n_head, cfg.n_kv_head
        self.head_dim = cfg.n_embd // cfg.n_head
        self.dropout = cfg.dropout
        self.q_proj = nn.Linear(cfg.n_embd, cfg.n_head * self.head_dim, bias=False)
        self.k_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.v_proj = nn.Linear(cfg.n_embd, cfg.n_kv_head * self.head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_head * self.head_dim, cfg.n_embd, bias=False)
        self.resid_dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, C = x.shape
        # (B, T, heads * hs) -> (B, heads, T, hs)
        q = self.q_proj(x).view(B, T, self.n_head, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, T, self.n_kv_head, self.head_dim).transpose(1, 2)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)  # positions enter q and k only
        if self.n_kv_head != self.n_head:
            # (B, nkv, T, hs) -> (B, nh, T, hs): kv head j serves query heads j*rep .. (j+1)*rep - 1.
            # Expanded rather than SDPA's enable_gqa, which not every fused kernel accepts.
            rep = self.n_head // self.n_kv_head
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        y = F.scaled_dot_product_attention(
            q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0
        )  # (B, nh, T, hs)
        y = y.transpose(1, 2).contiguous().view(B, T, C)  # re-assemble heads: (B, T, C)
        return self.resid_dropout(self.o_proj(y))


class MLP(nn.Module):
    """SwiGLU (Shazeer 2020): down(silu(gate(x)) * up(x)), C -> F -> C."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.up_proj = nn.Linear(cfg.n_embd, cfg.ffn_hidden, bias=False)
        self.down_proj = nn.Linear(cfg.ffn_hidden, cfg.n_embd, bias=False)
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.dropout(self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x)))


class DecoderLayer(nn.Module):
    """Pre-norm block: x + attn(norm(x)), then x + mlp(norm(x))."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        x = x + self.mlp(self.post_attention_layernorm(x))
        return x


class Llama(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.config = cfg
        self.model = nn.Module()  # Hugging Face's LlamaModel: the names below are its own
        self.model.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.n_embd)
        self.model.drop = nn.Dropout(cfg.dropout)
        self.model.layers = nn.ModuleList([DecoderLayer(cfg) for _ in range(cfg.n_layer)])
        self.model.norm = RMSNorm(cfg.n_embd, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.n_embd, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:  # one matrix for input and output (Press & Wolf 2017)
            self.lm_head.weight = self.model.embed_tokens.weight
        self.checkpointing = "none"  # trainer.activation_checkpointing (kiln.model.recompute)

        self.apply(self._init_weights)
        # GPT-2's scaled init for the projections into the residual stream, so its variance does
        # not grow with depth.
        for name, p in self.named_parameters():
            if name.endswith(("o_proj.weight", "down_proj.weight")):
                nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * cfg.n_layer))

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        elif isinstance(module, RMSNorm):
            nn.init.ones_(module.weight)

    def num_params(self) -> int:
        """All parameters, a tied LM head counted once."""
        return sum(p.numel() for p in self.parameters())

    def forward(
        self, idx: torch.Tensor, targets: torch.Tensor | None = None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(logits (B, T, V), None) without targets; (None, mean loss) with them: the loss's
        gradient takes the logits' place (kiln.model.loss), so they are not returned."""
        B, T = idx.shape
        if T > self.config.block_size:
            raise ValueError(f"sequence length {T} exceeds model.block_size={self.config.block_size}")
        x = self.model.drop(self.model.embed_tokens(idx))  # (B, T, C)
        # The angles are computed in fp32 on every call (a (T, hs) table, negligible) rather than
        # kept in a buffer, which a bf16 engine would round: then used in the compute dtype, as
        # Hugging Face does.
        cos, sin = rope_cos_sin(self.config.n_embd // self.config.n_head, T, self.config.rope_theta, idx.device)
        cos, sin = cos.to(x.dtype), sin.to(x.dtype)  # (T, hs)
        x = run_blocks(self.model.layers, x, self.checkpointing, cos, sin)
        logits = self.lm_head(self.model.norm(x))  # (B, T, V)
        if targets is None:
            return logits, None
        return None, cross_entropy(logits, targets)  # fp32 whatever the compute dtype

    def param_groups(self, weight_decay: float) -> list[dict]:
        """AdamW groups: decay matrices (2-D+), never the RMSNorm gains."""
        return decay_groups(self, weight_decay)
