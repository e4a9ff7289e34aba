"""Sampling quality: does kiln's data stream train a model as well as uniform random sampling?

Builds an ordered corpus from files already on this machine (this Python's standard library,
path order: one package after another, the way real corpora arrive; or --corpus), writes it with kiln-data
twice (shuffled, kiln's default, and --no-shuffle), then trains the same small GPT for the same
steps, same init, same optimizer and LR schedule, fed by

    uniform   random windows of seq_len+1 tokens anywhere in the training tokens (the reference
              a hand-written script uses: nanoGPT's get_batch)
    kiln      kiln's ResumableLoader with the given stream settings (default: kiln's defaults)

Every model is scored on the same full validation split (every block of it, not a sample).
Nothing but the batches differs, so the gap in validation loss is the cost of the sampler.

    python scripts/bench_sampling.py                 # ~10 min on 2 CPU cores
    python scripts/bench_sampling.py --variant old:ordered:window=256,open_shards=1,open_documents=1

Prints one line per run and `gap <variant> +X.XXXX nats` lines last (kiln minus uniform).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from kiln.config.schema import DataConfig
from kiln.data.build import build_dataset
from kiln.data.inputs import expand_inputs
from kiln.data.manifest import load_manifest
from kiln.data.reader import read_documents
from kiln.data.sources import fingerprint, resolve_source
from kiln.data.stream import ResumableLoader, StreamSpec
from kiln.data.tokenizer import ByteTokenizer
from kiln.engine.schedule import lr_at as kiln_lr_at
from kiln.model.gpt import GPT, GPTConfig


def corpus_files(inputs: list[str] | None) -> list[Path]:
    """Ordered documents nobody here wrote: by default the stdlib's sources (tests left out), in
    path order; or any kiln-data inputs (files, directories, globs, .jsonl, .parquet), in order."""
    if inputs:
        return expand_inputs(inputs)
    root = Path(sysconfig.get_paths()["stdlib"])
    skip = {"site-packages", "dist-packages", "test", "tests", "idlelib", "__pycache__"}
    return [p for p in sorted(root.rglob("*.py")) if not skip & set(p.relative_to(root).parts)]


def build(files: list[Path], out: Path, shuffle: bool, args) -> Path:
    kwargs = dict(val_fraction=args.val_fraction, shard_size=f"{args.shard_tokens}tok",
                  max_tokens=args.max_tokens, on_error="skip")
    if "shuffle" in build_dataset.__code__.co_varnames:
        kwargs["shuffle"] = shuffle
    elif shuffle:
        return None  # this version of kiln-data cannot shuffle
    build_dataset([str(f) for f in files], out, ByteTokenizer(), **kwargs)
    return out


def split_tokens(root: Path, split: str, eos: int) -> np.ndarray:
    m = load_manifest(root)
    parts = []
    for url in m.urls(split):
        for doc in read_documents(url, np.dtype(m.token_dtype)):
            parts.append(doc.astype(np.int64))
            parts.append(np.array([eos], dtype=np.int64))
    return np.concatenate(parts)


def uniform_batches(tokens: np.ndarray, batch: int, block: int, seed: int):
    rng = np.random.default_rng(seed)
    while True:
        starts = rng.integers(0, len(tokens) - block - 1, size=batch)
        blocks = np.stack([tokens[s:s + block + 1] for s in starts])
        t = torch.from_numpy(blocks)
        yield t[:, :-1], t[:, 1:]


def kiln_batches(root: Path, batch: int, block: int, seed: int, overrides: dict):
    seed = overrides.get("seed", seed)
    src = resolve_source(str(root))
    defaults = DataConfig()
    fields = {f.name for f in dataclasses.fields(StreamSpec)}
    kw = {"shuffle_window": overrides.get("window", defaults.shuffle_buffer)}
    for key in ("open_shards", "open_documents"):  # absent before issue 9: one of each
        if key in fields:
            kw[key] = overrides.get(key, getattr(defaults, key, 1))
    stream = src.to_stream()
    if "shuffle_documents" in stream:  # data.shuffle_documents: kiln's default (null: per source), or 0/1
        order = overrides.get("shuffle_documents", getattr(defaults, "shuffle_documents", None))
        stream = src.to_stream(None if order is None else bool(order))
    spec = StreamSpec(sources=(stream,), seq_len=block, batch_size=batch, eos_id=256, seed=seed,
                      fingerprint=fingerprint([src]), **kw)
    return ResumableLoader(spec, rank=0, world=1, num_workers=0), dict(kw, shuffle_documents=stream.get(
        "shuffle_documents", False))


def lr_at(step: int, args) -> float:
    """kiln's own schedule (linear warmup, cosine decay), the same for every sampler."""
    return kiln_lr_at(step, lr=args.lr, warmup_steps=args.warmup, max_steps=args.steps,
                      min_lr_ratio=args.min_lr_ratio)


@torch.no_grad()
def score(model: GPT, val: np.ndarray, block: int, batch: int) -> float:
    """Mean loss over every non-overlapping block of the validation tokens."""
    model.eval()
    n = (len(val) - 1) // block
    x_all = torch.from_numpy(val[:n * block].reshape(n, block))
    y_all = torch.from_numpy(val[1:n * block + 1].reshape(n, block))
    total = 0.0
    for i in range(0, n, batch * 4):
        logits, _ = model(x_all[i:i + batch * 4])
        total += F.cross_entropy(logits.reshape(-1, logits.size(-1)), y_all[i:i + batch * 4].reshape(-1),
                                 reduction="sum").item()
    model.train()
    return total / (n * block)


def train(batches, val: np.ndarray, args) -> tuple[float, float]:
    torch.manual_seed(args.seed)
    model = GPT(GPTConfig(n_layer=args.n_layer, n_head=args.n_head, n_embd=args.n_embd,
                          block_size=args.block, vocab_size=257, dropout=0.0, bias=True))
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=args.lr, betas=(0.9, 0.99))
    start = time.perf_counter()
    for step in range(1, args.steps + 1):
        for g in opt.param_groups:
            g["lr"] = lr_at(step, args)
        x, y = next(batches)
        _, loss = model(x, y)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
    return score(model, val, args.block, args.batch), time.perf_counter() - start


def parse_variant(text: str) -> tuple[str, str, dict]:
    """name:dataset[:key=value,...] with dataset shuffled|ordered and keys window, open_shards,
    open_documents, shuffle_documents (0|1) (data.shuffle_buffer, data.open_shards,
    data.open_documents, data.shuffle_documents), seed (the
    stream's). A name starting with "uniform" reruns the uniform sampler with another seed
    (default: --seed + 1): the gap between the two uniform runs is the noise floor."""
    parts = text.split(":")
    name, dataset = parts[0], parts[1]
    overrides = {}
    if len(parts) > 2 and parts[2]:
        for kv in parts[2].split(","):
            k, v = kv.split("=")
            overrides[k] = int(v)
    return name, dataset, overrides


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--corpus", nargs="+", default=None, metavar="INPUT",
                    help="kiln-data inputs in the order they should be read (default: the stdlib's .py files)")
    ap.add_argument("--max-tokens", type=int, default=3_000_000)
    ap.add_argument("--shard-tokens", type=int, default=100_000)
    ap.add_argument("--val-fraction", type=float, default=0.05)
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--block", type=int, default=64)
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--n-embd", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--min-lr-ratio", type=float, default=0.1)
    ap.add_argument("--warmup", type=int, default=100)
    ap.add_argument("--seed", type=int, default=1337)
    ap.add_argument("--variant", action="append", default=None,
                    help="name:shuffled|ordered[:window=N,open_shards=K,open_documents=D,shuffle_documents=0|1]; repeatable "
                         "(default: kiln:shuffled and kiln:ordered with kiln's defaults)")
    ap.add_argument("--json", type=Path, default=None, help="also write the results here")
    args = ap.parse_args()
    variants = [parse_variant(v) for v in (args.variant or ["kiln:shuffled", "kiln:ordered"])]
    torch.set_num_threads(max(1, torch.get_num_threads()))

    files = corpus_files(args.corpus)
    with tempfile.TemporaryDirectory(prefix="kiln-bench-sampling-") as tmp:
        roots = {"ordered": build(files, Path(tmp) / "ordered", False, args)}
        if any(d == "shuffled" for _, d, _ in variants):
            roots["shuffled"] = build(files, Path(tmp) / "shuffled", True, args)
        ordered = roots["ordered"]
        train_tokens = split_tokens(ordered, "train", 256)
        val = split_tokens(ordered, "val", 256)
        m = load_manifest(ordered)
        print(f"corpus: {len(files)} files, {len(train_tokens):,} train tokens in {len(m.splits['train'])} "
              f"shards, {len(val):,} val tokens; {args.steps} steps x {args.batch} x {args.block} = "
              f"{args.steps * args.batch * args.block / len(train_tokens):.2f} passes", flush=True)

        results = {}
        ref, secs = train(uniform_batches(train_tokens, args.batch, args.block, args.seed), val, args)
        results["uniform"] = ref
        print(f"uniform                      val loss {ref:.4f}  ({secs:.0f} s)", flush=True)
        for name, dataset, overrides in variants:
            root = roots.get(dataset)
            label = f"{name}:{dataset}"
            if name.startswith("uniform"):  # the reference again with another sampling seed: the noise
                seed = overrides.get("seed", args.seed + 1)
                loss, secs = train(uniform_batches(train_tokens, args.batch, args.block, seed), val, args)
                results[f"{name}:seed={seed}"] = loss
                print(f"{name + ':seed=' + str(seed):28s} val loss {loss:.4f}  ({secs:.0f} s)", flush=True)
                continue
            if root is None:
                print(f"{label:28s} skipped: this kiln-data cannot build {dataset} shards", flush=True)
                continue
            loader, kw = kiln_batches(root, args.batch, args.block, args.seed, overrides)
            loss, secs = train(loader, val, args)
            results[label] = loss
            print(f"{label:28s} val loss {loss:.4f}  ({secs:.0f} s)  {kw}", flush=True)
        for label, loss in results.items():
            if label != "uniform":
                print(f"gap {label} {loss - ref:+.4f} nats")
        if args.json:
            args.json.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                             "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
