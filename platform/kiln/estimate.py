"""Memory per device, estimated on the driver before launch, and the check that the run fits.

    RunPlan (model shape, parallelism, precision, micro-batch, seq_len, checkpointing, world size)
        -> estimate: bytes per device, term by term (below)
        -> check_fits: refuse (ConfigError, exit 2) a run that cannot fit, naming settings that do

No torch here (only `device_limit` imports it, to read the GPU's size): the driver uses this
before any worker exists. Bytes per device, P parameters, N ranks, e = 2 (bf16/fp16) or 4 (fp32):

- parameters, gradients, optimizer states: the ZeRO paper's accounting (Rajbhandari et al. 2020,
  section 3.1): mixed-precision Adam holds 2 + 2 + 12 bytes per parameter (16-bit weights, 16-bit
  gradients, fp32 master weights + Adam's two moments); ZeRO-1 divides the 12 by N, ZeRO-2 also
  the gradients, ZeRO-3 also the weights. `model_states` says where kiln's DeepSpeed setup
  (engine/ds_config.py, DeepSpeed 0.19) departs from it: fp32 gradient accumulation under bf16
  (4 bytes, not 2), ZeRO-1 bf16's whole fp32 gradient, fp32 runs without a master copy at
  ZeRO-0/3, the reduce buckets, ZeRO-3's gathered working set and the whole model it is handed
  at the start. Offload moves the optimizer states (and their fp32 gradients; ZeRO-3 also the
  weights) to host memory, reported apart.
- activations: Korthikanti et al. 2022 count s*b*h*(34 + 5*a*s/h) bytes per layer (16-bit, with
  dropout). kiln's attention is SDPA (flash / memory-efficient kernels), which keeps q, k, v, its
  output and a log-sum-exp instead of the a*s^2 score and softmax matrices, and dropout 0 keeps
  no masks: per layer s*b*h*16*e for a GPT-2 block (32 bytes per element of h in bf16; 34 with the
  two dropout masks), s*b*(h*(8 + 8*e) + 4*e*F) for a Llama block (fp32 RMSNorm copies, SwiGLU's
  four F-wide tensors); see `layer_bytes`. A checkpointed block keeps only its input (s*b*h*e),
  plus one block recomputed at a time in the backward pass.
- logits and loss: the bf16/fp32 logits and the loss's gradient buffer of the same size, 2*s*b*V*e,
  alive together at the end of the forward pass, plus one fp32 chunk of the chunked loss
  (kiln/model/loss.py).
- the optimizer step: where it needs more than the activations it follows (ZeRO-0 mixed precision
  copies every gradient to fp32 first), the excess counts.

Measured against real runs: docs/performance.md ("Memory estimate"), scripts/bench_memory.py.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from kiln.config.schema import Checkpointing, Offload
from kiln.errors import ConfigError
from kiln.model.config import LlamaConfig

GIB = 2**30
CHUNK_LOGITS = 2**25  # kiln.model.loss.CHUNK_LOGITS (imported there with torch; kept equal by a test)
# A detected GPU's total memory is not all the allocator's: the CUDA context, cuDNN/cuBLAS
# workspaces and the caching allocator's fragmentation take some.
GPU_USABLE_FRACTION, GPU_RESERVED_BYTES = 0.95, GIB // 2
MEMORY_OPT_ALLREDUCE_SIZE = 500_000_000  # DeepSpeed's elements per ZeRO-0 all-reduce bucket (engine.py)


def count_params(model) -> int:
    """The model's parameters, a tied LM head once (kiln.model.gpt / llama's num_params, without torch)."""
    h, L, V = model.n_embd, model.n_layer, model.vocab_size
    if isinstance(model, LlamaConfig):
        kv = model.n_kv_head * (h // model.n_head)
        block = 2 * h + 2 * h * h + 2 * h * kv + 3 * h * model.ffn_hidden
        return V * h + L * block + h + (0 if model.tie_embeddings else V * h)
    block = 12 * h * h + (13 * h if model.bias else 2 * h)
    return V * h + model.block_size * h + L * block + (2 * h if model.bias else h)


def largest_tensor(model) -> int:
    """Elements of the biggest single parameter (the embedding, or a block's widest matrix)."""
    h = model.n_embd
    widest = h * model.ffn_hidden if isinstance(model, LlamaConfig) else 4 * h * h
    return max(model.vocab_size * h, widest)


def layer_bytes(model, s: int, b: int, e: int) -> int:
    """Bytes one Transformer block keeps for its backward pass (what autograd saves).

    GPT-2 block, elements of s*b*h each: ln_1 input 1, c_attn input 1, q/k/v 3 (views of one
    tensor, kept by SDPA), attention output 1 (kept by SDPA and c_proj), ln_2 input 1, c_fc input 1,
    GELU input 4, MLP c_proj input 4: 16, times e bytes. Llama block: each RMSNorm keeps an fp32
    copy of its input, its e-byte normalised value and output (4 + 2e bytes); attention keeps the
    rotated q and k, v (k and v repeated to n_head under grouped-query attention) and its output
    (4e); SwiGLU keeps gate, silu(gate), up and their product (4e per element of F). Both: SDPA's
    fp32 log-sum-exp (4 bytes per head and token), the norms' fp32 statistics, and one byte per
    element for each of the two dropout masks when model.dropout > 0 (as Korthikanti et al.).
    """
    h, a = model.n_embd, model.n_head
    masks = 2 * h if model.dropout > 0 else 0
    if isinstance(model, LlamaConfig):
        per_token = 2 * (4 + 2 * e) * h + 4 * e * h + 4 * e * model.ffn_hidden + 4 * a + 8
    else:
        per_token = 16 * e * h + 4 * a + 16
    return s * b * (per_token + masks)


def outside_blocks_bytes(model, s: int, b: int, e: int) -> int:
    """The final norm's input and output (kept for it and for the LM head), token ids and targets."""
    h = model.n_embd
    norm = (4 + 2 * e) * h if isinstance(model, LlamaConfig) else 2 * e * h + 8
    return s * b * (norm + 16 + (h if model.dropout > 0 else 0))


def activation_bytes(model, s: int, b: int, e: int, checkpointing: str) -> int:
    """All blocks' kept activations under trainer.activation_checkpointing (kiln.model.recompute:
    selective checkpoints blocks 0, 2, 4, ...; full every block), plus one block recomputed at a
    time in the backward pass."""
    L = model.n_layer
    recomputed = {"none": 0, "selective": (L + 1) // 2, "full": L}[str(checkpointing)]
    kept = (L - recomputed) * layer_bytes(model, s, b, e) + recomputed * s * b * model.n_embd * e
    again = layer_bytes(model, s, b, e) if recomputed else 0
    return kept + again + outside_blocks_bytes(model, s, b, e)


def loss_bytes(model, s: int, b: int, e: int) -> int:
    """Logits (e bytes each) and the loss's gradient buffer (the same), alive together when the
    forward pass ends, plus one chunk's fp32 temporaries (kiln.model.loss: the upcast chunk and its
    softmax; in fp32 the upcast is the logits themselves, and a single chunk is the buffer)."""
    n, V = s * b, model.vocab_size
    chunk = min(n, max(1, CHUNK_LOGITS // V)) * V
    if e == 4:
        temps = 0 if chunk == n * V else 4 * chunk
    else:
        temps = 8 * chunk
    return 2 * n * V * e + temps


@dataclass(frozen=True)
class Estimate:
    """Bytes on one device (and, for offload, in the host memory of each rank)."""

    parameters: int
    gradients: int
    optimizer: int
    activations: int
    logits: int
    buffers: int  # ZeRO's gradient-reduction buckets
    step: int  # the optimizer step's temporaries (they take the freed activations' place)
    host: int  # offloaded states, per rank, in host memory
    on_gpu: bool
    n_params: int
    world_size: int
    init: int = 0  # ZeRO-3 is handed the whole model on the device, then partitions it

    @property
    def device(self) -> int:
        states = self.parameters + self.gradients + self.optimizer + self.buffers
        return max(states + max(self.activations + self.logits, self.step), self.init)

    @property
    def peak(self) -> int:
        """What a limit is checked against: on a CPU run the offloaded states share the same memory."""
        return self.device if self.on_gpu else self.device + self.host

    @property
    def unit(self) -> str:
        return "GiB" if self.peak >= GIB else "MiB"

    def terms(self) -> str:
        u = self.unit
        parts = [("params", self.parameters), ("grads", self.gradients), ("optimizer", self.optimizer),
                 ("activations", self.activations), ("logits", self.logits), ("buffers", self.buffers)]
        text = " + ".join(f"{name} {size(v, u)}" for name, v in parts if v) + f" {u}"
        if self.step > self.activations + self.logits:
            text += f" (the optimizer step's {size(self.step, u)} {u} in place of activations + logits)"
        if self.init and self.init >= self.device:
            text += f" (at the start: the whole model, {size(self.init, u)} {u}, before ZeRO-3 partitions it)"
        return text


def size(n: int | float, unit: str) -> str:
    return f"{n / GIB:.2f}" if unit == "GiB" else f"{n / 2**20:.1f}"


def gib(n: int | float) -> str:
    return size(n, "GiB")


def model_states(cfg, P: int, big: int, N: int, on_gpu: bool) -> dict:
    """Parameters, gradients, optimizer states, buckets, step temporaries and offloaded bytes per
    device for kiln's DeepSpeed setup (engine/ds_config.py; the classes named are DeepSpeed 0.19's).

    ZeRO-0 mixed precision: FP16_UnfusedOptimizer (torch's AdamW is not FusedAdam): 16-bit weights
    and gradients, fp32 master + moments (12), and at the step an fp32 copy of every gradient (4).
    ZeRO-0 fp32: the plain torch optimizer: 4 + 4 + 8 (the weights are the master copy). Both
    flatten the gradients into one bucket for their all-reduce before the step (e P).
    ZeRO-1 bf16 (fp32 accumulation, no offload): BF16_Optimizer: a whole fp32 gradient (4 P), 12 P/N.
    ZeRO-1 otherwise, ZeRO-2: DeepSpeedZeroOptimizer: gradients P/N in the accumulation dtype (fp32
    under bf16: kiln sets grad_accum_dtype; ZeRO-1 keeps whole gradients), master + moments 12 P/N
    (fp32 clones the master too), and a reduce bucket of parallelism.bucket_size elements (two
    with overlap_comm). ZeRO-3: weights e P/N plus two gathered tensors (the one in use, the one
    prefetched), gradients P/N plus one whole gradient before its reduce-scatter, a bucket.
    Offload: master, moments and fp32 gradients (and ZeRO-3 weights) in host memory, stepped by
    DeepSpeed's CPU Adam in place.
    """
    par, dtype = cfg.parallelism, str(cfg.precision.dtype)
    stage, mixed = par.zero_stage, dtype != "fp32"
    e = 4 if dtype == "fp32" else 2
    accum = 4 if dtype in ("bf16", "fp32") else 2  # gradient accumulation dtype (ds_config.py)
    off_opt = stage >= 1 and str(par.offload_optimizer) != "none"  # ZeRO-0 has no offload
    off_par = stage == 3 and str(par.offload_param) != "none"
    overlap = on_gpu if par.overlap_comm is None else bool(par.overlap_comm)
    # A CPU process's RSS counts only the pages written: of a bucket, the gradients that pass through it.
    bucket = (par.bucket_size if on_gpu else min(par.bucket_size, P)) if par.contiguous_gradients else 0
    # torch's AdamW on a GPU is fused (no temporaries); on a CPU its per-tensor loop allocates two
    # fp32 temporaries (sqrt, divide) of the tensor it updates: the largest one, or ZeRO's flat partition.
    adam_tmp = 0 if on_gpu else 8 * (big if stage == 0 else -(-P // N))
    part = -(-P // N)
    s = dict(parameters=e * P, gradients=0, optimizer=0, buffers=0, step=0, host=0)
    if stage == 0:
        # the step: the gradients flattened for their all-reduce (DeepSpeed's buffered fallback),
        # then, apart, their fp32 copies (mixed precision) and AdamW's temporaries
        step = max(e * min(P, MEMORY_OPT_ALLREDUCE_SIZE), (4 * P if mixed else 0) + adam_tmp)
        s.update(gradients=e * P, optimizer=(12 if mixed else 8) * P, step=step)
        return s
    opt = (8 if stage == 3 and not mixed and not off_opt else 12) * part  # fp32 ZeRO-3: weights are the master
    if stage == 3:
        # (without deepspeed.zero.Init the model arrives whole: e P on the device until partitioned)
        s["init"] = e * P
        s["parameters"] = (0 if off_par else e * part) + 2 * big * e
        grads, s["gradients"] = accum * part, big * e
        s["buffers"] = bucket * e
    elif stage == 1 and dtype == "bf16" and not off_opt:
        s.update(gradients=4 * P, step=adam_tmp)  # BF16_Optimizer: fp32 gradients, whole
        s["optimizer"] = opt
        return s
    elif stage == 1:
        # whole gradients (plus an fp32 accumulation copy under bf16) and, at the step, the
        # partition flattened into fp32
        s["gradients"] = e * P + (4 * P if dtype == "bf16" else 0)
        grads = 4 * part
        s["buffers"] = bucket * (4 if dtype == "bf16" else e) * (2 if overlap else 1)
    else:
        grads = accum * part
        s["buffers"] = bucket * e * (2 if overlap else 1)
        if dtype == "fp16":
            s["step"] = 4 * part  # the fp16 partition upcast for the step
    s["host"] = e * part if off_par else 0
    if off_opt:  # (DeepSpeed's CPU Adam steps in place: no temporaries)
        s["host"] += opt + grads + (e * part if mixed else 0)  # + a 16-bit copy to send the weights back
        s["step"] = 0
    else:
        s["optimizer"] = opt
        s["gradients"] += grads
        s["step"] += adam_tmp
    return s


def estimate(cfg, model, world_size: int, on_gpu: bool) -> Estimate:
    """Memory per device for a TrainConfig and its model config (plan.model: vocabulary resolved)."""
    tr = cfg.trainer
    e = 4 if str(cfg.precision.dtype) == "fp32" else 2
    s, b = cfg.data.seq_len, tr.micro_batch_size
    P = count_params(model)
    states = model_states(cfg, P, largest_tensor(model), world_size, on_gpu)
    return Estimate(activations=activation_bytes(model, s, b, e, str(tr.activation_checkpointing)),
                    logits=loss_bytes(model, s, b, e), on_gpu=on_gpu, n_params=P, world_size=world_size,
                    **states)


def describe(cfg, model, est: Estimate) -> str:
    """One line: the total, its terms, and the settings it was computed for."""
    name = cfg.model.name if isinstance(getattr(cfg.model, "name", None), str) else model.arch
    u = est.unit
    host = f"{size(est.host, u)} {u}"
    where = "" if not est.host else (f" + {host} offloaded to host memory per rank" if est.on_gpu
                                     else f" + offloaded {host} (a CPU run's host memory is its device's)")
    return (f"memory per device (estimate): {size(est.peak, u)} {u} = {est.terms()}{where}; {name} "
            f"{est.n_params / 1e6:.1f}M params, ZeRO-{cfg.parallelism.zero_stage} {cfg.precision.dtype}"
            f"{offload_text(cfg)}, {est.world_size} rank(s), micro-batch {cfg.trainer.micro_batch_size} x "
            f"{cfg.data.seq_len}, checkpointing {cfg.trainer.activation_checkpointing}")


def offload_text(cfg) -> str:
    par = cfg.parallelism
    moved = [what for what, v in (("optimizer", par.offload_optimizer), ("params", par.offload_param))
             if str(v) != "none"]
    return f" offload {'+'.join(moved)}" if moved else ""


# --- what would fit -------------------------------------------------------------------------

@dataclass(frozen=True)
class Suggestion:
    overrides: str  # kiln-train overrides
    cost: str  # what it costs, in words
    rank: float  # cheapest first
    estimate: Estimate


def _with(cfg, **sections):
    """A copy of cfg with some sections' fields replaced: _with(cfg, trainer={"micro_batch_size": 4})."""
    return dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                       for name, values in sections.items()})


def _moves(cfg) -> list[list[tuple[str, str, float, dict]]]:
    """Each kind of change, its variants gentlest first: (overrides, cost, rank, sections)."""
    par, tr = cfg.parallelism, cfg.trainer
    moves = []
    moves.append([(f"parallelism.zero_stage={z}", "more communication" if z == 3 else "about none",
                   0.3 if z == 3 else 0.05 * (z - par.zero_stage), {"parallelism": {"zero_stage": z}})
                  for z in range(par.zero_stage + 1, 4)])
    # ZeRO's reduce buckets (DeepSpeed's default, 5e8 elements: 0.93 GiB each in bf16)
    moves.append([(f"parallelism.bucket_size={n}", "more, smaller collectives", 0.03,
                   {"parallelism": {"bucket_size": n}}) for n in (200_000_000, 50_000_000)
                  if par.zero_stage >= 1 and n < par.bucket_size])
    mb, ga = tr.micro_batch_size, tr.grad_accum_steps
    smaller = [m for m in range(mb - 1, 0, -1) if mb % m == 0]
    moves.append([(f"trainer.micro_batch_size={m} trainer.grad_accum_steps={ga * mb // m}",
                   f"the same batch in {mb // m}x the passes", 0.08 * ((mb // m).bit_length() - 1),
                   {"trainer": {"micro_batch_size": m, "grad_accum_steps": ga * mb // m}}) for m in smaller])
    order = ["none", "selective", "full"]
    moves.append([(f"trainer.activation_checkpointing={c}", cost, rank,
                   {"trainer": {"activation_checkpointing": Checkpointing(c)}})
                  for c, cost, rank in (("selective", "about 1/6 more compute", 0.2),
                                        ("full", "about 1/3 more compute", 0.4))
                  if order.index(c) > order.index(str(tr.activation_checkpointing))])
    offload, cpu = [], Offload.cpu
    if str(par.offload_optimizer) == "none":
        z = max(par.zero_stage, 2)
        offload.append((f"parallelism.zero_stage={z} parallelism.offload_optimizer=cpu",
                        "the optimizer step on the CPU, gradients over PCIe", 1.0,
                        {"parallelism": {"zero_stage": z, "offload_optimizer": cpu}}))
    if str(par.offload_param) == "none":
        offload.append(("parallelism.zero_stage=3 parallelism.offload_optimizer=cpu parallelism.offload_param=cpu",
                        "weights and optimizer in host memory: the slowest", 2.0,
                        {"parallelism": {"zero_stage": 3, "offload_optimizer": cpu, "offload_param": cpu}}))
    moves.append(offload)
    return [m for m in moves if m]


def _merge(a: dict, b: dict) -> dict:
    out = {k: dict(v) for k, v in a.items()}
    for k, v in b.items():
        out.setdefault(k, {}).update(v)
    return out


def suggestions(cfg, model, world_size: int, on_gpu: bool, limit: int, most: int = 4) -> list[Suggestion]:
    """Settings that fit in `limit` bytes, each checked by estimating again: one change where one
    is enough, else two together; for each kind, its gentlest variant that fits; cheapest first."""
    moves = _moves(cfg)

    def fits(variants):
        over, sections = " ".join(v[0] for v in variants), {}
        for v in variants:
            if any(set(values) & set(sections.get(name, {})) for name, values in v[3].items()):
                return None  # two changes of one key (a ZeRO stage and an offload preset's)
            sections = _merge(sections, v[3])
        est = estimate(_with(cfg, **sections), model, world_size, on_gpu)
        return Suggestion(over, "; ".join(v[1] for v in variants), sum(v[2] for v in variants), est) \
            if est.peak <= limit else None

    def first_fit(candidates):
        return next((s for s in map(fits, candidates) if s is not None), None)

    def cheapest_fit(candidates):
        return min((s for s in map(fits, candidates) if s is not None), key=lambda s: s.rank, default=None)

    found = [s for m in moves if (s := first_fit([v] for v in m))]
    if not found:
        found = [s for i, a in enumerate(moves) for b in moves[i + 1:]
                 if (s := cheapest_fit([v1, v2] for v1 in a for v2 in b))]
    return sorted(found, key=lambda s: s.rank)[:most]


def check_fits(cfg, model, world_size: int, on_gpu: bool, limit: int, limit_source: str) -> Estimate:
    """The estimate, or a ConfigError when it exceeds `limit` bytes, listing settings that fit."""
    est = estimate(cfg, model, world_size, on_gpu)
    if est.peak <= limit:
        return est
    states = est.parameters + est.gradients + est.optimizer
    key = "trainer.micro_batch_size" if est.activations + est.logits >= states else "parallelism.zero_stage"
    problem = (f"the run needs about {gib(est.peak)} GiB per device ({est.terms()}) but "
               f"{gib(limit)} GiB are usable ({limit_source})")
    found = suggestions(cfg, model, world_size, on_gpu, limit)
    if found:
        fix = "settings that fit, cheapest first: " + "; ".join(
            f"`{s.overrides}` ({gib(s.estimate.peak)} GiB: {s.cost})" for s in found)
    else:
        fix = ("no change of ZeRO stage, bucket size, offload, micro-batch or activation checkpointing fits "
               "(nor two together): train a smaller model (model.n_layer, model.n_embd) or shard over more "
               "devices (launcher.num_workers)")
    raise ConfigError(key, problem, fix + "; trainer.device_memory_gib=<GiB> checks against another size")


def device_limit(cfg) -> tuple[bool, int | None, str]:
    """(whether the run trains on GPUs, bytes one device may use or None for no check, where that
    figure comes from). trainer.device_memory_gib wins; else a GPU's size from the driver's GPU 0;
    a CPU run is not checked (its limit is the host's memory, shared with the Python runtime)."""
    given = cfg.trainer.device_memory_gib
    want = cfg.launcher.use_gpu
    cuda = False
    if want is not False:
        import torch  # only here: the estimate itself needs no torch

        cuda = torch.cuda.is_available()
    on_gpu = want if want is not None else cuda
    if given is not None:
        return on_gpu, int(given * GIB), f"trainer.device_memory_gib={given:g}"
    if on_gpu and cuda:
        props = torch.cuda.get_device_properties(0)
        usable = int(props.total_memory * GPU_USABLE_FRACTION) - GPU_RESERVED_BYTES
        return on_gpu, usable, (f"{props.name}: {gib(props.total_memory)} GiB, less 5% and 0.5 GiB for the "
                                f"CUDA context and the allocator")
    return on_gpu, None, "CPU run: the host's memory, not checked"


def check_plan(plan, log) -> Estimate:
    """Print the estimate for a run plan (and the limit it was checked against); raise when it cannot fit."""
    cfg = plan.config
    on_gpu, limit, source = device_limit(cfg)
    world = cfg.launcher.num_workers
    est = estimate(cfg, plan.model, world, on_gpu)
    log(describe(cfg, plan.model, est))
    if limit is None:
        log(f"device memory: {source} (trainer.device_memory_gib=<GiB> checks the estimate against a size)")
        return est
    est = check_fits(cfg, plan.model, world, on_gpu, limit, source)
    log(f"device memory: {gib(limit)} GiB usable ({source}): the estimate uses {100 * est.peak / limit:.0f}%")
    return est
