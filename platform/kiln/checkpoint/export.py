"""kiln checkpoints <-> Hugging Face GPT-2 directories (`kiln-export`, `model.init_from`).

An export directory holds:

    model.safetensors      the weights, fp32, in GPT-2's layout: the same names as kiln's GPT
                           (transformer.wte.weight, transformer.h.0.attn.c_attn.weight, ...) with the
                           four projection matrices (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
                           transposed to GPT-2's Conv1D orientation (in, out); the LM head is tied to
                           the token embedding and stored once, as transformer.wte.weight
    config.json            a GPT2Config: `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it
    tokenizer.json         the tokenizer the training data was written with, for `tokenizers` and
    tokenizer_config.json  `transformers.AutoTokenizer` (for the byte tokenizer: an equivalent
                           byte-level BPE without merges, built here; see BYTE_TOKENIZER_NOTE)
    kiln_tokenizer.json    kiln's own description of that tokenizer (its manifest entry): what
                           kiln-generate uses, exact for every tokenizer type
    kiln_export.json       the original model shape, step, tokens and source checkpoint

`read_export(path, shape)` is the inverse: a kiln state dict from such a directory (or from any
GPT-2 directory `save_pretrained` wrote), checked against the model shape of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

import torch

from kiln.errors import ConfigError, DataError, KilnError

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
EXPORT_FILE = "kiln_export.json"
KILN_TOKENIZER_FILE = "kiln_tokenizer.json"
HF_TOKENIZER_FILE = "tokenizer.json"
HF_TOKENIZER_CONFIG = "tokenizer_config.json"
EXPORT_FORMAT = 1

# nn.Linear stores (out, in); GPT-2's Conv1D stores (in, out): these four are transposed.
CONV1D_SUFFIXES = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Buffers older GPT-2 checkpoints carry (the causal mask), not weights: h.N.attn.bias, ...
HF_BUFFERS = {("attn", "bias"), ("attn", "masked_bias"), ("crossattention", "bias"),
              ("crossattention", "masked_bias")}
# GELU with the tanh approximation, as kiln's MLP uses, under the names transformers knows.
TANH_GELU = ("gelu_new", "gelu_pytorch_tanh")
LAYER_NORM_EPS = 1e-5

BYTE_TOKENIZER_NOTE = (
    "kiln's byte tokenizer: token i < 256 is the UTF-8 byte i, token 256 is the end of a document. "
    "Hugging Face has no stock tokenizer with these 257 ids (ByT5's byte tokenizer shifts every byte "
    "by 3 special tokens, so its ids do not fit this model). kiln-export therefore also writes "
    "tokenizer.json: a byte-level BPE with no merges, built locally with the `tokenizers` library, "
    "whose ids are exactly these (AutoTokenizer.from_pretrained(export_dir) loads it). Without it: "
    "ids = list(text.encode('utf-8')); text = bytes(i for i in ids if i < 256).decode('utf-8', "
    "errors='replace'). For a subword vocabulary, build the data with `kiln-data --tokenizer bpe`."
)


# ---------------------------------------------------------------------------------------------
# Checkpoints: which one, which tokenizer


def resolve_checkpoint(path: str | os.PathLike) -> Path:
    """A step_* checkpoint directory, or a run directory (its newest complete checkpoint)."""
    from kiln.checkpoint.store import complete_checkpoints

    p = Path(path).expanduser().resolve()
    if (p / "kiln" / "meta.json").is_file():
        return p
    found = complete_checkpoints(p)
    if found:
        return found[-1]
    raise DataError(f"{p} is not a kiln checkpoint (no kiln/meta.json) nor a run directory with one; "
                    f"pass a <storage_path>/<run_name>/step_* directory")


def checkpoint_tokenizer(meta: dict):
    """The tokenizer the run's data was written with: from the manifest of the dataset the
    checkpoint's config names (data.path, or the first data.mixture source), as training loads it."""
    from kiln.data.plan import load_source_tokenizer
    from kiln.data.sources import resolve_sources

    data = meta["config"]["data"]
    try:
        sources = resolve_sources(data)
        return load_source_tokenizer(sources[0], data["cache_dir"])
    except (KilnError, OSError) as e:
        where = data.get("path") or [m.get("path") for m in data.get("mixture", [])]
        raise DataError(f"cannot load the tokenizer of the data this checkpoint was trained on ({where}): "
                        f"{e}\n  fix: restore that dataset directory (its manifest.json, and tokenizer.json "
                        f"unless it is byte-tokenized), or pass --tokenizer byte|PATH/tokenizer.json") from e


def tokenizer_from_option(spec: str):
    """--tokenizer: `byte`, or the path of a tokenizer.json."""
    from kiln.data.tokenizer import build_tokenizer

    return build_tokenizer(spec)


# ---------------------------------------------------------------------------------------------
# kiln <-> GPT-2 weights


def gpt2_config(shape: dict, dropout: float, eos_id: int) -> dict:
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


def to_hf_state_dict(sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """kiln GPT weights -> GPT-2 layout: Conv1D matrices transposed, the tied LM head dropped."""
    wte = sd["transformer.wte.weight"]
    head = sd.get("lm_head.weight")
    if head is not None and head is not wte and not torch.equal(head, wte):
        raise KilnError("the checkpoint's lm_head.weight differs from transformer.wte.weight; kiln ties "
                        "them, and GPT-2 stores them once: this is not a kiln GPT checkpoint")
    out = {}
    for name, t in sd.items():
        if name == "lm_head.weight":
            continue
        t = t.detach().to("cpu", torch.float32)
        out[name] = (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous()
    return out


def _shape_from_hf_config(cfg: dict, where: Path) -> dict:
    if cfg.get("model_type") != "gpt2":
        raise ConfigError("model.init_from", f"{where}/{CONFIG_FILE} has model_type "
                          f"{cfg.get('model_type')!r}; kiln loads GPT-2 models only", "use a kiln-export "
                          "directory or a GPT-2 save_pretrained directory")
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
    if unsupported:
        raise ConfigError("model.init_from", f"{where}/{CONFIG_FILE} describes a GPT-2 that kiln's GPT "
                          f"cannot reproduce: {'; '.join(unsupported)}", "use a kiln-export directory")
    return {"n_layer": cfg.get("n_layer", 12), "n_head": cfg.get("n_head", 12), "n_embd": n_embd,
            "block_size": cfg.get("n_positions", 1024), "vocab_size": cfg.get("vocab_size", 50257),
            "bias": True}


def export_info(path: str | os.PathLike) -> dict:
    """What an export directory holds: {"shape", "dropout", "config" (config.json), "export"
    (kiln_export.json, or {} for a directory kiln did not write)}."""
    p = Path(path).expanduser()
    cfg_file = p / CONFIG_FILE
    if not (p / WEIGHTS_FILE).is_file() or not cfg_file.is_file():
        raise ConfigError("model.init_from", f"{p} is not an export directory (needs {WEIGHTS_FILE} and "
                          f"{CONFIG_FILE})", "run kiln-export CHECKPOINT OUT_DIR and point at OUT_DIR")
    cfg = json.loads(cfg_file.read_text())
    shape = _shape_from_hf_config(cfg, p)
    exp = json.loads((p / EXPORT_FILE).read_text()) if (p / EXPORT_FILE).is_file() else {}
    return {"shape": shape, "dropout": float(cfg.get("resid_pdrop", 0.0)), "config": cfg, "export": exp}


def check_export_shape(found: dict, shape: dict, where: Path) -> None:
    from kiln.checkpoint.state import SHAPE_KEYS

    diff = [k for k in SHAPE_KEYS if k in shape and found.get(k) != shape.get(k)]
    if diff:
        detail = ", ".join(f"model.{k}: export {found.get(k)} vs config {shape.get(k)}" for k in diff)
        fix = ("train without model.bias=false to start from a GPT-2 export" if diff == ["bias"] else
               "set the model config to the export's shape (see its kiln_export.json / config.json)")
        raise ConfigError(f"model.{diff[0]}", f"the export {where} has another model shape ({detail})", fix)


def read_export(path: str | os.PathLike, shape: dict | None) -> dict[str, torch.Tensor]:
    """A kiln GPT state dict (fp32, lm_head tied to wte) from a kiln-export or GPT-2
    save_pretrained directory; `shape` (n_layer, n_head, n_embd, block_size, vocab_size, bias),
    when given, must match the export's, else ConfigError("model.<key>")."""
    from safetensors.torch import load_file

    p = Path(path).expanduser()
    info = export_info(p)
    found = info["shape"]
    if shape is not None:
        check_export_shape(found, shape, p)
    raw = load_file(str(p / WEIGHTS_FILE), device="cpu")
    if not any(k.startswith("transformer.") for k in raw):  # a GPT2Model (no LM head) save
        raw = {f"transformer.{k}" if not k.startswith("lm_head.") else k: v for k, v in raw.items()}
    sd: dict[str, torch.Tensor] = {}
    for name, t in raw.items():
        if tuple(name.split(".")[-2:]) in HF_BUFFERS:
            continue
        t = t.to(torch.float32)
        sd[name] = (t.t() if name.endswith(CONV1D_SUFFIXES) else t).contiguous()
    wte = sd.get("transformer.wte.weight")
    if wte is None:
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} has no transformer.wte.weight",
                          "use a kiln-export directory")
    head = sd.pop("lm_head.weight", None)
    if head is not None and not torch.equal(head, wte):
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} has an LM head that differs from its "
                          f"token embedding; kiln's GPT ties them", "use weights with a tied LM head")
    problems = tensor_problems(sd, found)
    if problems:
        raise ConfigError("model.init_from", f"{p}/{WEIGHTS_FILE} does not match its {CONFIG_FILE} ({problems})",
                          "re-export the checkpoint with kiln-export")
    sd["lm_head.weight"] = sd["transformer.wte.weight"]
    return sd


def _expected_shapes(shape: dict) -> dict[str, tuple]:
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
    exp = _expected_shapes(shape)
    missing = sorted(set(exp) - set(sd))
    unexpected = sorted(set(sd) - set(exp))
    wrong = [f"{k} {tuple(sd[k].shape)} (expected {exp[k]})" for k in exp if k in sd and tuple(sd[k].shape) != exp[k]]
    if not (missing or unexpected or wrong):
        return None
    return f"missing {missing[:3]}, unexpected {unexpected[:3]}, wrong shapes {wrong[:3]}"


# ---------------------------------------------------------------------------------------------
# Tokenizer files


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (what the ByteLevel pre-tokenizer applies)."""
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


def byte_tokenizer_json(eos_token: str = "<|endoftext|>") -> str:
    """A Hugging Face tokenizer.json with exactly kiln's byte ids: byte-level BPE without merges
    (token i = byte i) plus `eos_token` = 256."""
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    table = _bytes_to_unicode()
    tok = Tokenizer(models.BPE(vocab={table[b]: b for b in range(256)}, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(eos_token, special=True, normalized=False)])
    assert tok.token_to_id(eos_token) == 256
    return tok.to_str(pretty=True)


def write_tokenizer(tokenizer, out: Path, block_size: int) -> dict:
    """tokenizer.json + tokenizer_config.json (for transformers) and kiln_tokenizer.json (for kiln);
    returns kiln's entry."""
    from kiln.data.tokenizer import DEFAULT_EOS

    entry = dict(tokenizer.to_manifest())
    if entry["type"] == "byte":
        eos_token = DEFAULT_EOS
        (out / HF_TOKENIZER_FILE).write_text(byte_tokenizer_json(eos_token))
        entry["note"] = BYTE_TOKENIZER_NOTE
    else:
        eos_token = entry["eos_token"]
        (out / HF_TOKENIZER_FILE).write_bytes(tokenizer.file_bytes())
        entry["file"] = HF_TOKENIZER_FILE
    (out / HF_TOKENIZER_CONFIG).write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast",
        "bos_token": eos_token, "eos_token": eos_token, "unk_token": None, "pad_token": None,
        "model_max_length": block_size, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }, indent=2) + "\n")
    (out / KILN_TOKENIZER_FILE).write_text(json.dumps(entry, indent=2) + "\n")
    return entry


def export_tokenizer(path: str | os.PathLike):
    """The tokenizer of an export directory: kiln's own entry when kiln wrote it (exact for every
    type), else a plain tokenizer.json."""
    from kiln.data.tokenizer import load_tokenizer_file, tokenizer_from_manifest

    p = Path(path).expanduser()
    if (p / KILN_TOKENIZER_FILE).is_file():
        entry = json.loads((p / KILN_TOKENIZER_FILE).read_text())
        return tokenizer_from_manifest(entry, p)
    if (p / HF_TOKENIZER_FILE).is_file():
        return load_tokenizer_file(p / HF_TOKENIZER_FILE)
    raise DataError(f"{p} holds no tokenizer ({KILN_TOKENIZER_FILE} or {HF_TOKENIZER_FILE}); "
                    f"pass --tokenizer byte|PATH/tokenizer.json")


# ---------------------------------------------------------------------------------------------
# kiln-export


def _default_modes(directory: Path) -> None:
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(directory, 0o777 & ~umask)
    for f in directory.iterdir():
        os.chmod(f, 0o666 & ~umask)


def export_checkpoint(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, tokenizer=None,
                      overwrite: bool = False) -> dict:
    """Write `out_dir` (see the module docstring) from a kiln checkpoint. The directory appears
    whole or not at all: it is written beside its final place and renamed."""
    from safetensors.torch import save_file

    from kiln.checkpoint.state import read_meta
    from kiln.checkpoint.weights import consolidated_state_dict

    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    shape = meta["model_shape"]
    check_exportable(shape)
    out = Path(out_dir).expanduser().resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise DataError(f"OUT_DIR {out} overlaps the checkpoint {ckpt}; write the export somewhere else")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DataError(f"{out} already exists and is not empty; choose another OUT_DIR or pass --overwrite")
    tokenizer = tokenizer or checkpoint_tokenizer(meta)
    if tokenizer.vocab_size > shape["vocab_size"]:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{shape['vocab_size']}: it is not the tokenizer this model was trained with")

    sd = consolidated_state_dict(ckpt)
    problems = tensor_problems({k: v for k, v in sd.items() if k != "lm_head.weight"}, shape)
    if problems:
        raise DataError(f"the weights in {ckpt} do not match its model_shape {shape} ({problems})")
    hf = to_hf_state_dict(sd)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(hf, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        dropout = float(meta["config"]["model"].get("dropout", 0.0))
        (tmp / CONFIG_FILE).write_text(json.dumps(gpt2_config(shape, dropout, tokenizer.eos_id), indent=2) + "\n")
        tok_entry = write_tokenizer(tokenizer, tmp, shape["block_size"])
        info = {
            "format": EXPORT_FORMAT,
            "model_shape": shape,
            "dropout": dropout,
            "step": meta["step"],
            "tokens": meta.get("tokens"),
            "checkpoint": str(ckpt),
            "run_name": meta["config"]["trainer"]["run_name"],
            "data_fingerprint": meta.get("data_fingerprint"),
            "tokenizer": {k: v for k, v in tok_entry.items() if k != "note"},
            "dtype": "float32",
            "parameters": sum(t.numel() for t in hf.values()),
        }
        (tmp / EXPORT_FILE).write_text(json.dumps(info, indent=2) + "\n")
        _default_modes(tmp)  # mkdtemp (and safetensors) make private files
        if out.exists():
            shutil.rmtree(out) if out.is_dir() else out.unlink()
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return {**info, "out_dir": str(out), "files": sorted(p.name for p in out.iterdir())}
