"""kiln-export: a kiln checkpoint -> a Hugging Face directory (GPT2LMHeadModel for model.arch=gpt2,
LlamaForCausalLM for model.arch=llama). A GPT-2 export directory holds (a Llama's: the same files,
its weights under Hugging Face Llama's own names, which kiln's Llama uses: kiln.model.hf_llama):

    model.safetensors      the weights, fp32, in GPT-2's layout: the same names as kiln's GPT
                           (transformer.wte.weight, transformer.h.0.attn.c_attn.weight, ...) with the
                           four projection matrices (attn.c_attn, attn.c_proj, mlp.c_fc, mlp.c_proj)
                           transposed to GPT-2's Conv1D orientation (in, out); the LM head is tied to
                           the token embedding and stored once, as transformer.wte.weight
                           (the mapping: kiln.model.hf_gpt2)
    config.json            a GPT2Config: `transformers.GPT2LMHeadModel.from_pretrained(dir)` loads it
    tokenizer.json         the tokenizer the training data was written with, for `tokenizers` and
    tokenizer_config.json  `transformers.AutoTokenizer` (for the byte tokenizer: an equivalent
                           byte-level BPE without merges; see kiln.checkpoint.tokenizer_files)
    kiln_tokenizer.json    kiln's own description of that tokenizer (its manifest entry): what
                           kiln-generate uses, exact for every tokenizer type
    kiln_export.json       the original model shape, step, tokens and source checkpoint

`kiln.checkpoint.weights.read_export(path, shape)` is the inverse: a kiln state dict from such a
directory (or from any GPT-2 directory `save_pretrained` wrote), checked against the model shape
of the run.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path

from safetensors.torch import save_file

from kiln.checkpoint.meta import CONFIG_FILE, EXPORT_FILE, HF_ADAPTERS, WEIGHTS_FILE, read_meta, resolve_checkpoint
from kiln.checkpoint.tokenizer_files import checkpoint_tokenizer, write_tokenizer
from kiln.checkpoint.weights import consolidated_state_dict
from kiln.errors import DataError
from kiln.model.config import arch_of, tied_embedding

EXPORT_FORMAT = 1


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
    ckpt = resolve_checkpoint(checkpoint)
    meta = read_meta(ckpt)
    shape = meta["model_shape"]
    adapter = HF_ADAPTERS[arch_of(shape)]
    adapter.check_exportable(shape)
    out = Path(out_dir).expanduser().resolve()
    if out == ckpt or out in ckpt.parents or ckpt in out.parents:
        raise DataError(f"OUT_DIR {out} overlaps the checkpoint {ckpt}; write the export somewhere else")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        if not overwrite:
            raise DataError(f"{out} already exists and is not empty; choose another OUT_DIR or pass --overwrite")
        if not (out / EXPORT_FILE).is_file():  # --overwrite never deletes what kiln did not write
            raise DataError(f"{out} is not a kiln export (no {EXPORT_FILE}); --overwrite replaces only an earlier "
                            f"export: choose another OUT_DIR, or remove {out} yourself")
    tokenizer = tokenizer or checkpoint_tokenizer(meta, ckpt)
    if tokenizer.vocab_size > shape["vocab_size"]:
        raise DataError(f"the tokenizer has {tokenizer.vocab_size} tokens but the model only "
                        f"{shape['vocab_size']}: it is not the tokenizer this model was trained with")

    sd = consolidated_state_dict(ckpt)
    tied = tied_embedding(shape) is not None
    problems = adapter.tensor_problems({k: v for k, v in sd.items() if not (tied and k == "lm_head.weight")}, shape)
    if problems:
        raise DataError(f"the weights in {ckpt} do not match its model_shape {shape} ({problems})")
    hf = adapter.to_hf_state_dict(sd)

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        save_file(hf, str(tmp / WEIGHTS_FILE), metadata={"format": "pt"})
        dropout = float(meta["config"]["model"].get("dropout", 0.0))
        (tmp / CONFIG_FILE).write_text(json.dumps(adapter.hf_config(shape, dropout, tokenizer.eos_id), indent=2) + "\n")
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
