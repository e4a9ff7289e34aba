"""Sampling text from a kiln model (GPT or Llama): from a checkpoint or a kiln-export directory,
with the tokenizer the training data was written with.

    model, tok, info = load_model("checkpoints/kiln/step_000001000")   # or an export directory
    ids = torch.tensor([tok.encode("def ")], dtype=torch.long)
    out = sample(model, ids, max_new_tokens=100, temperature=0.8, top_k=50,
                 generator=torch.Generator().manual_seed(0))
    print(tok.decode(out[0].tolist()))
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from kiln.checkpoint.meta import CONFIG_FILE, WEIGHTS_FILE, export_info, read_meta, resolve_checkpoint
from kiln.checkpoint.tokenizer_files import checkpoint_tokenizer, export_tokenizer
from kiln.checkpoint.weights import consolidated_state_dict, read_export
from kiln.model.config import config_from_shape
from kiln.model.factory import build_model


@torch.no_grad()
def sample(model: torch.nn.Module, ids: torch.Tensor, max_new_tokens: int, temperature: float = 1.0,
           top_k: int | None = None, generator: torch.Generator | None = None,
           eos_id: int | None = None, vocab_limit: int | None = None) -> torch.Tensor:
    """Extend `ids` (B, T) by up to `max_new_tokens` tokens, one forward pass per token over the
    last `block_size` tokens. temperature 0 is greedy (argmax); otherwise logits / temperature,
    optionally cut to the `top_k` most likely, sampled with `generator` (the same generator state
    gives the same tokens). With `eos_id`, stops once every row has produced it; with
    `vocab_limit`, never picks ids >= it (a model vocabulary padded past the tokenizer's).
    Returns (B, T + n)."""
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    block = model.config.block_size
    was_training = model.training
    model.eval()
    done = torch.zeros(ids.size(0), dtype=torch.bool, device=ids.device)
    try:
        for _ in range(max_new_tokens):
            context = ids[:, -block:]  # the model sees at most block_size positions
            logits, _ = model(context)
            logits = logits[:, -1, :].float()
            if vocab_limit is not None and vocab_limit < logits.size(-1):
                logits[:, vocab_limit:] = float("-inf")
            if temperature == 0:
                nxt = logits.argmax(dim=-1, keepdim=True)
            else:
                logits = logits / temperature
                if top_k is not None and 0 < top_k < logits.size(-1):
                    kth = torch.topk(logits, top_k, dim=-1).values[:, -1:]
                    logits = logits.masked_fill(logits < kth, float("-inf"))
                probs = torch.softmax(logits, dim=-1)
                nxt = torch.multinomial(probs, num_samples=1, generator=generator)
            if eos_id is not None:
                nxt = nxt.masked_fill(done.unsqueeze(1), eos_id)  # finished rows only pad with eos
            ids = torch.cat([ids, nxt], dim=1)
            if eos_id is not None:
                done |= nxt.squeeze(1) == eos_id
                if bool(done.all()):
                    break
    finally:
        model.train(was_training)
    return ids


def load_model(path: str | os.PathLike, tokenizer=None) -> tuple[torch.nn.Module, object, dict]:
    """(model in eval mode on the CPU in fp32, tokenizer, info) from a kiln checkpoint (a step_*
    or run directory) or a kiln-export directory. The tokenizer is the data's (checkpoint: from
    the dataset manifest its config names; export: from the exported tokenizer files) unless one
    is given. info: {"source": "checkpoint"|"export", "path", "step", "shape"}."""
    p = Path(path).expanduser().resolve()
    if (p / WEIGHTS_FILE).is_file() and (p / CONFIG_FILE).is_file():
        found = export_info(p)
        shape, dropout = found["shape"], found["dropout"]
        sd = read_export(p, shape)
        tokenizer = tokenizer or export_tokenizer(p)
        info = {"source": "export", "path": str(p), "step": found["export"].get("step"), "shape": shape}
    else:
        ckpt = resolve_checkpoint(p)
        meta = read_meta(ckpt)
        shape, dropout = meta["model_shape"], float(meta["config"]["model"].get("dropout", 0.0))
        sd = consolidated_state_dict(ckpt)
        tokenizer = tokenizer or checkpoint_tokenizer(meta, ckpt)
        info = {"source": "checkpoint", "path": str(ckpt), "step": meta["step"], "shape": shape}
    model = build_model(config_from_shape(shape, dropout))
    missing, unexpected = model.load_state_dict(sd, strict=False)
    missing = [k for k in missing if k != "lm_head.weight"]
    if missing or unexpected:
        raise RuntimeError(f"weights in {p} do not fit the model (missing {missing[:3]}, unexpected {unexpected[:3]})")
    model.eval()
    return model, tokenizer, info


def generate_text(model: torch.nn.Module, tokenizer, prompt: str, max_new_tokens: int = 200, temperature: float = 0.8,
                  top_k: int | None = 200, seed: int = 1337, stop_at_eos: bool = True) -> str:
    """The prompt and its continuation, decoded. An empty prompt starts a new document (the
    end-of-document token, as between documents in training)."""
    ids = [int(i) for i in tokenizer.encode(prompt)] or [tokenizer.eos_id]
    x = torch.tensor([ids], dtype=torch.long)
    gen = torch.Generator().manual_seed(seed)
    out = sample(model, x, max_new_tokens, temperature, top_k, gen,
                 eos_id=tokenizer.eos_id if stop_at_eos else None, vocab_limit=tokenizer.vocab_size)
    return tokenizer.decode(out[0].tolist())
