#!/usr/bin/env python
"""The data loader's throughput per core, and what the trainer consumes, side by side in one run.

    python scripts/bench_data.py                        # build datasets from the stdlib, measure (~1 min)
    python scripts/bench_data.py --data data/mine       # measure existing kiln-data directories instead
    python scripts/bench_data.py --out ~/.cache/kiln/bench --json bench.json   # keep the data, save figures

What it does, all on this machine and nothing downloaded:

1. Datasets, built with kiln.data.build.build_shards from this Python's standard-library sources
   (or given with --data): `files-byte`, one document per .py file, byte tokens; `chunks-byte`,
   the same text cut at blank lines into short documents (~1.4 KB); `chunks-bpe`, those chunks
   with a byte-level BPE trained here (--no-bpe leaves it out). Short documents are the hard case
   for a loader: its cost is mostly per document, not per token.
2. The loader: ResumableLoader at training settings (--seq-len, --batch-size, --settings), after a
   warm-up of two shuffle windows, for --seconds each. num_workers=0 runs it in this process, on
   one core: that is the tokens/s per core. num_workers=1 and 2 are for reference; the CPU time
   of this process and its DataLoader workers says how many cores they really used.
3. The trainer: real optimizer steps (forward, backward, AdamW) of kiln's GPT in plain torch fp32
   on this CPU, on batches from the same loader (fetched beforehand, so loader time is not in the
   step time), with --threads torch threads (1 by default: one core, the loader's unit).
4. The ratios loader/trainer, the 5M tokens/s-per-core goal against what was measured, and the
   ratio to an H100 training a 124M model (~0.5M tokens/s): derived from the measured loader
   figure and that reference number, not measured here.

Benchmarks measure and print; they never assert times. The shards sit in the page cache after
the first pass, so this measures the loader's CPU cost, not storage bandwidth.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import platform
import re
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from kiln.data.build import build_shards, train_bpe_on_inputs
from kiln.data.default_corpus import stdlib_source_files
from kiln.data.manifest import MANIFEST, load_manifest
from kiln.data.plan import load_source_tokenizer
from kiln.data.sources import fingerprint, resolve_source
from kiln.data.stream import ResumableLoader, StreamSpec
from kiln.data.tokenizer import ByteTokenizer
from kiln.errors import DataError
from kiln.model.gpt import GPT, GPTConfig

REPO = Path(__file__).resolve().parents[1]
GOAL_PER_CORE = 5_000_000  # the issue's goal: tokens/s per loader core for pre-tokenized shards
H100_124M = 500_000  # reference: tokens/s one H100 trains a 124M GPT at (not measured here)
# Models the trainer side can run: conf/model/<name>.yaml, plus `mini`, a mid-size GPT that
# still takes seconds, not minutes, a step on one CPU core. Sequence length and micro-batch each.
MINI = {"n_layer": 6, "n_head": 6, "n_embd": 384, "block_size": 256, "vocab_size": None, "bias": True}
TRAIN_SHAPE = {"tiny": (128, 8), "mini": (256, 4), "gpt2-small": (1024, 1)}


def fmt(n: float) -> str:
    if n >= 1e6:
        return f"{n / 1e6:.1f}M"
    if n >= 1e3:
        return f"{n / 1e3:.1f}k"
    return f"{n:.0f}"


def cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_now() -> str:
    """How busy the machine is (other processes skew CPU benchmarks): load average, and the
    share of time runnable tasks waited for a CPU over the last 10 s, where Linux reports it."""
    out = "load %.2f" % os.getloadavg()[0] if hasattr(os, "getloadavg") else "load ?"
    try:
        some = Path("/proc/pressure/cpu").read_text().split("\n")[0]
        out += ", cpu pressure " + re.search(r"avg10=([\d.]+)", some).group(1) + "%"
    except (OSError, AttributeError):
        pass
    return out


class CpuClock:
    """CPU seconds of this process and its children (DataLoader workers) since start()."""

    def __init__(self):
        try:
            import psutil

            self.proc = psutil.Process()
        except ImportError:  # psutil comes with ray[default]; without it, count this process only
            self.proc = None

    def read(self) -> float:
        if self.proc is None:
            return time.process_time()
        total = sum(self.proc.cpu_times()[:2])
        for child in self.proc.children(recursive=True):
            try:
                total += sum(child.cpu_times()[:2])
            except Exception:  # exited meanwhile
                pass
        return total


# ---------------------------------------------------------------------------- datasets

def stdlib_texts(max_chars: int) -> list[Path]:
    files, total = [], 0
    for p in stdlib_source_files():
        try:
            total += len(p.read_text(encoding="utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
        files.append(p)
        if total >= max_chars:
            break
    return files


def write_chunks(files: list[Path], out: Path, min_chars: int) -> None:
    """Each file cut at blank lines into documents of at least `min_chars` characters."""
    with out.open("w", encoding="utf-8") as f:
        for p in files:
            parts, size = [], 0
            for para in re.split(r"\n\s*\n", p.read_text(encoding="utf-8")):
                parts.append(para)
                size += len(para)
                if size >= min_chars:
                    f.write(json.dumps({"text": "\n\n".join(parts)}) + "\n")
                    parts, size = [], 0
            if parts and size:
                f.write(json.dumps({"text": "\n\n".join(parts)}) + "\n")


def build_datasets(root: Path, max_tokens: int, bpe: bool, vocab: int, log) -> list[tuple[str, Path]]:
    """Build (or reuse, where root already holds them) the benchmark datasets."""
    root.mkdir(parents=True, exist_ok=True)
    files = stdlib_texts(max_tokens)
    chunks = root / "chunks.jsonl"
    if not chunks.exists():
        write_chunks(files, chunks, min_chars=1000)
    plan = [("files-byte", [str(p) for p in files], "byte", 250_000),
            ("chunks-byte", [str(chunks)], "byte", 250_000)]
    if bpe:
        plan.append(("chunks-bpe", [str(chunks)], "bpe", 100_000))
    out = []
    for name, inputs, kind, shard_tokens in plan:
        d = root / name
        if (d / MANIFEST).exists():
            log(f"  {name}: reusing {d}")
        else:
            if d.exists():
                shutil.rmtree(d)
            t = time.perf_counter()
            tok = ByteTokenizer() if kind == "byte" else train_bpe_on_inputs(inputs, vocab_size=vocab)
            build_shards(inputs, d, tok, val_fraction=0.0, shard_tokens=shard_tokens, max_tokens=max_tokens,
                         on_error="skip", workers=1)
            log(f"  {name}: built in {time.perf_counter() - t:.1f}s -> {d}")
        out.append((name, d))
    return out


def describe(d: Path) -> dict:
    m = load_manifest(d)
    tr = m.splits["train"]
    tokens, docs = sum(s.tokens for s in tr), sum(s.documents for s in tr)
    return {"shards": len(tr), "tokens": tokens, "documents": docs, "tokens_per_doc": tokens / max(docs, 1),
            "tokenizer": m.tokenizer.get("type"), "vocab_size": m.tokenizer.get("vocab_size"),
            "dtype": m.token_dtype}


def spec_for(d: Path, seq_len: int, batch: int, window: int, open_shards: int = 1,
             open_documents: int = 1, shuffle_documents: bool | None = False) -> StreamSpec:
    src = resolve_source(str(d))
    eos = load_source_tokenizer(src, "/nonexistent").eos_id  # local data: nothing is fetched
    return StreamSpec(sources=(src.to_stream(shuffle_documents),), seq_len=seq_len, batch_size=batch, eos_id=eos,
                      seed=1337, shuffle_window=window, fingerprint=fingerprint([src]), open_shards=open_shards,
                      open_documents=open_documents)


def parse_settings(text: str) -> list[tuple[int, int, int, int]]:
    """'256:1:1,4096:16:64:1' -> [(window, open_shards, open_documents, shuffle_documents), ...];
    'default' is kiln's defaults."""
    from kiln.config.schema import DataConfig

    out = []
    for item in text.split(","):
        item = item.strip()
        if item == "default":
            d = DataConfig()
            out.append((d.shuffle_buffer, d.open_shards, d.open_documents, d.shuffle_documents))
        elif item:
            w, k, n, docs = (item.split(":") + ["1", "1", "0"][len(item.split(":")) - 1:])[:4]
            out.append((int(w), int(k), int(n), None if docs == "auto" else bool(int(docs))))
    return out


# ---------------------------------------------------------------------------- measurements

def measure_loader(spec: StreamSpec, workers: int, seconds: float, clock: CpuClock) -> dict:
    warmup = 2 * math.ceil(spec.shuffle_window / spec.batch_size) + 2  # two shuffle windows
    loader = ResumableLoader(spec, rank=0, world=1, num_workers=workers)
    try:
        for _ in range(warmup):
            next(loader)
        c0, t0, tokens, batches = clock.read(), time.perf_counter(), 0, 0
        while True:
            x, _ = next(loader)
            tokens += x.numel()
            batches += 1
            if batches % 8 == 0 and time.perf_counter() - t0 >= seconds:
                break
        wall, cpu = time.perf_counter() - t0, clock.read() - c0
    finally:
        del loader  # shuts its DataLoader workers down before the next measurement starts
        gc.collect()
    return {"workers": workers, "tokens": tokens, "seconds": wall, "cpu_seconds": cpu,
            "tokens_per_s": tokens / wall, "cores": cpu / wall, "tokens_per_cpu_s": tokens / cpu}


def model_config(name: str, vocab: int) -> GPTConfig:
    if name == "mini":
        section = dict(MINI)
    else:
        import yaml

        section = yaml.safe_load((REPO / "conf" / "model" / f"{name}.yaml").read_text())
    # A null model.vocab_size takes the tokenizer's, as in kiln-train.
    return GPTConfig(vocab_size=section.get("vocab_size") or vocab, n_layer=section["n_layer"],
                     n_head=section["n_head"], n_embd=section["n_embd"], block_size=section["block_size"],
                     dropout=section.get("dropout", 0.0), bias=section.get("bias", True))


def measure_trainer(name: str, data: Path, seconds: float, min_steps: int) -> dict:
    seq, batch = TRAIN_SHAPE[name]
    vocab = load_manifest(data).tokenizer["vocab_size"]
    cfg = model_config(name, vocab)
    seq = min(seq, cfg.block_size)
    loader = ResumableLoader(spec_for(data, seq, batch, 1), rank=0, world=1, num_workers=0)
    batches = [next(loader) for _ in range(8)]  # real data, fetched before the clock starts
    del loader
    torch.manual_seed(0)
    model = GPT(cfg)
    opt = torch.optim.AdamW(model.param_groups(0.1), lr=6e-4, betas=(0.9, 0.95))

    def step(i: int) -> None:
        x, y = batches[i % len(batches)]
        _, loss = model(x, y)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(0)  # warm-up: allocations, first-call overheads
    t0, steps = time.perf_counter(), 0
    while steps < min_steps or (time.perf_counter() - t0 < seconds and steps < 500):
        step(steps + 1)
        steps += 1
    wall = time.perf_counter() - t0
    return {"model": name, "parameters": model.num_params(), "seq_len": seq, "batch": batch,
            "vocab_size": cfg.vocab_size, "steps": steps, "seconds": wall,
            "tokens_per_s": steps * batch * seq / wall, "step_ms": 1000 * wall / steps}


# ---------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", action="append", default=[], metavar="DIR",
                    help="a kiln-data directory to measure (repeatable); default: build the stdlib datasets")
    ap.add_argument("--out", metavar="DIR", help="where to build (and next time reuse) the datasets; "
                    "default: a temporary directory, removed at the end")
    ap.add_argument("--max-tokens", type=int, default=4_000_000, help="size of each built dataset (default 4M)")
    ap.add_argument("--no-bpe", dest="bpe", action="store_false", help="leave out the BPE dataset")
    ap.add_argument("--bpe-vocab", type=int, default=8192)
    ap.add_argument("--seq-len", type=int, default=1024)
    ap.add_argument("--batch-size", type=int, default=8, help="micro-batch (sequences)")
    ap.add_argument("--settings", default="256:1:1,default",
                    help="stream settings to measure side by side, WINDOW:OPEN_SHARDS:OPEN_DOCUMENTS[:SHUFFLE_DOCUMENTS] "
                         "(data.shuffle_buffer, data.open_shards, data.open_documents, data.shuffle_documents "
                         "0|1|auto, default 0), comma-separated; "
                         "'default' is kiln's defaults; 256:1:1 is the stream before issue 9 "
                         "(default: 256:1:1,default)")
    ap.add_argument("--workers", default="0,1,2", help="DataLoader workers to measure (default 0,1,2)")
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per loader measurement")
    ap.add_argument("--models", default="tiny,mini", help="trainer models: tiny, mini, gpt2-small (slow)")
    ap.add_argument("--train-seconds", type=float, default=3.0, help="timed seconds per model (at least 3 steps)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads for the trainer (default 1: one core)")
    ap.add_argument("--json", metavar="PATH", help="also write every figure to this JSON file")
    args = ap.parse_args(argv)
    workers = [int(w) for w in args.workers.split(",") if w.strip()]
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    for m in models:
        if m not in TRAIN_SHAPE:
            ap.error(f"--models: unknown model {m!r}; choose from {', '.join(TRAIN_SHAPE)}")

    def log(msg: str = "") -> None:
        print(msg, flush=True)

    started = time.perf_counter()
    torch.set_num_threads(args.threads)
    clock = CpuClock()
    machine = {"cpu": cpu_model(), "cores": cpu_count(), "gpu": torch.cuda.is_available(),
               "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    log("kiln data loader benchmark: python scripts/bench_data.py " + " ".join(sys.argv[1:] if argv is None else argv))
    log(f"machine: {machine['cpu']}, {machine['cores']} cores, GPU: {'yes' if machine['gpu'] else 'none'}; "
        f"Python {machine['python']}, torch {machine['torch']}, numpy {machine['numpy']}; {load_now()}")

    tmp = None
    if args.data:
        datasets = [(Path(d).name, Path(d).expanduser().resolve()) for d in args.data]
    else:
        root = Path(args.out).expanduser() if args.out else Path(tmp := tempfile.mkdtemp(prefix="kiln-bench-"))
        log(f"datasets (this Python's stdlib sources, up to {fmt(args.max_tokens)} tokens each; nothing downloaded):")
        datasets = build_datasets(root, args.max_tokens, args.bpe, args.bpe_vocab, log)
    try:
        results = run(args, datasets, workers, models, clock, log)
    finally:
        if tmp:
            shutil.rmtree(tmp, ignore_errors=True)
    results.update(machine=machine, command="python scripts/bench_data.py " + " ".join(sys.argv[1:]),
                   total_seconds=time.perf_counter() - started)
    log(f"\ndone in {results['total_seconds']:.0f}s; {load_now()}")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
        log(f"figures written to {args.json}")
    return 0


def run(args, datasets, workers, models, clock, log) -> dict:
    info = {name: describe(d) for name, d in datasets}
    log(f"\n{'dataset':<13} {'tokenizer':<9} {'shards':>6} {'tokens':>8} {'docs':>7} {'tokens/doc':>10}")
    for name, d in datasets:
        i = info[name]
        log(f"{name:<13} {i['tokenizer']:<9} {i['shards']:>6} {fmt(i['tokens']):>8} {i['documents']:>7,} "
            f"{i['tokens_per_doc']:>10,.0f}")

    settings = parse_settings(args.settings)
    log(f"\nloader: ResumableLoader, seq_len {args.seq_len}, micro-batch {args.batch_size}, "
        f"{args.seconds:g}s each after a warm-up of two shuffle windows")
    log("  tokens/s: wall clock; cores used: CPU time of this process and its workers / wall time;")
    log("  per core: tokens per CPU-second (what one core delivers, even when other work shares the machine)")
    log(f"{'dataset':<13} {'W:shards:docs:shuf':>18} {'workers':>7} {'tokens/s':>9} {'cores used':>10} "
        f"{'tokens/s per core':>17}")
    loader: dict[str, list[dict]] = {}
    for name, d in datasets:
        loader[name] = []
        for window, open_shards, open_documents, shuffle_documents in settings:
            spec = spec_for(d, args.seq_len, args.batch_size, window, open_shards, open_documents, shuffle_documents)
            order = "auto" if shuffle_documents is None else int(shuffle_documents)
            tag = f"{window}:{open_shards}:{open_documents}:{order}"
            for w in workers:
                try:
                    r = measure_loader(spec, w, args.seconds, clock)
                except DataError as e:  # fewer shards than readers
                    log(f"{name:<13} {tag:>18} {w:>7}  skipped: {e}")
                    continue
                r.update(window=window, open_shards=open_shards, open_documents=open_documents,
                         shuffle_documents=shuffle_documents)
                loader[name].append(r)
                log(f"{name:<13} {tag:>18} {w:>7} {fmt(r['tokens_per_s']):>9} {r['cores']:>10.2f} "
                    f"{fmt(r['tokens_per_cpu_s']):>17}")
        if len(settings) > 1:
            for w in workers:
                rows = [r for r in loader[name] if r["workers"] == w]
                if len(rows) == len(settings):
                    new, old = (":".join(map(str, x)) for x in (settings[-1], settings[0]))
                    log(f"{name:<13} {'ratio':>18} {w:>7}  per core {new} / {old} = "
                        f"{rows[-1]['tokens_per_cpu_s'] / rows[0]['tokens_per_cpu_s']:.2f}")

    trainer = []
    if models:
        # Byte data for byte-vocabulary models is what the demo trains; any dataset would do.
        data = datasets[0][1]
        log(f"\ntrainer: kiln GPT, forward + backward + AdamW step, fp32, plain torch on this CPU, "
            f"{torch.get_num_threads()} torch thread(s), data from {datasets[0][0]}")
        log(f"{'model':<11} {'parameters':>10} {'seq x batch':>11} {'ms/step':>8} {'tokens/s':>9}")
        for m in models:
            r = measure_trainer(m, data, args.train_seconds, min_steps=3)
            trainer.append(r)
            log(f"{m:<11} {fmt(r['parameters']):>10} {r['seq_len']:>5} x {r['batch']:<3} {r['step_ms']:>8.0f} "
                f"{fmt(r['tokens_per_s']):>9}")

    def lowest(rows) -> float | None:
        return min((r["tokens_per_cpu_s"] for r in rows), default=None)

    last = settings[-1]  # the goal is judged on the last settings measured (kiln's defaults by default)
    loader_last = {name: [r for r in rs if (r["window"], r["open_shards"], r["open_documents"],
                                            r["shuffle_documents"]) == last]
                   for name, rs in loader.items()}
    per_core = {name: lowest([r for r in rs if r["workers"] == 0]) for name, rs in loader_last.items()}
    per_core = {k: v for k, v in per_core.items() if v is not None}
    with_workers = lowest([r for rs in loader_last.values() for r in rs if r["workers"] > 0])
    if trainer and per_core:
        unit = "one core" if torch.get_num_threads() == 1 else f"{torch.get_num_threads()} threads"
        log(f"\nratio loader/trainer (loader: tokens/s on one core, workers=0; trainer: tokens/s on {unit})")
        log(f"{'dataset':<13} " + " ".join(f"{r['model']:>11}" for r in trainer))
        for name, v in per_core.items():
            log(f"{name:<13} " + " ".join(f"{v / r['tokens_per_s']:>10,.0f}x" for r in trainer))

    verdict = {}
    if per_core:
        worst = min(per_core, key=per_core.get)
        v = per_core[worst]
        verdict = {"goal_tokens_per_s_per_core": GOAL_PER_CORE, "lowest_dataset": worst,
                   "lowest_tokens_per_s_per_core": v, "goal_met": v >= GOAL_PER_CORE,
                   "h100_124m_reference_tokens_per_s": H100_124M,
                   "derived_h100_ratio_per_core": v / H100_124M}
        log(f"\ngoal: >= {fmt(GOAL_PER_CORE)} tokens/s per core; measured (workers=0, one core): "
            + ", ".join(f"{k} {fmt(x)}" for k, x in per_core.items())
            + f"; lowest {fmt(v)} = {v / GOAL_PER_CORE:.1f}x the goal: {'met' if v >= GOAL_PER_CORE else 'NOT met'}")
        log(f"derived, not measured: one H100 trains a 124M GPT at ~{fmt(H100_124M)} tokens/s (a reference "
            f"figure, not run here). One loader core at the lowest rate above supplies {v / H100_124M:.0f}x that")
        if with_workers is not None:
            verdict["lowest_with_workers_tokens_per_s_per_core"] = with_workers
            verdict["derived_h100_ratio_per_core_with_workers"] = with_workers / H100_124M
            log(f"  with DataLoader workers (their IPC and the training process's share of it counted): "
                f"{fmt(with_workers)} per core, {with_workers / H100_124M:.0f}x; so one H100 needs about "
                f"{H100_124M / with_workers:.2f} of a core of this CPU for its data")
    return {"datasets": info, "loader": loader, "trainer": trainer, "verdict": verdict,
            "settings": {"seq_len": args.seq_len, "batch_size": args.batch_size, "stream": settings,
                         "seconds": args.seconds, "threads": torch.get_num_threads()}}


if __name__ == "__main__":
    sys.exit(main())
