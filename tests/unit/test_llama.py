import json
import math

import pytest
import torch

from kiln.model.config import LlamaConfig
from kiln.model.hf_llama import (expected_shapes, from_hf_state_dict, hf_config_problems, hf_config,
                                 shape_from_hf_config, tensor_problems, to_hf_state_dict)
from kiln.model.llama import Llama

V = 97


def cfg(**kw) -> LlamaConfig:
    base = dict(vocab_size=V, n_layer=2, n_head=4, n_kv_head=2, n_embd=64, ffn_hidden=160, block_size=32,
                rope_theta=500000.0)
    return LlamaConfig(**{**base, **kw})


def tiny(**kw) -> Llama:
    torch.manual_seed(0)
    return Llama(cfg(**kw))


def hf_model(shape: dict):
    import transformers

    hf_cfg = transformers.LlamaConfig(**hf_config(shape, 0.0, eos_id=0))
    hf_cfg._attn_implementation = "eager"  # the reference: plain matmuls and softmax
    return transformers.LlamaForCausalLM(hf_cfg).eval()


def load_hf(hf, sd: dict, tied: bool) -> None:
    missing, unexpected = hf.load_state_dict(sd, strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if tied else [])  # a tied head is the embedding
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()


def test_forward_shapes_and_initial_loss_near_uniform():
    m = tiny()
    x, y = torch.randint(0, V, (2, 3, 32))
    logits, loss = m(x, y)
    assert logits is None  # with targets the model returns the loss only (kiln.model.loss)
    assert m(x)[0].shape == (3, 32, V)
    assert abs(loss.item() - math.log(V)) < 0.1  # std-0.02 init: near-uniform predictions


def test_trains_with_dropout_and_builds_on_meta():
    m = tiny(dropout=0.1).train()
    x, y = torch.randint(0, V, (2, 2, 32))
    _, loss = m(x, y)
    loss.backward()
    assert torch.isfinite(loss) and m.model.embed_tokens.weight.grad is not None
    with torch.device("meta"):  # how sizes are counted without memory
        assert Llama(cfg()).num_params() == m.num_params()


def test_attention_is_causal():
    m = tiny().eval()
    x = torch.randint(0, V, (1, 32))
    y = x.clone()
    y[0, 20:] = (y[0, 20:] + 1) % V  # change only the future of position 19
    lx, _ = m(x)
    ly, _ = m(y)
    assert torch.allclose(lx[0, :20], ly[0, :20], atol=1e-6)
    assert not torch.allclose(lx[0, 20:], ly[0, 20:])


def test_sequence_longer_than_block_size_is_rejected():
    with pytest.raises(ValueError, match="model.block_size"):
        tiny()(torch.zeros(1, 33, dtype=torch.long))


@pytest.mark.parametrize("n_kv_head", [1, 2, 4])
def test_grouped_query_attention_shapes(n_kv_head):
    m = tiny(n_kv_head=n_kv_head)
    attn = m.model.layers[0].self_attn
    assert attn.q_proj.weight.shape == (64, 64)
    assert attn.k_proj.weight.shape == attn.v_proj.weight.shape == (n_kv_head * 16, 64)
    logits, _ = m(torch.randint(0, V, (2, 8)))
    assert logits.shape == (2, 8, V) and torch.isfinite(logits).all()


def test_tied_and_untied_heads():
    tied, untied = tiny(tie_embeddings=True), tiny(tie_embeddings=False)
    assert tied.lm_head.weight.data_ptr() == tied.model.embed_tokens.weight.data_ptr()
    assert untied.lm_head.weight.data_ptr() != untied.model.embed_tokens.weight.data_ptr()
    assert untied.num_params() - tied.num_params() == V * 64  # the tied head counted once
    assert tied.num_params() == sum(math.prod(s) for s in expected_shapes(tied.config.shape()).values())


@pytest.mark.parametrize("tie", [True, False])
def test_state_dict_is_hf_names_without_rotary_buffers(tie):
    m = tiny(tie_embeddings=tie)
    sd = m.state_dict()
    shape = m.config.shape()
    # A model's state dict lists a tied head under both names; expected_shapes (the stored
    # weights) has it only when it is a matrix of its own.
    assert set(sd) == set(expected_shapes(shape)) | {"lm_head.weight"}
    assert ("lm_head.weight" in expected_shapes(shape)) == (not tie)
    assert not any("rope" in k or "rotary" in k for k in sd)
    assert tensor_problems(sd, shape) is None
    assert tensor_problems(to_hf_state_dict(sd), shape) is None
    sd["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(64, 64)
    assert "k_proj" in tensor_problems(sd, shape)


def test_residual_projections_use_scaled_init():
    torch.manual_seed(0)
    m = Llama(cfg(n_layer=8, n_embd=128))
    layer = m.model.layers[0]
    assert abs(layer.mlp.up_proj.weight.std().item() - 0.02) < 0.002
    for w in (layer.mlp.down_proj.weight, layer.self_attn.o_proj.weight):
        assert abs(w.std().item() - 0.02 / math.sqrt(16)) < 0.001
    assert torch.equal(layer.input_layernorm.weight, torch.ones(128))


def test_weight_decay_groups_exclude_norm_gains():
    m = tiny(tie_embeddings=True)
    decay, no_decay = m.param_groups(0.1)
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert all(p.dim() >= 2 for p in decay["params"])
    norms = [p for n, p in m.named_parameters() if n.endswith("norm.weight")]
    assert len(no_decay["params"]) == len(norms) == 2 * 2 + 1
    assert sum(p.numel() for g in (decay, no_decay) for p in g["params"]) == m.num_params()


@pytest.mark.parametrize("tie", [True, False])
def test_logits_match_transformers(tie):
    m = tiny(tie_embeddings=tie).eval()
    shape = m.config.shape()
    hf_sd = to_hf_state_dict(m.state_dict())
    assert ("lm_head.weight" in hf_sd) == (not tie)
    hf = hf_model(shape)
    load_hf(hf, hf_sd, tie)
    torch.manual_seed(1)
    x = torch.randint(0, V, (3, 32))
    with torch.no_grad():
        ours, _ = m(x)
        theirs = hf(x).logits
    assert torch.allclose(ours, theirs, atol=1e-5, rtol=0), (ours - theirs).abs().max()


@pytest.mark.parametrize("tie", [True, False])
def test_hf_round_trip_gives_identical_outputs(tie):
    m = tiny(tie_embeddings=tie).eval()
    sd = from_hf_state_dict(to_hf_state_dict(m.state_dict()))
    assert tensor_problems(sd, m.config.shape()) is None
    fresh = Llama(m.config).eval()
    missing, unexpected = fresh.load_state_dict(sd, strict=False)
    assert unexpected == [] and missing == (["lm_head.weight"] if tie else [])
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        assert torch.equal(m(x)[0], fresh(x)[0])


def test_from_hf_state_dict_drops_rotary_buffers_and_adds_prefix():
    m = tiny()
    raw = {k.removeprefix("model."): v.bfloat16() for k, v in m.state_dict().items() if k != "lm_head.weight"}
    raw["layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    sd = from_hf_state_dict(raw)
    assert set(sd) == set(expected_shapes({**m.config.shape(), "tie_embeddings": True}))
    assert all(t.dtype == torch.float32 for t in sd.values())


def test_to_hf_state_dict_refuses_a_tied_head_that_differs():
    from kiln.errors import KilnError

    sd = tiny().state_dict()
    with pytest.raises(KilnError, match="lm_head"):
        to_hf_state_dict(sd, tied=True)
    out = to_hf_state_dict(sd, tied=False)
    assert out["lm_head.weight"].data_ptr() != sd["lm_head.weight"].data_ptr()  # copies, not views


@pytest.mark.parametrize("tie", [True, False])
def test_config_round_trip(tie):
    import transformers

    shape = cfg(tie_embeddings=tie).shape()
    hf_cfg = hf_config(shape, 0.0, eos_id=0)
    assert hf_config_problems(hf_cfg) == []
    assert shape_from_hf_config(hf_cfg) == shape
    # ... also after transformers rewrote it (transformers 5 keeps only rope_parameters).
    rewritten = transformers.LlamaConfig(**hf_cfg).to_dict()
    assert hf_config_problems(rewritten) == []
    assert shape_from_hf_config(rewritten) == shape


def test_hf_config_problems_flags_what_kiln_cannot_reproduce():
    ok = hf_config(cfg().shape(), 0.0, eos_id=0)
    cases = {
        "hidden_act": {"hidden_act": "gelu"},
        "attention_bias": {"attention_bias": True},
        "mlp_bias": {"mlp_bias": True},
        "rope_scaling": {"rope_scaling": {"rope_type": "llama3", "factor": 8.0}},
        "rope_parameters": {"rope_parameters": {"rope_type": "linear", "factor": 2.0, "rope_theta": 1e4}},
        "head_dim": {"head_dim": 32},
        "num_key_value_heads": {"num_key_value_heads": 3},
    }
    for key, change in cases.items():
        problems = hf_config_problems({**ok, **change})
        assert len(problems) == 1 and key in problems[0], (key, problems)


@pytest.mark.parametrize("tie", [True, False])
def test_save_pretrained_directory_loads_in_transformers(tmp_path, tie):
    import transformers
    from safetensors.torch import save_file

    m = tiny(tie_embeddings=tie).eval()
    shape = m.config.shape()
    # What an export writes: kiln's config.json and weights, no transformers in the writing.
    (tmp_path / "config.json").write_text(json.dumps(hf_config(shape, 0.0, eos_id=0)))
    save_file(to_hf_state_dict(m.state_dict()), str(tmp_path / "model.safetensors"), metadata={"format": "pt"})
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="sdpa").eval()
    assert hf.config.rope_parameters["rope_theta"] == 500000.0
    # ... and transformers' own save of it reads back as the same kiln model.
    hf.save_pretrained(tmp_path / "resaved")
    resaved = json.loads((tmp_path / "resaved" / "config.json").read_text())
    assert shape_from_hf_config(resaved) == shape
    from safetensors.torch import load_file

    sd = from_hf_state_dict(load_file(str(tmp_path / "resaved" / "model.safetensors")))
    assert tensor_problems(sd, shape) is None
    x = torch.randint(0, V, (2, 32))
    with torch.no_grad():
        assert torch.allclose(m(x)[0], hf(x).logits, atol=1e-5, rtol=0)
    # In bf16 too the two are the same computation: RMSNorm normalises in fp32, and the rotary
    # cos/sin are computed in fp32 and then rounded (transformers loading in bf16 keeps its
    # frequencies fp32; kiln computes its cos/sin in fp32 at every call).
    hf16 = transformers.LlamaForCausalLM.from_pretrained(tmp_path, dtype=torch.bfloat16).eval()
    with torch.no_grad():
        assert torch.equal(m.to(torch.bfloat16)(x)[0], hf16(x).logits)
