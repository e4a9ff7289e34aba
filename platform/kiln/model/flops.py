"""Model FLOPs per token and model FLOPs utilisation (MFU), counted as PaLM does (Chowdhery et al.
2022, appendix B), so that kiln's figures compare with the ones other projects publish.

    FLOPs per token = 6 N + 12 L C T      (forward and backward, one token of a T-token sequence)

- N: the parameters a token's matrix multiplies use: every parameter except the lookups (GPT-2's
  position embedding; an untied token embedding), with a tied LM head counted once, as the head
  (its other use, the token embedding, is a lookup too). Llama's rotary positions have no
  parameters; its grouped-query k/v projections count at their real (smaller) size. 6 N = 2 (multiply-add) x 3 (forward, and backward for activations
  and for weights).
- 12 L C T: attention's two T x T products (QK^T and AV) in each of L layers of width C, forward
  and backward, counted for the full T x T matrix although a causal mask needs only half of it
  (PaLM's and nanoGPT's convention).
- Not counted: softmax, norms, activations, the loss, the optimizer step, and recomputation under
  activation checkpointing (model FLOPs, not hardware FLOPs: recomputing lowers MFU).

MFU = tokens/s (all ranks) x FLOPs per token / (ranks x the device's peak). The peaks are dense
bf16 tensor-core rates (no sparsity), per device, from the vendors' data sheets; an fp32 run is
measured against the same peak. A CPU has no entry: there MFU is not reported unless
trainer.peak_tflops names a peak (and even then says little: CPU matmul rates vary with threads).
"""

from __future__ import annotations

from kiln.model.config import GPTConfig, LlamaConfig

# Dense bf16 TFLOP/s per device, matched against torch.cuda.get_device_name() (first match wins,
# so the more specific names come first).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),   # SXM
    ("H200", 989.0),
    ("H800", 989.0),
    ("GH200", 989.0),
    ("B200", 2250.0),
    ("A100", 312.0),
    ("A800", 312.0),
    ("L40S", 362.0),
)


def matmul_params(n_params: int, model: GPTConfig | LlamaConfig) -> int:
    """N of the formula: all parameters (a tied head once) but the embedding lookups."""
    if isinstance(model, LlamaConfig):
        return n_params if model.tie_embeddings else n_params - model.vocab_size * model.n_embd
    return n_params - model.block_size * model.n_embd


def flops_per_token(n_params: int, model: GPTConfig | LlamaConfig, seq_len: int) -> float:
    """Training FLOPs (forward + backward) per token at sequence length seq_len."""
    return 6.0 * matmul_params(n_params, model) + 12.0 * model.n_layer * model.n_embd * seq_len


def device_peak(device_name: str | None, override_tflops: float | None) -> tuple[float | None, str]:
    """(peak TFLOP/s of one device or None, where that figure comes from)."""
    if override_tflops is not None:
        return float(override_tflops), f"trainer.peak_tflops={override_tflops:g}"
    if device_name is None:
        return None, "no peak for a CPU (trainer.peak_tflops sets one)"
    for key, peak in PEAK_BF16_TFLOPS:
        if key.lower() in device_name.lower():
            return peak, f"{device_name}: {peak:g} TFLOP/s dense bf16"
    return None, f"no peak known for {device_name!r} (trainer.peak_tflops sets one)"


def mfu(tokens_per_s: float, flops_per_tok: float, world_size: int, peak_tflops: float) -> float:
    """The fraction of `world_size` devices' peak that `tokens_per_s` (summed over all ranks) uses."""
    return tokens_per_s * flops_per_tok / (world_size * peak_tflops * 1e12)
