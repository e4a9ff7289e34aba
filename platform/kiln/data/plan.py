"""The data side of a run, resolved once from the `data` config section: sources, tokenizer,
stream spec and validation shards. The driver builds it to validate; every rank builds it again
(deterministically) to read."""

from __future__ import annotations

from dataclasses import dataclass

from kiln.data.sources import Source, check_shards_open, fingerprint, resolve_sources
from kiln.data.stream import StreamSpec


@dataclass
class DataPlan:
    sources: list[Source]
    tokenizer: object
    spec: StreamSpec
    val_urls: list[str]
    val_dtype: str


def load_source_tokenizer(source: Source, cache_dir: str):
    from kiln.data.sources import REMOTE, fetch_beside_manifest
    from kiln.data.tokenizer import tokenizer_from_manifest

    root = source.root
    if root.startswith(REMOTE) and source.tokenizer.get("type") != "byte":
        root = fetch_beside_manifest(source, source.tokenizer.get("file", "tokenizer.json"), cache_dir)
    return tokenizer_from_manifest(source.tokenizer, root)


def plan_data(cfg: dict, check_open: bool = False) -> DataPlan:
    data, tr = cfg["data"], cfg["trainer"]
    sources = resolve_sources(data)
    if check_open:
        check_shards_open(sources)
    tokenizer = load_source_tokenizer(sources[0], data["cache_dir"])
    spec = StreamSpec(
        sources=tuple(s.to_stream() for s in sources), seq_len=data["seq_len"],
        batch_size=tr["micro_batch_size"], eos_id=tokenizer.eos_id, seed=tr["seed"],
        shuffle_window=data["shuffle_buffer"], on_error=data["on_error"], fingerprint=fingerprint(sources),
    )
    with_val = [s for s in sources if s.val]
    val_urls = [u for s in with_val for u in s.val] or sources[0].train  # no val split: eval on train
    return DataPlan(sources, tokenizer, spec, val_urls, (with_val or sources)[0].dtype)
