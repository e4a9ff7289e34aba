"""Model FLOPs per token (PaLM's count) and the peak table MFU is measured against."""

import pytest

from kiln.model.config import GPTConfig
from kiln.model.flops import device_peak, flops_per_token, matmul_params, mfu


def test_gpt2_small_flops_per_token_is_palms_count():
    """GPT-2 124M: 124,439,808 parameters (tied head once); N drops the 1024 x 768 position table."""
    small = GPTConfig(vocab_size=50257, n_layer=12, n_head=12, n_embd=768, block_size=1024)
    n = matmul_params(124_439_808, small)
    assert n == 124_439_808 - 1024 * 768
    assert flops_per_token(124_439_808, small, 1024) == 6 * n + 12 * 12 * 768 * 1024
    # a shorter sequence costs less attention, the same 6N
    assert flops_per_token(124_439_808, small, 512) == 6 * n + 12 * 12 * 768 * 512


def test_matmul_params_are_the_models_own_minus_the_position_table():
    from kiln.model.gpt import GPT

    cfg = GPTConfig(vocab_size=257, n_layer=2, n_head=4, n_embd=64, block_size=128)
    model = GPT(cfg)
    used = sum(p.numel() for name, p in model.named_parameters() if name != "transformer.wpe.weight")
    assert matmul_params(model.num_params(), cfg) == used


@pytest.mark.parametrize("name, peak", [
    ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H100 PCIe", 756.0), ("NVIDIA H200", 989.0),
    ("NVIDIA A100-SXM4-80GB", 312.0), ("NVIDIA B200", 2250.0), ("Tesla T4", None), (None, None)])
def test_device_peaks(name, peak):
    got, basis = device_peak(name, None)
    assert got == peak
    if name is None:
        assert "CPU" in basis and "trainer.peak_tflops" in basis
    elif peak is None:
        assert name in basis and "trainer.peak_tflops" in basis


def test_peak_override_and_mfu_counts_every_device():
    assert device_peak("NVIDIA H100 80GB HBM3", 500.0) == (500.0, "trainer.peak_tflops=500")
    # 8 devices at 989 TFLOP/s; 1e6 tokens/s of 4e8 FLOPs each is 4e14 FLOP/s of 7.912e15
    assert mfu(1e6, 4e8, 8, 989.0) == pytest.approx(4e14 / (8 * 989e12))
    assert mfu(1e6, 4e8, 1, 989.0) == pytest.approx(8 * mfu(1e6, 4e8, 8, 989.0))


@pytest.mark.parametrize("tie", [True, False])
def test_llama_matmul_params_drop_only_the_input_lookup(tie):
    import torch

    from kiln.model.config import LlamaConfig
    from kiln.model.llama import Llama

    cfg = LlamaConfig(vocab_size=97, n_layer=2, n_head=4, n_embd=64, block_size=32, n_kv_head=2, ffn_hidden=160,
                      tie_embeddings=tie)
    model = Llama(cfg)
    n = model.num_params()
    # tied: the one matrix counts once, as the head; untied: the input embedding is a lookup.
    used = n if tie else sum(p.numel() for name, p in model.named_parameters() if name != "model.embed_tokens.weight")
    assert matmul_params(n, cfg) == used
    assert flops_per_token(n, cfg, 32) == 6 * used + 12 * 2 * 64 * 32
    with torch.device("meta"):
        big = Llama(LlamaConfig(vocab_size=50304, n_layer=16, n_head=32, n_embd=2048, block_size=2048, n_kv_head=8,
                                ffn_hidden=8192))
    assert 1.15e9 < big.num_params() < 1.25e9  # llama-1b: "about 1.2B"
