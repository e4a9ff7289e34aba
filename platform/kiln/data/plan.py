"""The data side of a run, resolved once on the driver from the `data` config section: sources,
tokenizer, stream spec and validation shards. It travels to the ranks inside the run plan."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from braceexpand import braceexpand

from kiln.data.manifest import load_manifest
from kiln.data.sources import (REMOTE, Source, _abs, check_shards_open, fetch_beside_manifest, fingerprint,
                               resolve_sources)
from kiln.data.stream import StreamSpec
from kiln.data.tokenizer import tokenizer_file, tokenizer_from_manifest
from kiln.errors import ConfigError, DataError


@dataclass
class DataPlan:
    sources: list[Source]
    tokenizer: object
    spec: StreamSpec
    val_urls: list[str]
    val_dtype: str
    val_split: str = "val"  # "train": no source has a validation split, eval reads training shards
    warnings: list[str] = field(default_factory=list)  # printed by rank 0 when the run starts


def load_source_tokenizer(source: Source, cache_dir: str):
    root = source.root
    if root.startswith(REMOTE) and source.tokenizer.get("type") != "byte":
        root = fetch_beside_manifest(source, tokenizer_file(source.tokenizer), cache_dir)
    return tokenizer_from_manifest(source.tokenizer, root)


def plan_data(cfg, check_open: bool = False) -> DataPlan:
    """From a TrainConfig: its data section, and the trainer's batch size and seed."""
    data, tr = cfg.data, cfg.trainer
    sources = resolve_sources(data)
    if check_open:
        check_shards_open(sources)
    tokenizer = load_source_tokenizer(sources[0], data.cache_dir)
    spec = StreamSpec(
        sources=tuple(s.to_stream(data.shuffle_documents) for s in sources), seq_len=data.seq_len,
        batch_size=tr.micro_batch_size, eos_id=tokenizer.eos_id, seed=tr.seed,
        shuffle_window=data.shuffle_buffer, on_error=str(data.on_error), fingerprint=fingerprint(sources),
        open_shards=data.open_shards, open_documents=data.open_documents, read_timeout_s=data.read_timeout_s,
    )
    if data.val_path:
        val_urls, val_dtype = explicit_val_shards(data.val_path, sources[0], check_open)
        val_split, warnings = "val", []
    else:
        val_urls, val_dtype, val_split, warnings = eval_shards(sources)
    return DataPlan(sources, tokenizer, spec, val_urls, val_dtype, val_split, warnings)


def explicit_val_shards(path: str, first: Source, check_open: bool) -> tuple[list[str], str]:
    """data.val_path: a kiln-data directory (its validation split) or shards (a brace pattern,
    URLs, pipe: commands) in the first source's token format."""
    key = "data.val_path"
    if not path.startswith(REMOTE) and "{" not in path and not path.endswith(".tar"):
        m = load_manifest(_abs(path))
        if not m.urls("val"):
            raise ConfigError(key, f"the kiln-data directory {path} has no validation split",
                              "rebuild it with `kiln-data ... --val-fraction 0.01`, or name shards (a brace pattern)")
        if m.tokenizer != first.tokenizer:
            raise ConfigError(key, f"{path} was tokenized with {m.tokenizer}, the training data ({first.name}) "
                              f"with {first.tokenizer}", "evaluate on data written with the same tokenizer")
        return m.urls("val"), m.token_dtype
    urls = [u if u.startswith(REMOTE) else _abs(u) for u in braceexpand(path)]
    if check_open:
        missing = [u for u in urls if not u.startswith(REMOTE) and not Path(u).is_file()]
        if missing:
            raise DataError(f"{key}: validation shard {missing[0]} does not exist "
                            f"({len(missing)} of {len(urls)} missing)")
    return urls, first.dtype


def eval_shards(sources: list[Source]) -> tuple[list[str], str, str, list[str]]:
    """The shards eval reads: every source's validation split. A run whose sources have none
    still trains, and evaluates on the first source's training shards, but says so: a warning
    when it starts, and `eval_split: "train"` beside each eval_loss and in the summary (an eval
    loss measured on training data must never pass for a validation loss)."""
    with_val = [s for s in sources if s.val]
    if with_val:
        without = [s.name for s in sources if not s.val]
        warnings = [f"source(s) {', '.join(without)} have no validation split: eval_loss covers only "
                    f"{', '.join(s.name for s in with_val)}"] if without else []
        return [u for s in with_val for u in s.val], with_val[0].dtype, "val", warnings
    first = sources[0]
    warning = (f"no validation split in the data (source {first.name}: its manifest lists no val shards), so "
               f"eval_loss is measured on TRAINING shards and labelled eval_split=train; rebuild the data with "
               f"`kiln-data ... --val-fraction 0.01` for a real validation loss")
    return list(first.train), first.dtype, "train", [warning]
