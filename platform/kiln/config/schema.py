"""The typed config: Hydra composes conf/ onto these dataclasses, and the dataclasses travel.

    conf/*.yaml + overrides -> Hydra (schema: misspelt keys, wrong types, unknown choices fail
    here, naming the key) -> load_config -> TrainConfig (validated; pickles across Ray)

Closed sets are enums (their values are the strings written in YAML); each section checks its own
values (`check`), TrainConfig the ones that span sections. Every error names the key and the fix.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from enum import Enum
from typing import List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kiln.errors import ConfigError
from kiln.model.config import GPTConfig, LlamaConfig


class Choice(str, Enum):
    """A closed set of strings: compares equal to its value and prints as it."""

    def __str__(self) -> str:
        return self.value

    def __format__(self, spec: str) -> str:
        return format(self.value, spec)


class Dtype(Choice):
    bf16 = "bf16"
    fp16 = "fp16"
    fp32 = "fp32"


class Offload(Choice):
    none = "none"
    cpu = "cpu"


class Arch(Choice):
    gpt2 = "gpt2"    # kiln.model.gpt: GPT-2 (LayerNorm, GELU, learned positions, biases, tied head)
    llama = "llama"  # kiln.model.llama: RMSNorm, SwiGLU, rotary positions, no biases, grouped-query attention


class Checkpointing(Choice):
    none = "none"            # keep every block's activations for the backward pass
    selective = "selective"  # recompute every other block: about half the activation memory
    full = "full"            # recompute every block: the least memory, about a third more compute


class NonFinite(Choice):
    stop = "stop"  # a non-finite loss or gradient stops the run (its last checkpoint kept)
    skip = "skip"  # the optimizer skips that step; counted, up to trainer.max_skipped_steps


class LauncherName(Choice):
    local = "local"
    ray = "ray"


class Placement(Choice):
    PACK = "PACK"
    SPREAD = "SPREAD"
    STRICT_PACK = "STRICT_PACK"
    STRICT_SPREAD = "STRICT_SPREAD"


class LoggerName(Choice):
    wandb = "wandb"
    none = "none"


class LoggerMode(Choice):
    auto = "auto"
    online = "online"
    offline = "offline"
    disabled = "disabled"


# `raise` is a keyword, hence the functional form (members OnError["raise"], OnError.skip).
OnError = Choice("OnError", [("raise", "raise"), ("skip", "skip")], module=__name__, qualname="OnError")


class ResumeMode(Choice):
    auto = "auto"        # a named run continues its latest checkpoint, if it has one
    require = "require"  # continue, and fail if there is nothing to continue
    never = "never"      # start fresh, and refuse if the run already has checkpoints


def _positive(section: str, obj, *names: str) -> None:
    for name in names:
        value = getattr(obj, name)
        if value < 1:
            key = f"{section}.{name}"
            raise ConfigError(key, f"must be at least 1, got {value}", f"set {key} to a positive integer")


@dataclass
class ModelConfig:
    name: str = MISSING
    arch: Arch = Arch.gpt2
    n_layer: int = MISSING
    n_head: int = MISSING
    n_embd: int = MISSING
    block_size: int = MISSING
    # null: take the vocabulary size from the tokenizer saved beside the data shards.
    vocab_size: Optional[int] = None
    # Round the vocabulary up to a multiple of this (64: GPT-2's 50257 becomes 50304, whose
    # matrices tile evenly on tensor cores); the extra rows are never sampled.
    pad_vocab_multiple: int = 1
    dropout: float = 0.0
    bias: bool = True
    # arch=llama only. n_kv_head: key/value heads (grouped-query attention; null = n_head);
    # ffn_hidden: SwiGLU width (null = 8/3 n_embd rounded up to a multiple of 256, as Llama);
    # tie_embeddings: share the LM head with the token embedding (null: gpt2 always, llama not).
    n_kv_head: Optional[int] = None
    ffn_hidden: Optional[int] = None
    rope_theta: float = 10000.0
    norm_eps: float = 1e-5
    tie_embeddings: Optional[bool] = None
    # Start from these weights (a kiln checkpoint or kiln-export directory) with a fresh
    # optimizer and schedule: continued pretraining or fine-tuning.
    init_from: Optional[str] = None

    def build(self, tokenizer_vocab: int) -> GPTConfig | LlamaConfig:
        """The model's own config; a null vocab_size takes the tokenizer's."""
        vocab = self.vocab_size or tokenizer_vocab
        vocab = -(-vocab // self.pad_vocab_multiple) * self.pad_vocab_multiple
        if self.arch == Arch.llama:
            return LlamaConfig(vocab_size=vocab, n_layer=self.n_layer, n_head=self.n_head, n_embd=self.n_embd,
                               block_size=self.block_size, n_kv_head=self.n_kv_head or self.n_head,
                               ffn_hidden=self.ffn_hidden or -(-8 * self.n_embd // 3 // 256) * 256,
                               rope_theta=float(self.rope_theta), norm_eps=float(self.norm_eps),
                               tie_embeddings=bool(self.tie_embeddings), dropout=self.dropout)
        return GPTConfig(vocab_size=vocab, n_layer=self.n_layer, n_head=self.n_head,
                         n_embd=self.n_embd, block_size=self.block_size, dropout=self.dropout, bias=self.bias)

    def check(self) -> None:
        _positive("model", self, "n_layer", "n_head", "n_embd", "block_size", "pad_vocab_multiple")
        if self.n_embd % self.n_head != 0:
            divisors = [h for h in range(1, min(self.n_embd, 64) + 1) if self.n_embd % h == 0]
            raise ConfigError("model.n_head", f"model.n_embd={self.n_embd} is not divisible by "
                              f"model.n_head={self.n_head} (each head gets n_embd / n_head dimensions)",
                              f"choose model.n_head from {divisors} or change model.n_embd")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ConfigError("model.vocab_size", f"must be positive or null, got {self.vocab_size}",
                              "set model.vocab_size=null to take it from the tokenizer")
        if not 0 <= self.dropout < 1:
            raise ConfigError("model.dropout", f"must be in [0, 1), got {self.dropout}",
                              "set model.dropout to a probability, e.g. 0.0 for pretraining or 0.1")
        if self.arch == Arch.llama:
            self._check_llama()
            return
        for key in ("n_kv_head", "ffn_hidden"):
            if getattr(self, key) is not None:
                raise ConfigError(f"model.{key}", f"is a Llama setting; this model is model.arch=gpt2",
                                  f"remove model.{key}, or use a Llama preset (model=llama-tiny, model=llama-1b)")
        if self.tie_embeddings is False:
            raise ConfigError("model.tie_embeddings", "GPT-2 always ties its LM head to the token embedding",
                              "remove model.tie_embeddings, or use model.arch=llama for an untied head")

    def _check_llama(self) -> None:
        if self.bias:
            raise ConfigError("model.bias", "a Llama model has no biases (model.arch=llama)",
                              "set model.bias=false (the llama presets do)")
        kv = self.n_kv_head or self.n_head
        if kv < 1 or self.n_head % kv:
            options = [h for h in range(1, self.n_head + 1) if self.n_head % h == 0]
            raise ConfigError("model.n_kv_head", f"{kv} key/value heads cannot be shared evenly by "
                              f"model.n_head={self.n_head} query heads", f"choose model.n_kv_head from {options}")
        if (self.n_embd // self.n_head) % 2:
            raise ConfigError("model.n_head", f"the head size n_embd / n_head = {self.n_embd // self.n_head} is odd; "
                              f"rotary positions rotate pairs of dimensions", "choose n_head so the head size is even")
        if self.ffn_hidden is not None and self.ffn_hidden < 1:
            raise ConfigError("model.ffn_hidden", f"must be positive or null, got {self.ffn_hidden}",
                              "set the SwiGLU width (null: 8/3 n_embd rounded up to 256)")
        if not self.rope_theta > 0 or not self.norm_eps > 0:
            key = "model.rope_theta" if not self.rope_theta > 0 else "model.norm_eps"
            raise ConfigError(key, "must be > 0", "rope_theta 10000 (Llama 2) or 500000 (Llama 3); norm_eps 1e-5")


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
    on_error: OnError = OnError["raise"]
    # false: when resuming a run, start the data stream over instead of continuing it exactly.
    resume_stream: bool = True
    # A shard streamed through a process (http(s), pipe:, gs:// ...) that sends no byte for this
    # long fails, naming it; a DataLoader worker that sends no batch for twice this plus a minute
    # fails, naming its shards (a hung mount). null: wait for ever.
    read_timeout_s: Optional[float] = 300.0
    # Tokens per training sequence; defaults to the model's context length.
    seq_len: int = "${model.block_size}"  # type: ignore[assignment]
    # DataLoader worker processes per rank (0 = read in the training process).
    num_workers: int = 1
    # Sampling (README "Data"; defaults chosen with scripts/bench_sampling.py): each reader reads
    # open_shards shards at once, merging their documents at random, packs blocks from
    # open_documents documents at once (each block from one drawn at random), and shuffles the
    # blocks in windows of shuffle_buffer blocks (0 or 1: no window shuffle). shuffle_documents:
    # read each local shard's documents in a fresh seeded order per pass (remote shards stream in
    # their stored order), so shards written in input order train as well as shuffled ones; null:
    # only where kiln-data did not already shuffle them (its manifest says), true/false: always/never.
    shuffle_documents: Optional[bool] = None
    open_shards: int = 16
    open_documents: int = 64
    shuffle_buffer: int = 4096
    # Where the default corpus is cached.
    cache_dir: str = "${oc.env:KILN_CACHE_DIR,${oc.env:HOME}/.cache/kiln}"

    @classmethod
    def from_dict(cls, d: dict) -> "DataConfig":
        """A data section saved as plain data (a checkpoint's meta.json), keys of other versions ignored."""
        known = {f.name for f in fields(cls)} - {"mixture"}
        out = cls(**{k: v for k, v in d.items() if k in known})
        source_keys = {f.name for f in fields(SourceConfig)}
        out.mixture = [SourceConfig(**{k: v for k, v in m.items() if k in source_keys}) for m in d.get("mixture", [])]
        return out

    def check(self) -> None:
        _positive("data", self, "seq_len", "open_shards", "open_documents")
        if self.read_timeout_s is not None and not self.read_timeout_s > 0:
            raise ConfigError("data.read_timeout_s", f"must be > 0 seconds, got {self.read_timeout_s}",
                              "set a positive number of seconds, or null to wait for ever")
        if self.shuffle_buffer < 0:
            raise ConfigError("data.shuffle_buffer", f"must be >= 0, got {self.shuffle_buffer}",
                              "use 0 (no window shuffle) or a number of blocks (default 4096)")
        if self.num_workers < 0:
            raise ConfigError("data.num_workers", f"must be >= 0, got {self.num_workers}",
                              "use 0 to read in the training process, or a positive number of reader processes")


@dataclass
class ParallelismConfig:
    name: str = MISSING
    zero_stage: int = 2
    # Where ZeRO keeps optimizer state / (stage 3 only) parameters.
    offload_optimizer: Offload = Offload.none
    offload_param: Offload = Offload.none
    # Overlap gradient reduction (and, stage 3, parameter gathers) with compute on a side
    # stream. null: on GPUs; off on a CPU, which has no streams to overlap on.
    overlap_comm: Optional[bool] = None
    contiguous_gradients: bool = True
    # Elements per gradient-reduction / all-gather bucket (DeepSpeed's reduce_bucket_size and
    # allgather_bucket_size): bigger buckets, fewer and larger collectives.
    bucket_size: int = 500_000_000
    # Stage 3: parameters below this many elements are kept whole on every rank instead of being
    # gathered at each use (null: DeepSpeed's default, 100k; 0 shards even LayerNorm gains: tests).
    param_persistence_threshold: Optional[int] = None

    def check(self) -> None:
        if not 0 <= self.zero_stage <= 3:
            raise ConfigError("parallelism.zero_stage", f"{self.zero_stage} is not a ZeRO stage",
                              "use 0, 1, 2 or 3 (or pick a preset: parallelism=zero0|zero1|zero2|zero3)")
        if self.bucket_size < 1:
            raise ConfigError("parallelism.bucket_size", f"must be at least 1, got {self.bucket_size}",
                              "elements per communication bucket: DeepSpeed's default is 500000000")
        if self.param_persistence_threshold is not None and self.param_persistence_threshold < 0:
            raise ConfigError("parallelism.param_persistence_threshold", f"must be >= 0 or null, got "
                              f"{self.param_persistence_threshold}", "null keeps DeepSpeed's default (100000)")
        if self.offload_param != Offload.none and self.zero_stage != 3:
            raise ConfigError("parallelism.offload_param", "parameter offload needs ZeRO stage 3",
                              "use parallelism=zero3_offload, or set parallelism.offload_param=none")


@dataclass
class PrecisionConfig:
    name: str = MISSING
    dtype: Dtype = MISSING
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

    def check(self) -> None:
        if self.lr <= 0:
            raise ConfigError("optim.lr", f"must be positive, got {self.lr}", "set optim.lr, e.g. 6e-4")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ConfigError("optim.min_lr_ratio", f"must be in [0, 1], got {self.min_lr_ratio}",
                              "set the final learning rate as a fraction of optim.lr")
        # Caught here, not by torch inside every worker (an 11-frame traceback per rank).
        for name in ("beta1", "beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"optim.{name}", f"must be in [0, 1), got {getattr(self, name)}",
                                  "AdamW's moment decay rates: beta1 0.9 and beta2 0.95 are the usual choice")
        for name, fix in (("weight_decay", "0 turns it off; 0.1 is usual"),
                          ("grad_clip", "0 turns clipping off; 1.0 is usual"),
                          ("warmup_steps", "0 starts the decay at step 1")):
            if getattr(self, name) < 0:
                raise ConfigError(f"optim.{name}", f"must be >= 0, got {getattr(self, name)}", fix)
        if not self.eps > 0:
            raise ConfigError("optim.eps", f"must be > 0, got {self.eps}", "AdamW's denominator term: 1e-8 is usual")


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
    # The run's identity: checkpoints live in <launcher.storage_path>/<run_name>/. A named run
    # continues its checkpoints (resume=auto); null: a new run with a fresh name each time.
    run_name: Optional[str] = None
    # Save every N steps (0: only at the end and when stopped); keep the newest K.
    checkpoint_interval: int = 500
    keep_checkpoints: int = 2
    resume: ResumeMode = ResumeMode.auto
    # Start from this checkpoint directory (a step_* of another run): a new run branching from it.
    resume_from: Optional[str] = None
    # One device's peak TFLOP/s that MFU is measured against; null: kiln's table of GPUs (dense
    # bf16, kiln.model.flops), and no MFU on a CPU or an unknown GPU.
    peak_tflops: Optional[float] = None
    # torch.compile the model: null = on GPUs (the kernels fuse), off on CPUs (compiling costs
    # more than it saves there); true/false force it.
    compile: Optional[bool] = None
    # Recompute activations in the backward pass instead of keeping them (see Checkpointing).
    activation_checkpointing: Checkpointing = Checkpointing.none
    # A step whose loss or gradient is not finite: stop the run, or skip it (DeepSpeed's optimizer
    # leaves parameters and state as they were) and stop once more than max_skipped_steps did.
    on_nonfinite: NonFinite = NonFinite.stop
    max_skipped_steps: int = 10
    # Loss-spike guard (kiln/training/spikes.py; null: off): a log interval's mean loss more than
    # spike_threshold standard deviations above the mean of the last spike_window intervals rolls
    # the run back to its last checkpoint and skips the data from there to the spike (events.jsonl
    # says so); more than spike_max_rollbacks spikes stop the run.
    spike_threshold: Optional[float] = None
    spike_window: int = 20
    spike_max_rollbacks: int = 3
    # Plan the run, print the plan and its memory estimate (kiln/estimate.py), start nothing.
    dry_run: bool = False
    # GiB one device may use, checked against the memory estimate before launch; null: a GPU's
    # own size (no check on a CPU run).
    device_memory_gib: Optional[float] = None

    def check(self) -> None:
        _positive("trainer", self, "max_steps", "micro_batch_size", "grad_accum_steps", "log_interval",
                  "eval_interval", "eval_batches")
        if self.device_memory_gib is not None and not self.device_memory_gib > 0:
            raise ConfigError("trainer.device_memory_gib", f"must be > 0 or null, got {self.device_memory_gib}",
                              "give one device's usable memory in GiB (e.g. 80), or null to detect a GPU's")
        self.check_spike_guard()
        for name in ("checkpoint_interval", "keep_checkpoints", "max_skipped_steps"):
            if getattr(self, name) < 0:
                raise ConfigError(f"trainer.{name}", f"must be >= 0, got {getattr(self, name)}",
                                  "checkpoint_interval 0 = only at the end/when stopped; keep_checkpoints 0 = keep all")
        if self.run_name is not None and (not self.run_name.strip() or "/" in self.run_name):
            raise ConfigError("trainer.run_name", f"{self.run_name!r} cannot name a checkpoint directory",
                              "use a non-empty name without '/'")
        if self.peak_tflops is not None and not self.peak_tflops > 0:
            raise ConfigError("trainer.peak_tflops", f"must be > 0, got {self.peak_tflops}",
                              "give one device's peak in TFLOP/s (H100 SXM bf16: 989), or null for kiln's table")
        if self.resume_from is not None and self.resume != ResumeMode.auto:
            raise ConfigError("trainer.resume_from", f"trainer.resume_from is set with trainer.resume={self.resume}",
                              "leave trainer.resume=auto: resume_from already says where to start")

    def check_spike_guard(self) -> None:
        if self.spike_threshold is None:
            return
        if not self.spike_threshold > 0:
            raise ConfigError("trainer.spike_threshold", f"must be > 0 standard deviations or null, got "
                              f"{self.spike_threshold}", "e.g. 6 (a loss far above its recent mean), or null for off")
        if self.spike_window < 2:
            raise ConfigError("trainer.spike_window", f"must be at least 2 log intervals, got {self.spike_window}",
                              "e.g. 20: the recent intervals a loss is compared with")
        if self.spike_max_rollbacks < 0:
            raise ConfigError("trainer.spike_max_rollbacks", f"must be >= 0, got {self.spike_max_rollbacks}",
                              "the number of spikes to roll back before the run stops, e.g. 3")
        if self.checkpoint_interval == 0:
            raise ConfigError("trainer.spike_threshold", "the loss-spike guard rolls back to the last checkpoint, and "
                              "trainer.checkpoint_interval=0 saves none during the run",
                              "set trainer.checkpoint_interval (e.g. 200), or trainer.spike_threshold=null")


@dataclass
class LauncherConfig:
    name: LauncherName = MISSING
    num_workers: int = 1
    # null: start a local Ray instance (or join $RAY_ADDRESS when set, as under `ray job submit`);
    # "auto", "host:port" or "ray://host:port": join that cluster.
    address: Optional[str] = None
    # null: GPU workers where the cluster has GPUs; true: GPUs or fail; false: CPUs.
    use_gpu: Optional[bool] = None
    cpus_per_worker: int = 1
    # Where checkpoints (and Ray Train's run state) go: a local or shared directory, or a
    # cloud URI Ray supports (launcher=ray). null: ./checkpoints in the directory kiln-train runs from.
    storage_path: Optional[str] = None
    max_failures: int = 0
    # Name of the network interface gloo/NCCL should use between nodes (e.g. eth0, ib0).
    socket_ifname: Optional[str] = None
    # How Ray places the workers: PACK (fill a node first), SPREAD (one per node where it can),
    # STRICT_SPREAD (one per node, or wait), STRICT_PACK (all on one node).
    placement_strategy: Placement = Placement.PACK
    # Seconds a collective may wait for the other ranks before the run fails naming it (torch's
    # own default is 30 minutes of a hung job). It must outlast the slowest legitimate wait: a
    # checkpoint save to slow storage, the first step's compilation.
    timeout_s: int = 600

    def check(self) -> None:
        if self.num_workers < 1:
            raise ConfigError("launcher.num_workers", f"must be at least 1, got {self.num_workers}",
                              "set launcher.num_workers to the number of training processes (e.g. GPUs) you want")
        _positive("launcher", self, "cpus_per_worker", "timeout_s")
        if self.name == LauncherName.local and self.num_workers != 1:
            raise ConfigError("launcher.num_workers", f"launcher=local runs one process, got {self.num_workers}",
                              "use launcher=ray for several workers, or set launcher.num_workers=1")
        if self.max_failures < -1:
            raise ConfigError("launcher.max_failures", f"{self.max_failures} is invalid",
                              "use 0 (no retries), N retries, or -1 (retry forever)")


@dataclass
class LoggerConfig:
    name: LoggerName = MISSING
    # auto: WANDB_MODE (or WANDB_DISABLED) where set, else online with W&B credentials, offline without.
    mode: LoggerMode = LoggerMode.auto
    # Unset (null/empty) fields leave the choice to W&B's own variables (WANDB_PROJECT, WANDB_ENTITY,
    # WANDB_RUN_GROUP, WANDB_TAGS, WANDB_NOTES); project falls back to "kiln" (tracking/wandb_run.py).
    project: Optional[str] = None
    entity: Optional[str] = None
    group: Optional[str] = None
    tags: List[str] = field(default_factory=list)
    notes: Optional[str] = None
    # How long rank 0 waits for W&B to start online before it logs offline instead (W&B's own default
    # is 90 s; a working connection starts in a few seconds).
    init_timeout_s: float = 30.0

    def check(self) -> None:
        if not self.init_timeout_s > 0:
            raise ConfigError("logger.init_timeout_s", f"{self.init_timeout_s} is not a positive number of seconds",
                              "set it to how long W&B may take to start online, e.g. logger.init_timeout_s=30")


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

    def check(self) -> None:
        """Every check that needs nothing but the config itself (the driver runs it before any
        worker starts; checks against data and hardware come with the run plan)."""
        for section in (self.model, self.data, self.parallelism, self.optim, self.trainer, self.launcher, self.logger):
            section.check()
        if (self.trainer.on_nonfinite == NonFinite.skip and self.parallelism.zero_stage == 0
                and self.precision.dtype == Dtype.fp32):
            raise ConfigError("trainer.on_nonfinite", "skip needs one of DeepSpeed's ZeRO or mixed-precision "
                              "optimizers, which leave a non-finite step unapplied; ZeRO-0 in fp32 steps the plain "
                              "torch optimizer", "use parallelism=zero1 (or higher) or precision=bf16, or "
                              "trainer.on_nonfinite=stop")
        if self.data.seq_len > self.model.block_size:
            raise ConfigError("data.seq_len", f"data.seq_len={self.data.seq_len} is longer than "
                              f"model.block_size={self.model.block_size}, the most positions the model has "
                              f"embeddings for", f"set data.seq_len <= {self.model.block_size} or raise model.block_size")

    def to_dict(self) -> dict:
        """Plain data (enums as their strings): for W&B, checkpoint metadata and YAML."""
        return _plain(asdict(self))


def _plain(value):
    if isinstance(value, Enum):
        return value.value
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return value


def load_config(cfg: DictConfig) -> TrainConfig:
    """The composed config as the typed, checked TrainConfig (interpolations resolved)."""
    typed = OmegaConf.to_object(cfg)
    if not isinstance(typed, TrainConfig):  # composed without the schema (a stray config tree)
        raise ConfigError("defaults", "the config was not composed onto kiln's schema",
                          "list `train_schema` first in the defaults of train.yaml")
    typed.check()
    return typed


def register_configs() -> None:
    """Register the schema so that conf/train.yaml can list `train_schema` first in its defaults."""
    ConfigStore.instance().store(name="train_schema", node=TrainConfig)
