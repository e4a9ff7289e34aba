"""kiln's Llama <-> Hugging Face Llama (`transformers.LlamaForCausalLM`): a state-dict adapter.

kiln's Llama (kiln.model.llama) uses Hugging Face's parameter names and its rotary convention
(rotate_half, so q_proj and k_proj need no permutation), hence the mapping is nearly a copy:

- a tied LM head is one matrix under two names in kiln (model.embed_tokens.weight and
  lm_head.weight); the export stores it once, as model.embed_tokens.weight, and says
  tie_word_embeddings=true. An untied head is copied like any other weight;
- older Hugging Face checkpoints carry the rotary inverse frequencies (...rotary_emb.inv_freq):
  buffers, not weights, dropped on the way in.

Here: both directions of that mapping (`to_hf_state_dict`, `from_hf_state_dict`), Llama's
config.json for a kiln model shape (`hf_config`) and the shape back from one
(`hf_config_problems`, `shape_from_hf_config`), and the tensors a kiln Llama of a shape has
(`expected_shapes`, `tensor_problems`). Files and user-facing errors about them belong to the
callers (kiln.checkpoint.weights reads exports, kiln.checkpoint.export writes them).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from kiln.errors import KilnError
from kiln.model.hf_gpt2 import shape_problems

if TYPE_CHECKING:  # the tensors are the caller's: the config half of this module needs no torch
    import torch

EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
# transformers' LlamaConfig defaults, for keys a config.json leaves out.
HF_DEFAULTS = {"vocab_size": 32000, "hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 32,
               "num_attention_heads": 32, "max_position_embeddings": 2048, "rms_norm_eps": 1e-6,
               "rope_theta": 10000.0, "tie_word_embeddings": False}


def hf_config(shape: dict, dropout: float, eos_id: int) -> dict:
    """The config.json of a LlamaForCausalLM equal to a kiln Llama of `shape`."""
    theta = float(shape["rope_theta"])
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": shape["vocab_size"],
        "hidden_size": shape["n_embd"],
        "intermediate_size": shape["ffn_hidden"],
        "num_hidden_layers": shape["n_layer"],
        "num_attention_heads": shape["n_head"],
        "num_key_value_heads": shape["n_kv_head"],
        "head_dim": shape["n_embd"] // shape["n_head"],
        "max_position_embeddings": shape["block_size"],
        "hidden_act": "silu",  # SwiGLU's gate
        "rms_norm_eps": shape["norm_eps"],
        # Plain rotary positions, said both ways: transformers 5 reads rope_parameters, 4.x (and
        # most other Llama readers) rope_theta and rope_scaling.
        "rope_parameters": {"rope_type": "default", "rope_theta": theta},
        "rope_theta": theta,
        "rope_scaling": None,
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": dropout,
        "pretraining_tp": 1,
        "initializer_range": 0.02,
        "tie_word_embeddings": bool(shape["tie_embeddings"]),
        "bos_token_id": eos_id,
        "eos_token_id": eos_id,
        "use_cache": True,
        "torch_dtype": "float32",
    }


def check_exportable(shape: dict) -> None:
    """Every kiln Llama is a Hugging Face Llama: nothing to refuse (hf_gpt2 has a case)."""


def _rope_type(rope: object) -> str | None:
    """A rope_scaling / rope_parameters entry's rope type (None: absent, or no scaling)."""
    if not rope:
        return None
    if not isinstance(rope, dict):
        return repr(rope)
    kind = rope.get("rope_type", rope.get("type", "default"))
    return None if kind == "default" else str(kind)


def hf_config_problems(cfg: dict) -> list[str]:
    """What in a Llama config.json kiln's Llama cannot reproduce (empty when it can all be)."""
    hidden = cfg.get("hidden_size", HF_DEFAULTS["hidden_size"])
    heads = cfg.get("num_attention_heads", HF_DEFAULTS["num_attention_heads"])
    kv_heads = cfg.get("num_key_value_heads") or heads
    unsupported = []
    if cfg.get("hidden_act", "silu") != "silu":
        unsupported.append(f"hidden_act={cfg.get('hidden_act')!r} (kiln: silu, SwiGLU)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key, False):
            unsupported.append(f"{key}=true (kiln's Llama has no biases)")
    for key in ("rope_scaling", "rope_parameters"):
        kind = _rope_type(cfg.get(key))
        if kind is not None:
            unsupported.append(f"{key} of type {kind} (kiln: plain rotary positions, rope_type default)")
    if hidden % heads:
        unsupported.append(f"hidden_size={hidden} not divisible by num_attention_heads={heads}")
    elif cfg.get("head_dim") not in (None, hidden // heads):
        unsupported.append(f"head_dim={cfg['head_dim']} (kiln: hidden_size / num_attention_heads = {hidden // heads})")
    if heads % kv_heads:
        unsupported.append(f"num_attention_heads={heads} not divisible by num_key_value_heads={kv_heads}")
    return unsupported


def shape_from_hf_config(cfg: dict) -> dict:
    """The kiln model shape of a Llama config.json (transformers' defaults for missing keys);
    meaningful when `hf_config_problems(cfg)` is empty."""
    def get(key):
        return cfg.get(key, HF_DEFAULTS[key])

    rope = cfg.get("rope_parameters")
    theta = rope.get("rope_theta") if isinstance(rope, dict) else None
    heads = get("num_attention_heads")
    return {"arch": "llama", "n_layer": get("num_hidden_layers"), "n_head": heads,
            "n_kv_head": cfg.get("num_key_value_heads") or heads, "n_embd": get("hidden_size"),
            "ffn_hidden": get("intermediate_size"), "block_size": get("max_position_embeddings"),
            "vocab_size": get("vocab_size"), "tie_embeddings": bool(get("tie_word_embeddings")),
            "rope_theta": float(theta if theta is not None else get("rope_theta")),
            "norm_eps": float(get("rms_norm_eps"))}


def to_hf_state_dict(sd: dict[str, torch.Tensor], tied: bool | None = None) -> dict[str, torch.Tensor]:
    """kiln Llama weights -> Hugging Face's layout: fp32 CPU contiguous copies, a tied LM head
    dropped. `tied` is the shape's tie_embeddings; None: tied when lm_head.weight is absent or
    equal to the token embedding."""
    emb, head = sd[EMBEDDING], sd.get(HEAD)
    same = head is None or head is emb or head.equal(emb)
    if tied is None:
        tied = same
    if tied and not same:
        raise KilnError(f"the checkpoint's {HEAD} differs from {EMBEDDING}, but its model ties them")
    if not tied and head is None:
        raise KilnError(f"the checkpoint has no {HEAD}, but its model has an untied LM head")
    # copy=True: a CPU fp32 weight would otherwise be returned as itself, still the model's.
    return {name: t.detach().to("cpu", copy=True).float().contiguous()
            for name, t in sd.items() if not (tied and name == HEAD)}


def from_hf_state_dict(raw: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Llama weights (a LlamaForCausalLM's, or a bare LlamaModel's without the model. prefix)
    -> kiln's layout, fp32, rotary buffers dropped. An lm_head.weight in `raw` is kept as it is
    (for a tied model the caller checks that it equals the token embedding, and ties it)."""
    if not any(k.startswith("model.") for k in raw):  # a LlamaModel (no LM head) save
        raw = {k if k.startswith("lm_head.") else f"model.{k}": v for k, v in raw.items()}
    return {name: t.float().contiguous() for name, t in raw.items() if ".rotary_emb." not in name}


def expected_shapes(shape: dict) -> dict[str, tuple]:
    """The tensors of a kiln Llama of `shape` (kiln layout) and their shapes; lm_head.weight only
    when the head is untied (a tied one is the token embedding)."""
    C, V, Fh = shape["n_embd"], shape["vocab_size"], shape["ffn_hidden"]
    hs = C // shape["n_head"]
    q, kv = shape["n_head"] * hs, shape["n_kv_head"] * hs
    exp = {EMBEDDING: (V, C), "model.norm.weight": (C,)}
    if not shape["tie_embeddings"]:
        exp[HEAD] = (V, C)
    for i in range(shape["n_layer"]):
        h = f"model.layers.{i}."
        exp.update({
            h + "input_layernorm.weight": (C,), h + "post_attention_layernorm.weight": (C,),
            h + "self_attn.q_proj.weight": (q, C), h + "self_attn.k_proj.weight": (kv, C),
            h + "self_attn.v_proj.weight": (kv, C), h + "self_attn.o_proj.weight": (C, q),
            h + "mlp.gate_proj.weight": (Fh, C), h + "mlp.up_proj.weight": (Fh, C),
            h + "mlp.down_proj.weight": (C, Fh),
        })
    return exp


def tensor_problems(sd: dict, shape: dict) -> str | None:
    """What keeps `sd` (kiln layout) from being a kiln Llama of `shape`, or None. A tied head may
    be in `sd` (a model's state_dict() lists it) or not (an export's)."""
    exp = expected_shapes(shape)
    if shape["tie_embeddings"] and HEAD in sd:
        exp[HEAD] = exp[EMBEDDING]
    return shape_problems(sd, exp)
