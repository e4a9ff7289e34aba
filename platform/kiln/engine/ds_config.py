"""Generate the DeepSpeed config from kiln's parallelism, precision, optim and trainer sections.

Users never hand-write DeepSpeed JSON: the config groups are the interface, and this function
is the one place that knows DeepSpeed's key names.
"""

from __future__ import annotations

from kiln.engine.schedule import schedule_params

CLIENT_SCHEDULER = "kiln.WarmupCosine"  # ds["scheduler"]["type"]: not a DeepSpeed scheduler name


def deepspeed_config(cfg, world_size: int, on_gpu: bool = True) -> dict:
    """DeepSpeed's config for a TrainConfig, `world_size` ranks."""
    par, prec, opt, tr = cfg.parallelism, cfg.precision, cfg.optim, cfg.trainer
    stage = par.zero_stage
    zero: dict = {
        "stage": stage,
        "contiguous_gradients": par.contiguous_gradients,
        "overlap_comm": on_gpu if par.overlap_comm is None else par.overlap_comm,
        "reduce_bucket_size": par.bucket_size,
    }
    if stage in (1, 2):
        zero["allgather_bucket_size"] = par.bucket_size
    if par.offload_optimizer != "none":
        zero["offload_optimizer"] = {"device": str(par.offload_optimizer), "pin_memory": True}
    if stage == 3 and par.offload_param != "none":
        zero["offload_param"] = {"device": str(par.offload_param), "pin_memory": True}
    if stage == 3 and par.param_persistence_threshold is not None:
        zero["stage3_param_persistence_threshold"] = par.param_persistence_threshold

    dtype = prec.dtype
    sched = schedule_params(cfg)
    ds: dict = {
        "train_micro_batch_size_per_gpu": tr.micro_batch_size,
        "gradient_accumulation_steps": tr.grad_accum_steps,
        "train_batch_size": tr.micro_batch_size * tr.grad_accum_steps * world_size,
        "gradient_clipping": opt.grad_clip,
        "zero_optimization": zero,
        "bf16": {"enabled": dtype == "bf16"},
        "fp16": {
            "enabled": dtype == "fp16",
            "loss_scale": 0,  # 0 = dynamic loss scaling
            "initial_scale_power": prec.initial_scale_power,
            "loss_scale_window": prec.loss_scale_window,
            "hysteresis": 2,
            "min_loss_scale": 1,
        },
        "optimizer": {
            "type": "AdamW",
            "params": {
                "lr": opt.lr,
                "betas": [opt.beta1, opt.beta2],
                "eps": opt.eps,
                "weight_decay": opt.weight_decay,
            },
        },
        # kiln's own schedule (engine/schedule.py), not DeepSpeed's WarmupCosineLR (which gives
        # steps 1 and 2 lr 0 and rejects warmup 0). build_engine takes this entry out and hands the
        # schedule to DeepSpeed as a client LR scheduler, whose state DeepSpeed checkpoints.
        "scheduler": {"type": CLIENT_SCHEDULER, "params": {
            "total_num_steps": sched["max_steps"],
            "warmup_num_steps": sched["warmup_steps"],
            "warmup_type": "linear",
            "cos_min_ratio": sched["min_lr_ratio"],
        }},
        # kiln prints its own progress; DeepSpeed's per-step prints would drown it.
        "steps_per_print": 2**31 - 1,
        "wall_clock_breakdown": False,
    }
    if par.offload_optimizer == "none":
        # torch's AdamW, not DeepSpeed's own Adam ops. On a GPU DeepSpeed would pick FusedAdam,
        # which JIT-builds with nvcc and a matching CUDA toolkit: a fresh `pip install` on a
        # machine without one fails at the first step. torch's fused AdamW kernel ships with torch.
        # On a CPU, DeepSpeed's CPU Adam keeps beta**step as a running product inside C++ and, after
        # a resume, recomputes it with pow(): the bias correction differs in the last bit and a
        # resumed run drifts. torch's AdamW derives it from the step stored in the checkpoint, so
        # runs resume bitwise on both. (Offload keeps DeepSpeed's CPU Adam for its speed.)
        ds["optimizer"]["params"]["torch_adam"] = True
        if on_gpu:
            ds["optimizer"]["params"]["fused"] = True
    if dtype == "bf16" and stage > 0:
        # Keep gradient accumulation and reduction in fp32 for stable small-batch training. ZeRO
        # stages 1-3 support it; stage 0 (DeepSpeed's bf16 optimizer without ZeRO) refuses fp32
        # accumulation, so there gradients accumulate in bf16 (its fp32 master weights still
        # take the update).
        ds["data_types"] = {"grad_accum_dtype": "fp32"}
    return ds
