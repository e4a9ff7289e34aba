"""Typed schema under the YAML in conf/.

Hydra merges every YAML file onto these dataclasses, so a misspelt key or a value of the
wrong type is rejected at composition time with the full key in the message
(e.g. ``Key 'n_layr' not in 'ModelConfig'``). Semantic checks live in ``validate.py``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, OmegaConf


@dataclass
class ModelConfig:
    name: str = MISSING
    n_layer: int = MISSING
    n_head: int = MISSING
    n_embd: int = MISSING
    block_size: int = MISSING
    # null: take the vocabulary size from the tokenizer saved beside the data shards.
    vocab_size: Optional[int] = None
    dropout: float = 0.0
    bias: bool = True
    # Start from these weights (a kiln checkpoint or kiln-export directory) with a fresh
    # optimizer and schedule: continued pretraining or fine-tuning.
    init_from: Optional[str] = None


@dataclass
class SourceConfig:
    """One entry of data.mixture."""

    path: str = MISSING
    weight: float = 1.0
    manifest: Optional[str] = None
    name: Optional[str] = None


@dataclass
class DataConfig:
    # A kiln-data directory, a brace pattern of shards, http(s) URLs, or a pipe: command
    # (see kiln/data/sources.py). null: kiln builds (once, then caches) a byte-level corpus
    # from this Python's own standard library source files.
    path: Optional[str] = None
    # Where manifest.json is, when it is not beside the shards (required for pipe: sources).
    manifest: Optional[str] = None
    # Evaluate on these shards instead of the sources' validation splits: a kiln-data directory
    # (its val split) or shards (brace pattern, URLs, pipe: commands) of the same tokenizer.
    val_path: Optional[str] = None
    # Several weighted sources instead of data.path: [{path: ..., weight: 0.7}, ...]
    mixture: List[SourceConfig] = field(default_factory=list)
    # raise: a bad shard or sample stops the run (naming it); skip: skip, count, warn once per shard.
    on_error: str = "raise"
    # false: when resuming a run, start the data stream over instead of continuing it exactly.
    resume_stream: bool = True
    # Tokens per training sequence; defaults to the model's context length.
    seq_len: int = "${model.block_size}"  # type: ignore[assignment]
    # DataLoader worker processes per rank (0 = read in the training process).
    num_workers: int = 1
    # Sampling (README "Data"; defaults chosen with scripts/bench_sampling.py): each reader reads
    # open_shards shards at once, merging their documents at random, packs blocks from
    # open_documents documents at once (each block from one drawn at random), and shuffles the
    # blocks in windows of shuffle_buffer blocks (0 or 1: no window shuffle). shuffle_documents:
    # read each local shard's documents in a fresh seeded order per pass (remote shards stream in
    # their stored order), so shards written in input order train as well as shuffled ones.
    shuffle_documents: bool = True
    open_shards: int = 16
    open_documents: int = 64
    shuffle_buffer: int = 4096
    # Where the default corpus is cached.
    cache_dir: str = "${oc.env:KILN_CACHE_DIR,${oc.env:HOME}/.cache/kiln}"


@dataclass
class ParallelismConfig:
    name: str = MISSING
    zero_stage: int = 2
    # "none" or "cpu": where ZeRO keeps optimizer state / (stage 3 only) parameters.
    offload_optimizer: str = "none"
    offload_param: str = "none"
    # Overlap gradient reduction with the backward pass (stages 1-2).
    overlap_comm: bool = False
    contiguous_gradients: bool = True


@dataclass
class PrecisionConfig:
    name: str = MISSING
    # bf16 | fp16 | fp32
    dtype: str = MISSING
    # fp16 dynamic loss scaling: initial scale is 2**initial_scale_power.
    initial_scale_power: int = 16
    loss_scale_window: int = 1000


@dataclass
class OptimConfig:
    name: str = "adamw"
    lr: float = 6e-4
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.1
    beta1: float = 0.9
    beta2: float = 0.95
    eps: float = 1e-8
    warmup_steps: int = 100
    grad_clip: float = 1.0


@dataclass
class TrainerConfig:
    max_steps: int = 1000
    micro_batch_size: int = 8
    grad_accum_steps: int = 1
    log_interval: int = 10
    eval_interval: int = 100
    # Micro-batches per rank that make up one evaluation.
    eval_batches: int = 8
    seed: int = 1337
    # The run's identity: checkpoints live in <launcher.storage_path>/<run_name>/.
    run_name: str = "kiln"
    # Save every N steps (0: only at the end and when stopped); keep the newest K.
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    # auto: continue this run_name's latest checkpoint if any; true: must; false: start fresh
    # (refuses if checkpoints exist); or a checkpoint directory to continue from.
    resume: str = "auto"


@dataclass
class LauncherConfig:
    # local | ray
    name: str = MISSING
    num_workers: int = 1
    # null: start a local Ray instance (or join $RAY_ADDRESS when set, as under `ray job submit`);
    # "auto", "host:port" or "ray://host:port": join that cluster.
    address: Optional[str] = None
    # auto | true | false: GPU workers where the cluster has GPUs.
    use_gpu: str = "auto"
    cpus_per_worker: int = 1
    # Where checkpoints (and Ray Train's run state) go: a local or shared directory, or a
    # cloud URI Ray supports (launcher=ray). null: ./checkpoints in the directory kiln-train runs from.
    storage_path: Optional[str] = None
    max_failures: int = 0
    # Name of the network interface gloo/NCCL should use between nodes (e.g. eth0, ib0).
    socket_ifname: Optional[str] = None
    # How Ray places the workers: PACK (fill a node first), SPREAD (one per node where it can),
    # STRICT_SPREAD (one per node, or wait), STRICT_PACK (all on one node).
    placement_strategy: str = "PACK"


@dataclass
class LoggerConfig:
    # wandb | none
    name: str = MISSING
    # auto | online | offline | disabled; auto = online when W&B credentials exist, else offline.
    mode: str = "auto"
    project: str = "kiln"
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)


@dataclass
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    parallelism: ParallelismConfig = field(default_factory=ParallelismConfig)
    precision: PrecisionConfig = field(default_factory=PrecisionConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    launcher: LauncherConfig = field(default_factory=LauncherConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    # Filled in by kiln-train on the driver: the run's absolute output directory.
    output_dir: Optional[str] = None


def register_configs() -> None:
    """Register the schema so that conf/train.yaml can list `train_schema` first in its defaults."""
    cs = ConfigStore.instance()
    cs.store(name="train_schema", node=TrainConfig)
    # hydra.sweep.subdir: a trial's directory named after its overrides (kiln/sweep.py).
    if not OmegaConf.has_resolver("kiln_trial"):
        from kiln.sweep import trial_dir_name

        OmegaConf.register_new_resolver("kiln_trial", trial_dir_name)
