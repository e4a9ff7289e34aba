import math

import pytest
import torch

from kiln.model.gpt import GPT, GPTConfig

# Parameter counts of the released GPT-2 checkpoints (tied LM head counted once).
GPT2_SIZES = {
    "gpt2-small": (12, 12, 768, 124_439_808),
    "gpt2-medium": (24, 16, 1024, 354_823_168),
    "gpt2-large": (36, 20, 1280, 774_030_080),
    "gpt2-xl": (48, 25, 1600, 1_557_611_200),
}


@pytest.mark.parametrize("name", list(GPT2_SIZES))
def test_gpt2_parameter_counts_from_configs(name, compose):
    n_layer, n_head, n_embd, expected = GPT2_SIZES[name]
    m = compose([f"model={name}", "model.pad_vocab_multiple=1"]).model
    assert (m.n_layer, m.n_head, m.n_embd, m.block_size, m.vocab_size) == (
        n_layer, n_head, n_embd, 1024, 50257)
    with torch.device("meta"):  # no memory for 1.5B parameters needed to count them
        model = GPT(m.build(0))
    assert model.num_params() == expected


def tiny(vocab=257, **kw) -> GPT:
    torch.manual_seed(0)
    return GPT(GPTConfig(vocab_size=vocab, n_layer=2, n_head=4, n_embd=32, block_size=16, **kw))


def test_head_is_tied_to_token_embedding():
    m = tiny()
    assert m.lm_head.weight.data_ptr() == m.transformer.wte.weight.data_ptr()


def test_forward_shapes_and_initial_loss_near_uniform():
    m = tiny()
    x, y = torch.randint(0, 257, (2, 3, 16))
    logits, loss = m(x, y)
    assert logits is None  # with targets the model returns the loss only (kiln.model.loss)
    assert m(x)[0].shape == (3, 16, 257)
    # GPT-2 init (std 0.02) gives near-uniform predictions: loss ~ ln(V).
    assert abs(loss.item() - math.log(257)) < 0.1


def test_attention_is_causal():
    m = tiny().eval()
    x = torch.randint(0, 257, (1, 16))
    y = x.clone()
    y[0, 10:] = (y[0, 10:] + 1) % 257  # change only the future of position 9
    lx, _ = m(x)
    ly, _ = m(y)
    assert torch.allclose(lx[0, :10], ly[0, :10], atol=1e-6)
    assert not torch.allclose(lx[0, 10:], ly[0, 10:])


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocab_size=257, n_layer=8, n_head=4, n_embd=128, block_size=16))
    proj = m.transformer.h[0].mlp.c_proj.weight.std().item()
    fc = m.transformer.h[0].mlp.c_fc.weight.std().item()
    assert abs(fc - 0.02) < 0.002
    assert abs(proj - 0.02 / math.sqrt(16)) < 0.001


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="block_size"):
        tiny()(torch.zeros(1, 17, dtype=torch.long))


def test_weight_decay_groups_exclude_biases_and_norms():
    m = tiny()
    decay, no_decay = m.param_groups(0.1)
    assert all(p.dim() >= 2 for p in decay["params"])
    assert all(p.dim() == 1 for p in no_decay["params"])
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == m.num_params()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_chunked_loss_equals_fp32_cross_entropy(dtype, monkeypatch):
    """kiln.model.loss: the same loss and gradient as F.cross_entropy on fp32 logits, chunk by
    chunk (a chunk smaller than the batch here), the gradient kept in the logits' dtype."""
    import torch.nn.functional as F

    import kiln.model.loss as L

    monkeypatch.setattr(L, "CHUNK_LOGITS", 53 * 5)  # 5 rows per chunk, 37 rows: 8 chunks
    torch.manual_seed(0)
    x = torch.randn(37, 53, dtype=dtype, requires_grad=True)
    t = torch.randint(0, 53, (37,))
    ours = L.cross_entropy(x, t)
    (ours * 3).backward()  # a scaled loss (fp16 loss scaling) scales the gradient
    g_ours, x.grad = x.grad.clone(), None
    ref = F.cross_entropy(x.float(), t)
    (ref * 3).backward()
    assert ours.dtype == torch.float32 and g_ours.dtype == dtype
    assert abs(ours.item() - ref.item()) < 1e-5
    torch.testing.assert_close(g_ours.float(), x.grad.float(), atol=1e-7 if dtype == torch.float32 else 1e-3, rtol=0.01)
    with torch.no_grad():  # evaluation: no gradient buffer
        assert abs(L.cross_entropy(x, t).item() - ref.item()) < 1e-5


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
@pytest.mark.parametrize("mode", ["selective", "full"])
def test_activation_checkpointing_gives_the_same_gradients(arch, mode):
    """Recomputed blocks (dropout included: checkpoint replays the RNG) give the gradients of
    stored activations."""
    from kiln.model.config import LlamaConfig
    from kiln.model.factory import build_model

    cfg = (GPTConfig(vocab_size=97, n_layer=3, n_head=4, n_embd=32, block_size=16, dropout=0.1) if arch == "gpt2" else
           LlamaConfig(vocab_size=97, n_layer=3, n_head=4, n_embd=32, block_size=16, n_kv_head=2, ffn_hidden=64,
                       dropout=0.1))
    torch.manual_seed(0)
    model = build_model(cfg)
    x, y = torch.randint(0, 97, (2, 4, 16))
    grads = {}
    for m in ("none", mode):
        model.checkpointing = m
        model.zero_grad()
        torch.manual_seed(1)
        model(x, y)[1].backward()
        grads[m] = [p.grad.clone() for p in model.parameters()]
    for a, b in zip(grads["none"], grads[mode]):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-5)
