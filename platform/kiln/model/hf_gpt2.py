"""kiln's GPT <-> Hugging Face GPT-2 (`transformers.GPT2LMHeadModel`): a state-dict adapter.

The two models are the same network under the same parameter names (transformer.wte.weight,
transformer.h.0.attn.c_attn.weight, ...), with two differences in the state dict:

- the four projection matrices (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj) are nn.Linear
  (out, in) in kiln and Conv1D (in, out) in GPT-2: transposed both ways;
- the LM head is tied to the token embedding: kiln lists it as lm_head.weight, GPT-2 stores it
  once, as transformer.wte.weight.

Here: both directions of that mapping (`to_hf_state_dict`, `from_hf_state_dict`), GPT-2's
config.json for a kiln model shape (`hf_config`) and the shape back from one
(`hf_config_problems`, `shape_from_hf_config`), and the tensors a kiln GPT of a shape has
(`expected_shapes`, `tensor_problems`). Files and user-facing errors about them belong to the
callers (kiln.checkpoint.weights reads exports, kiln.checkpoint.export writes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.errors import ConfigError, KilnError

if TYPE_CHECKING:  # the tensors are the caller's: the config half of this module needs no torch
    import torch

# nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out): these four are transposed.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older GPT-2 checkpoints carry (the causal mask), not weights: h.N.attn.bias, ...
HF_BUFFERS = {("attn", "bias"), ("attn", "masked_bias"), ("crossattention", "bias"),
              ("crossattention", "masked_bias")}
# GELU with the tanh approximation, as kiln's MLP uses, under the names transformers knows.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5


def hf_config(shape: dict, dropout: float, eos_id: int) -> dict:
    """The config.json of a GPT2LMHeadModel equal to a kiln GPT of `shape`."""
    return {
        "architectures": ["GPT2LMHeadModel"],
        "model_type": "gpt2",
        "vocab_size": shape["vocab_size"],
        "n_positions": shape["block_size"],
        "n_ctx": shape["block_size"],
        "n_embd": shape["n_embd"],
        "n_layer": shape["n_layer"],
        "n_head": shape["n_head"],
        "n_inner": None,  # 4 * n_embd, as kiln's MLP
        "activation_function": "gelu_new",  # GELU, tanh approximation
        "layer_norm_epsilon": LAYER_NORM_EPS,
        "resid_pdrop": dropout,
        "embd_pdrop": dropout,
        "attn_pdrop": dropout,
        "initializer_range": 0.02,
        "scale_attn_weights": True,  # 1/sqrt(head size), as scaled_dot_product_attention
        "scale_attn_by_inverse_layer_idx": False,
        "reorder_and_upcast_attn": False,
        "tie_word_embeddings": True,
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def check_exportable(shape: dict) -> None:
    """GPT-2 has no switch for what kiln can turn off."""
    if not shape.get("bias", True):
        raise ConfigError("model.bias", "this checkpoint was trained with model.bias=false; Hugging Face "
                          "GPT-2 always has biases in its LayerNorms and projections, so it cannot express "
                          "this model", "export only models trained with model.bias=true, or load the "
                          "checkpoint with kiln (kiln-generate, model.init_from)")


def hf_config_problems(cfg: dict) -> list[str]:
    """What in a GPT-2 config.json kiln's GPT cannot reproduce (empty when it can all be)."""
    n_embd = cfg.get("n_embd", 768)
    unsupported = []
    if cfg.get("activation_function", "gelu_new") not in TANH_GELU:
        unsupported.append(f"activation_function={cfg.get('activation_function')!r} (kiln: gelu_new)")
    if cfg.get("n_inner") not in (None, 4 * n_embd):
        unsupported.append(f"n_inner={cfg.get('n_inner')} (kiln: 4 * n_embd = {4 * n_embd})")
    if abs(float(cfg.get("layer_norm_epsilon", LAYER_NORM_EPS)) - LAYER_NORM_EPS) > 1e-12:
        unsupported.append(f"layer_norm_epsilon={cfg.get('layer_norm_epsilon')} (kiln: 1e-5)")
    if not cfg.get("scale_attn_weights", True) or cfg.get("scale_attn_by_inverse_layer_idx", False):
        unsupported.append("attention scaling other than 1/sqrt(head size)")
    if not cfg.get("tie_word_embeddings", True):
        unsupported.append("tie_word_embeddings=false (kiln ties the LM head to wte)")
    if cfg.get("add_cross_attention", False):
        unsupported.append("add_cross_attention=true")
    return unsupported


def shape_from_hf_config(cfg: dict) -> dict:
    """The kiln model shape of a GPT-2 config.json (transformers' defaults for missing keys);
    meaningful when `hf_config_problems(cfg)` is empty."""
    return {"arch": "gpt2", "n_layer": cfg.get("n_layer", 12), "n_head": cfg.get("n_head", 12), "n_embd": cfg.get("n_embd", 768),
            "block_size": cfg.get("n_positions", 1024), "vocab_size": cfg.get("vocab_size", 50257),
            "bias": True}


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kiln GPT weights -> GPT-2 layout: Conv1D matrices transposed, the tied LM head dropped."""
    wte = sd["transformer.wte.weight"]
    head = sd.get("lm_head.weight")
    if head is not None and head is not wte and not head.equal(wte):
        raise KilnError("the checkpoint's lm_head.weight differs from transformer.wte.weight; kiln ties "
                        "them, and GPT-2 stores them once: this is not a kiln GPT checkpoint")
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue
        t = t.detach().to("cpu").float()
        out[name] = (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous()
    return out


def from_hf_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """GPT-2 weights (a GPT2LMHeadModel's, or a bare GPT2Model's without the transformer. prefix)
    -> kiln's layout, fp32: Conv1D matrices transposed, buffers dropped. An lm_head.weight in
    `raw` is kept as it is (the caller checks that it equals the token embedding, and ties it)."""
    if not any(k.startswith("transformer.") for k in raw):  # a GPT2Model (no LM head) save
        raw = {f"transformer.{k}" if not k.startswith("lm_head.") else k: v for k, v in raw.items()}
    sd: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if tuple(name.split(".")[-2:]) in HF_BUFFERS:
            continue
        t = t.float()
        sd[name] = (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous()
    return sd


def expected_shapes(shape: dict) -> dict[str, tuple]:
    """The tensors of a kiln GPT of `shape` (kiln layout, without lm_head) and their shapes."""
    C, V, T = shape["n_embd"], shape["vocab_size"], shape["block_size"]
    exp = {"transformer.wte.weight": (V, C), "transformer.wpe.weight": (T, C),
           "transformer.ln_f.weight": (C,), "transformer.ln_f.bias": (C,)}
    for i in range(shape["n_layer"]):
        h = f"transformer.h.{i}."
        exp.update({
            h + "ln_1.weight": (C,), h + "ln_1.bias": (C,), h + "ln_2.weight": (C,), h + "ln_2.bias": (C,),
            h + "attn.c_attn.weight": (3 * C, C), h + "attn.c_attn.bias": (3 * C,),
            h + "attn.c_proj.weight": (C, C), h + "attn.c_proj.bias": (C,),
            h + "mlp.c_fc.weight": (4 * C, C), h + "mlp.c_fc.bias": (4 * C,),
            h + "mlp.c_proj.weight": (C, 4 * C), h + "mlp.c_proj.bias": (C,),
        })
    return exp


def tensor_problems(sd: dict, shape: dict) -> str | None:
    """What keeps `sd` (kiln layout, without lm_head) from being a kiln GPT of `shape`, or None."""
    return shape_problems(sd, expected_shapes(shape))


def shape_problems(sd: dict, exp: dict[str, tuple]) -> str | None:
    """The tensors `sd` lacks, has too many of, or has in other shapes than `exp`; None if none."""
    missing = sorted(set(exp) - set(sd))
    unexpected = sorted(set(sd) - set(exp))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {exp[k]})" for k in exp if k in sd and tuple(sd[k].shape) != exp[k]]
    if not (missing or unexpected or wrong):
        return None
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"
