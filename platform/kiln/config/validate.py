"""Semantic checks on the resolved config, run on the driver before any worker starts.

The schema (schema.py) already rejects unknown keys and wrong types; these checks catch values
that are well-typed but cannot work. Each error names the key and the fix.
"""

from __future__ import annotations

from kiln.errors import ConfigError

CHOICES = {
    "precision.dtype": ("bf16", "fp16", "fp32"),
    "parallelism.offload_optimizer": ("none", "cpu"),
    "parallelism.offload_param": ("none", "cpu"),
    "launcher.name": ("local", "ray"),
    "launcher.use_gpu": ("auto", "true", "false"),
    "launcher.placement_strategy": ("PACK", "SPREAD", "STRICT_PACK", "STRICT_SPREAD"),
    "logger.name": ("wandb", "none"),
    "logger.mode": ("auto", "online", "offline", "disabled"),
    "data.on_error": ("raise", "skip"),
}

POSITIVE = (
    "model.n_layer", "model.n_head", "model.n_embd", "model.block_size", "data.seq_len",
    "trainer.max_steps", "trainer.micro_batch_size", "trainer.grad_accum_steps",
    "trainer.log_interval", "trainer.eval_interval", "trainer.eval_batches", "launcher.cpus_per_worker",
    "data.open_shards", "data.open_documents",
)


def get(cfg: dict, key: str):
    node = cfg
    for part in key.split("."):
        node = node[part]
    return node


def validate_config(cfg: dict) -> None:
    """Checks that need nothing but the config itself."""
    for key, allowed in CHOICES.items():
        value = str(get(cfg, key)).lower() if key == "launcher.use_gpu" else get(cfg, key)
        if value not in allowed:
            raise ConfigError(key, f"{value!r} is not one of {list(allowed)}", f"set {key} to one of {list(allowed)}")
    for key in POSITIVE:
        if get(cfg, key) < 1:
            raise ConfigError(key, f"must be at least 1, got {get(cfg, key)}", f"set {key} to a positive integer")

    m = cfg["model"]
    if m["n_embd"] % m["n_head"] != 0:
        divisors = [h for h in range(1, min(m["n_embd"], 64) + 1) if m["n_embd"] % h == 0]
        raise ConfigError(
            "model.n_head",
            f"model.n_embd={m['n_embd']} is not divisible by model.n_head={m['n_head']} "
            f"(each head gets n_embd / n_head dimensions)",
            f"choose model.n_head from {divisors} or change model.n_embd",
        )
    if m["vocab_size"] is not None and m["vocab_size"] < 1:
        raise ConfigError("model.vocab_size", f"must be positive or null, got {m['vocab_size']}",
                          "set model.vocab_size=null to take it from the tokenizer")
    if cfg["data"]["seq_len"] > m["block_size"]:
        raise ConfigError(
            "data.seq_len",
            f"data.seq_len={cfg['data']['seq_len']} is longer than model.block_size={m['block_size']}, "
            f"the most positions the model has embeddings for",
            f"set data.seq_len <= {m['block_size']} or raise model.block_size",
        )
    if cfg["data"]["shuffle_buffer"] < 0:
        raise ConfigError("data.shuffle_buffer", f"must be >= 0, got {cfg['data']['shuffle_buffer']}",
                          "use 0 (no window shuffle) or a number of blocks (default 4096)")
    if cfg["data"]["num_workers"] < 0:
        raise ConfigError("data.num_workers", f"must be >= 0, got {cfg['data']['num_workers']}",
                          "use 0 to read in the training process, or a positive number of reader processes")
    if not 0 <= cfg["parallelism"]["zero_stage"] <= 3:
        raise ConfigError("parallelism.zero_stage", f"{cfg['parallelism']['zero_stage']} is not a ZeRO stage",
                          "use 0, 1, 2 or 3 (or pick a preset: parallelism=zero0|zero1|zero2|zero3)")
    if cfg["parallelism"]["offload_param"] != "none" and cfg["parallelism"]["zero_stage"] != 3:
        raise ConfigError("parallelism.offload_param", "parameter offload needs ZeRO stage 3",
                          "use parallelism=zero3_offload, or set parallelism.offload_param=none")

    lc = cfg["launcher"]
    if lc["num_workers"] < 1:
        raise ConfigError("launcher.num_workers", f"must be at least 1, got {lc['num_workers']}",
                          "set launcher.num_workers to the number of training processes (e.g. GPUs) you want")
    if lc["name"] == "local" and lc["num_workers"] != 1:
        raise ConfigError("launcher.num_workers", f"launcher=local runs one process, got {lc['num_workers']}",
                          "use launcher=ray for several workers, or set launcher.num_workers=1")
    if lc["max_failures"] < -1:
        raise ConfigError("launcher.max_failures", f"{lc['max_failures']} is invalid",
                          "use 0 (no retries), N retries, or -1 (retry forever)")
    tr = cfg["trainer"]
    for key in ("checkpoint_interval", "keep_checkpoints"):
        if tr[key] < 0:
            raise ConfigError(f"trainer.{key}", f"must be >= 0, got {tr[key]}",
                              "checkpoint_interval 0 = only at the end/when stopped; keep_checkpoints 0 = keep all")
    if not 0 <= cfg["model"]["dropout"] < 1:
        raise ConfigError("model.dropout", f"must be in [0, 1), got {cfg['model']['dropout']}",
                          "set model.dropout to a probability, e.g. 0.0 for pretraining or 0.1")
    opt = cfg["optim"]
    if opt["lr"] <= 0:
        raise ConfigError("optim.lr", f"must be positive, got {opt['lr']}", "set optim.lr, e.g. 6e-4")
    if not 0 <= opt["min_lr_ratio"] <= 1:
        raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {opt['min_lr_ratio']}",
                          "set the final learning rate as a fraction of optim.lr")


def validate_devices(cfg: dict, gpus_available: int) -> bool:
    """Checks against the hardware the launcher found; returns whether workers use GPUs."""
    want = str(cfg["launcher"]["use_gpu"]).lower()
    workers = cfg["launcher"]["num_workers"]
    if want == "true" and gpus_available < 1:
        raise ConfigError("launcher.use_gpu", "GPU workers were asked for but no GPU was found",
                          "set launcher.use_gpu=auto (or false) to train on CPU, or run where GPUs exist")
    use_gpu = want == "true" or (want == "auto" and gpus_available >= 1)
    if use_gpu and gpus_available < workers:
        raise ConfigError("launcher.num_workers",
                          f"{workers} GPU workers asked for, {gpus_available} GPU(s) available",
                          f"set launcher.num_workers<={gpus_available}, or launcher.use_gpu=false")
    if cfg["precision"]["dtype"] == "fp16" and not use_gpu:
        raise ConfigError("precision", "fp16 training needs a GPU, and none will be used by this run",
                          "use precision=bf16 (or fp32) on CPU; fp16 on CPU is unsupported by DeepSpeed")
    return use_gpu


def validate_data(cfg: dict, sources, tokenizer) -> None:
    """Checks that need the data's manifests: vocabulary fits, enough shards for all readers."""
    m = cfg["model"]
    if m["vocab_size"] is not None and m["vocab_size"] < tokenizer.vocab_size:
        raise ConfigError(
            "model.vocab_size",
            f"model.vocab_size={m['vocab_size']} is smaller than the data's tokenizer "
            f"({sources[0].tokenizer.get('type')}, {tokenizer.vocab_size} tokens, in {sources[0].root})",
            f"set model.vocab_size=null (or >= {tokenizer.vocab_size})",
        )
    ranks, workers = cfg["launcher"]["num_workers"], max(cfg["data"]["num_workers"], 1)
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
