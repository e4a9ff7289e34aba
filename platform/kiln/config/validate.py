"""Checks of the config against what the driver finds: the hardware and the data.

The schema (schema.py) rejects unknown keys, wrong types and unknown choices, and each section
checks its own values; these checks need more than the config. Each error names the key and the fix.
"""

from __future__ import annotations

from kiln.config.schema import Dtype, TrainConfig
from kiln.errors import ConfigError


def use_gpus(cfg: TrainConfig, gpus_available: int) -> bool:
    """The one device decision: whether this run's workers train on GPUs, given the GPUs the
    launcher found (launcher=local: this machine's; launcher=ray: the cluster's)."""
    want, workers = cfg.launcher.use_gpu, cfg.launcher.num_workers
    if want is True and gpus_available < 1:
        raise ConfigError("launcher.use_gpu", "GPU workers were asked for but no GPU was found",
                          "set launcher.use_gpu=null (or false) to train on CPU, or run where GPUs exist")
    use_gpu = want is True or (want is None and gpus_available >= 1)
    if use_gpu and gpus_available < workers:
        raise ConfigError("launcher.num_workers",
                          f"{workers} GPU workers asked for, {gpus_available} GPU(s) available",
                          f"set launcher.num_workers<={gpus_available}, or launcher.use_gpu=false")
    if cfg.precision.dtype == Dtype.fp16 and not use_gpu:
        raise ConfigError("precision", "fp16 training needs a GPU, and none will be used by this run",
                          "use precision=bf16 (or fp32) on CPU; fp16 on CPU is unsupported by DeepSpeed")
    return use_gpu


def validate_data(cfg: TrainConfig, sources, tokenizer) -> None:
    """Checks that need the data's manifests: vocabulary fits, enough shards for all readers."""
    vocab = cfg.model.vocab_size
    if vocab is not None and vocab < tokenizer.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"model.vocab_size={vocab} is smaller than the data's tokenizer "
            f"({sources[0].tokenizer.get('type')}, {tokenizer.vocab_size} tokens, in {sources[0].root})",
            f"set model.vocab_size=null (or >= {tokenizer.vocab_size})",
        )
    ranks, workers = cfg.launcher.num_workers, max(cfg.data.num_workers, 1)
    readers = ranks * workers
    for s in sources:
        if len(s.train) < readers:
            raise ConfigError(
                "data.num_workers",
                f"source {s.name} ({s.root}) has {len(s.train)} training shard(s) but the run has {readers} "
                f"readers ({ranks} ranks x {workers} DataLoader workers); each reader needs shards of its own",
                "lower data.num_workers or launcher.num_workers, or rebuild with smaller shards "
                "(kiln-data --shard-size)",
            )
