from kiln.engine.ds_config import deepspeed_config


def test_generated_deepspeed_config(compose):
    cfg = compose(["parallelism=zero3_offload", "precision=bf16", "trainer.micro_batch_size=4",
                   "trainer.grad_accum_steps=3", "trainer.max_steps=500", "optim.warmup_steps=50"])
    ds = deepspeed_config(cfg, world_size=8)
    assert ds["train_batch_size"] == 4 * 3 * 8
    assert ds["gradient_accumulation_steps"] == 3
    z = ds["zero_optimization"]
    assert z["stage"] == 3 and z["offload_optimizer"]["device"] == "cpu" and z["offload_param"]["device"] == "cpu"
    assert ds["bf16"]["enabled"] and not ds["fp16"]["enabled"]
    assert ds["optimizer"]["type"] == "AdamW" and ds["optimizer"]["params"]["lr"] == cfg.optim.lr
    sched = ds["scheduler"]["params"]
    assert sched["warmup_num_steps"] == 50 and sched["total_num_steps"] == 500
    assert sched["warmup_type"] == "linear" and sched["cos_min_ratio"] == cfg.optim.min_lr_ratio
    assert ds["gradient_clipping"] == cfg.optim.grad_clip


def test_stage2_has_no_param_offload_and_fp16_scaling(compose):
    ds = deepspeed_config(compose(["parallelism=zero2", "precision=fp16"]), world_size=2)
    assert "offload_param" not in ds["zero_optimization"] and "offload_optimizer" not in ds["zero_optimization"]
    assert ds["fp16"]["enabled"] and ds["fp16"]["loss_scale"] == 0


def test_warmup_never_exceeds_run_length(compose):
    ds = deepspeed_config(compose(["trainer.max_steps=30"]), world_size=1)
    assert ds["scheduler"]["params"]["warmup_num_steps"] < 30


def test_torch_adamw_everywhere_but_offload(compose):
    """DeepSpeed's CPU Adam kernel keeps beta**step as a running product and recomputes it with
    pow() after a resume (last-bit drift); its GPU FusedAdam JIT-builds with nvcc, which a machine
    without the CUDA toolkit lacks. torch's AdamW (fused on GPUs) needs neither."""
    cfg = compose(["parallelism=zero2"])
    cpu = deepspeed_config(cfg, world_size=2, on_gpu=False)["optimizer"]["params"]
    gpu = deepspeed_config(cfg, world_size=2, on_gpu=True)["optimizer"]["params"]
    assert cpu["torch_adam"] is True and "fused" not in cpu
    assert gpu["torch_adam"] is True and gpu["fused"] is True
    offload = compose(["parallelism=zero2_offload"])  # offload keeps DeepSpeed's fast CPU Adam
    assert "torch_adam" not in deepspeed_config(offload, world_size=2, on_gpu=False)["optimizer"]["params"]


def test_overlap_buckets_and_persistence(compose):
    z = deepspeed_config(compose(["parallelism=zero2"]), world_size=2, on_gpu=True)["zero_optimization"]
    assert z["overlap_comm"] is True and z["reduce_bucket_size"] == z["allgather_bucket_size"] == 500_000_000
    z = deepspeed_config(compose(["parallelism=zero2"]), world_size=2, on_gpu=False)["zero_optimization"]
    assert z["overlap_comm"] is False  # null: no side streams to overlap on a CPU
    z3 = deepspeed_config(compose(["parallelism=zero3"]), world_size=2, on_gpu=True)["zero_optimization"]
    assert "stage3_param_persistence_threshold" not in z3  # DeepSpeed's default
    z3 = deepspeed_config(compose(["parallelism=zero3", "parallelism.param_persistence_threshold=0",
                                   "parallelism.overlap_comm=false", "parallelism.bucket_size=1000"]),
                          world_size=2, on_gpu=True)["zero_optimization"]
    assert (z3["stage3_param_persistence_threshold"], z3["overlap_comm"], z3["reduce_bucket_size"]) == (0, False, 1000)


def test_zero0_bf16_leaves_grad_accum_dtype_to_deepspeed(compose):
    """DeepSpeed refuses data_types.grad_accum_dtype=fp32 without ZeRO (stage 0 in bf16): every
    worker raised inside deepspeed.initialize. Stages 1-3 keep fp32 accumulation."""
    ds = deepspeed_config(compose(["parallelism=zero0", "precision=bf16"]), world_size=2, on_gpu=False)
    assert ds["bf16"]["enabled"] and "grad_accum_dtype" not in ds.get("data_types", {})
    for stage in (1, 2, 3):
        ds = deepspeed_config(compose([f"parallelism=zero{stage}", "precision=bf16"]), world_size=2, on_gpu=False)
        assert ds["data_types"]["grad_accum_dtype"] == "fp32"


def test_warmup_zero_and_one_step_runs_are_valid_schedules(compose):
    for overrides in (["optim.warmup_steps=0"], ["trainer.max_steps=1"], ["trainer.max_steps=1", "optim.warmup_steps=0"]):
        sched = deepspeed_config(compose(overrides), world_size=1)["scheduler"]["params"]
        assert sched["warmup_num_steps"] == 0 and sched["total_num_steps"] >= 1
