"""The memory estimate per device (kiln/estimate.py): its terms worked by hand, what ZeRO,
offload and checkpointing change, the fit check's refusal and suggestions, and kiln-train's dry run."""

from __future__ import annotations

import dataclasses
import functools
import subprocess
from pathlib import Path

import pytest

from conftest import REPO, assert_ok, compose_config, with_storage
from kiln.errors import ConfigError
from kiln.estimate import (GIB, Estimate, activation_bytes, check_fits, count_params, device_limit, estimate,
                           largest_tensor, layer_bytes, loss_bytes, suggestions)

GPT2_SMALL = 124_475_904  # 50304 x 768 (tied) + 1024 x 768 + 12 x (12 x 768^2 + 13 x 768) + 2 x 768


@functools.lru_cache(maxsize=None)
def composed(overrides: tuple[str, ...]):
    """Composing takes ~0.1 s: each set of overrides once per session (nothing here mutates it)."""
    return compose_config(list(overrides))


def config(*overrides: str, vocab: int = 257):
    cfg = composed(overrides)
    return cfg, cfg.model.build(vocab)


def small(**sections):
    """gpt2-small in bf16 (ZeRO-2, micro-batch 8 x 1024) with some fields replaced, without
    composing again: small(parallelism={"zero_stage": 3})."""
    cfg = composed(("model=gpt2-small", "precision=bf16"))
    cfg = dataclasses.replace(cfg, **{name: dataclasses.replace(getattr(cfg, name), **values)
                                      for name, values in sections.items()})
    return cfg, cfg.model.build(50257)


@pytest.mark.timeout(60)
def test_gpt2_small_zero0_bf16_one_rank_by_hand():
    cfg, m = config("model=gpt2-small", "parallelism=zero0", "precision=bf16", "launcher=local",
                    "trainer.micro_batch_size=8", vocab=50257)
    assert (cfg.data.seq_len, cfg.trainer.activation_checkpointing) == (1024, "none")
    P = count_params(m)
    assert m.vocab_size == 50304 and P == GPT2_SMALL
    est = estimate(cfg, m, world_size=1, on_gpu=True)
    # ZeRO paper, mixed-precision Adam: 2 bytes of bf16 weights, 2 of bf16 gradients, 12 of fp32
    # master weights + two moments, nothing divided with one rank and ZeRO-0.
    assert (est.parameters, est.gradients, est.optimizer) == (2 * P, 2 * P, 12 * P)
    assert est.buffers == 0 and est.host == 0
    # ZeRO-0 bf16 (DeepSpeed's unfused fp16/bf16 optimizer) upcasts every gradient at the step:
    # 4 P, less than the activations it follows, so it adds nothing to the peak.
    assert est.step == 4 * P and est.step < est.activations
    tokens, h = 8 * 1024, 768
    per_layer = tokens * (16 * 2 * h + 4 * 12 + 16)  # 32 bytes per element of h, no a*s^2 term (SDPA)
    assert layer_bytes(m, 1024, 8, 2) == per_layer
    assert est.activations == 12 * per_layer + tokens * (2 * 2 * h + 8 + 16)
    # bf16 logits and the loss's bf16 gradient buffer, plus one fp32 chunk (the rows of 2^25
    # logits: 667) upcast and its softmax
    assert est.logits == 2 * tokens * 50304 * 2 + 8 * (2**25 // 50304) * 50304
    assert est.device == 16 * P + est.activations + est.logits
    assert 5.5 * GIB < est.device < 6.5 * GIB  # 0.23 + 0.23 + 1.39 + 2.28 + 1.79 GiB


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
def test_parameter_count_is_the_torch_models(preset):
    from kiln.model.factory import build_model

    cfg, _ = config(f"model={preset}")
    variants = ([{}, {"n_kv_head": 1}, {"tie_embeddings": True}] if preset == "llama-tiny"
                else [{}, {"bias": False}])
    for changes in variants:
        m = dataclasses.replace(cfg.model, **changes).build(257)
        model = build_model(m)
        assert count_params(m) == model.num_params()
        assert largest_tensor(m) == max(p.numel() for p in model.parameters())


@pytest.mark.timeout(60)
@pytest.mark.parametrize("preset", ["tiny", "llama-tiny"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_activation_formula_is_what_autograd_keeps(preset, dtype):
    """The bytes autograd saves for one forward (counted once per storage, weights left out)
    equal the formula's blocks and final norm, plus the loss's gradient buffer (the logits
    themselves are not kept). The formula leaves out the rotary cos/sin tables and position ids
    (a few KiB here), hence the 2% tolerance."""
    import torch

    from kiln.model.factory import build_model

    _, m = config(f"model={preset}", "model.block_size=64")
    model = build_model(m).to(getattr(torch, dtype))
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    seen: dict[int, int] = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in weights:
            seen[ptr] = t.untyped_storage().nbytes()
        return t

    s, b, e = 64, 4, 4 if dtype == "float32" else 2
    idx = torch.randint(0, m.vocab_size, (b, s))
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        _, loss = model(idx, idx)
    kept = sum(seen.values())
    expected = activation_bytes(m, s, b, e, "none") + s * b * m.vocab_size * e
    assert kept == pytest.approx(expected, rel=0.02)
    loss.backward()


@pytest.mark.timeout(60)
def test_loss_chunk_is_the_losses():
    from kiln.model import loss

    import kiln.estimate

    assert kiln.estimate.CHUNK_LOGITS == loss.CHUNK_LOGITS


@pytest.mark.timeout(60)
def test_zero_stages_divide_the_right_terms():
    P, N = GPT2_SMALL, 8
    part = -(-P // N)
    by_stage = {}
    for z in range(4):
        by_stage[z] = estimate(*small(parallelism={"zero_stage": z}), world_size=N, on_gpu=True)
    big = 50304 * 768  # the embedding: ZeRO-3 gathers it whole (and prefetches the next)
    z0, z1, z2, z3 = (by_stage[z] for z in range(4))
    assert (z0.parameters, z0.gradients, z0.optimizer) == (2 * P, 2 * P, 12 * P)  # ZeRO-0: nothing divided
    assert z1.optimizer == 12 * part and z1.parameters == 2 * P
    assert z1.gradients == 4 * P  # DeepSpeed's BF16_Optimizer keeps the whole fp32 gradient at ZeRO-1
    assert z2.optimizer == 12 * part and z2.gradients == 4 * part and z2.parameters == 2 * P
    assert z2.buffers == 2 * 500_000_000 * 2  # two bf16 reduce buckets (overlap_comm on GPUs)
    assert z3.parameters == 2 * part + 2 * 2 * big and z3.optimizer == 12 * part
    assert z3.gradients == 4 * part + 2 * big
    assert z0.activations == z3.activations and z0.logits == z3.logits  # data parallel: same micro-batch
    # one rank: nothing to divide
    assert estimate(*small(), world_size=1, on_gpu=True).optimizer == 12 * P


@pytest.mark.timeout(60)
def test_fp32_holds_no_master_copy_at_zero0():
    cfg, m = config("model=gpt2-small", "parallelism=zero0", "precision=fp32", vocab=50257)
    est = estimate(cfg, m, world_size=1, on_gpu=True)  # (composed: the presets, as a user selects them)
    P = GPT2_SMALL
    assert (est.parameters, est.gradients, est.optimizer) == (4 * P, 4 * P, 8 * P)
    assert est.step == 4 * P  # DeepSpeed flattens the gradients for their all-reduce, even on one rank


@pytest.mark.timeout(60)
def test_offload_moves_optimizer_states_off_the_device():
    P, N = GPT2_SMALL, 2
    part = -(-P // N)
    on, off = (config("model=gpt2-small", f"parallelism={p}", "precision=bf16", vocab=50257)
               for p in ("zero2", "zero2_offload"))  # (composed: the presets themselves)
    kept, moved = estimate(*on, world_size=N, on_gpu=True), estimate(*off, world_size=N, on_gpu=True)
    assert moved.optimizer == 0 and kept.optimizer == 12 * part
    assert moved.gradients == 0  # the fp32 gradient partition lives beside the optimizer, on the host
    assert moved.host == 12 * part + 4 * part + 2 * part  # + a bf16 copy to send the weights back
    assert moved.parameters == kept.parameters and moved.device < kept.device
    # ZeRO-3 offload also takes the weights' partition (the gathered working set stays)
    z3 = estimate(*small(parallelism={"zero_stage": 3, "offload_optimizer": "cpu", "offload_param": "cpu"}),
                  world_size=N, on_gpu=True)
    assert z3.parameters == 2 * 2 * 50304 * 768 and z3.host == 12 * part + 4 * part + 2 * part + 2 * part
    # on a CPU run the host is the device: offload saves nothing there
    cpu_off, cpu_on = estimate(*off, world_size=N, on_gpu=False), estimate(*on, world_size=N, on_gpu=False)
    assert cpu_off.peak == cpu_off.device + cpu_off.host >= cpu_on.peak


@pytest.mark.timeout(60)
def test_checkpointing_shrinks_activations():
    acts = {}
    for mode in ("none", "selective", "full"):
        cfg, m = small(trainer={"activation_checkpointing": mode})
        acts[mode] = estimate(cfg, m, world_size=1, on_gpu=True).activations
    s, b, h, L = 1024, 8, 768, 12
    layer, outside = layer_bytes(m, s, b, 2), acts["none"] - 12 * layer_bytes(m, s, b, 2)
    # full: every block keeps its input, one is recomputed at a time in the backward pass
    assert acts["full"] == L * s * b * h * 2 + layer + outside
    # selective: blocks 0, 2, ... checkpointed: half the blocks keep everything
    assert acts["selective"] == 6 * layer + 6 * s * b * h * 2 + layer + outside
    assert acts["none"] > acts["selective"] > acts["full"]
    assert acts["selective"] < 0.65 * acts["none"] and acts["full"] < 0.2 * acts["none"]


@pytest.mark.timeout(60)
def test_fit_check_refuses_naming_keys_and_settings_that_fit():
    cfg, m = small(trainer={"micro_batch_size": 32})
    limit = 12 * GIB
    assert estimate(cfg, m, 2, True).peak > limit
    with pytest.raises(ConfigError) as err:
        check_fits(cfg, m, 2, True, limit, "trainer.device_memory_gib=12")
    text = str(err.value)
    assert err.value.key == "trainer.micro_batch_size"  # the activations and logits dominate
    assert "trainer.device_memory_gib=12" in text and "params 0.23" in text
    assert "trainer.micro_batch_size=16 trainer.grad_accum_steps=2" in text  # the largest that fits
    assert "trainer.activation_checkpointing=full" in text
    assert "selective" not in text  # does not fit: listed only what fits


@pytest.mark.timeout(60)
@pytest.mark.parametrize("stage, world, limit_gib, pairs", [(1, 4, 8, False), (2, 2, 3, True)])
def test_suggestions_fit_when_applied_as_overrides(stage, world, limit_gib, pairs):
    """Each suggestion's own override string, composed as kiln-train would, fits the limit. At
    3 GiB no one change is enough (ZeRO-2's two bf16 buckets alone take 1.86 GiB): pairs."""
    base = ["model=gpt2-small", f"parallelism=zero{stage}", "precision=bf16", "trainer.micro_batch_size=16"]
    cfg, m = config(*base, vocab=50257)
    limit = limit_gib * GIB
    found = suggestions(cfg, m, world, True, limit)
    assert found and estimate(cfg, m, world, True).peak > limit
    assert [s.rank for s in found] == sorted(s.rank for s in found)  # cheapest first
    assert all(("; " in s.cost) == pairs for s in found)
    for s in found:
        again, _ = config(*base, *s.overrides.split(), vocab=50257)
        again.check()
        assert estimate(again, m, world, True).peak == s.estimate.peak <= limit
        mb, ga = again.trainer.micro_batch_size, again.trainer.grad_accum_steps
        assert mb * ga == 16  # the batch is kept


@pytest.mark.timeout(60)
def test_nothing_fits_says_so():
    cfg, m = config("model=gpt2-xl", "precision=fp32", vocab=50257)
    with pytest.raises(ConfigError, match="no change of ZeRO stage, bucket size, offload"):
        check_fits(cfg, m, 1, False, GIB, "trainer.device_memory_gib=1")


@pytest.mark.timeout(60)
def test_device_limit():
    cpu, _ = small(launcher={"use_gpu": False})
    assert device_limit(cpu)[:2] == (False, None)  # a CPU run: printed, not checked
    given, _ = config("launcher.use_gpu=false", "trainer.device_memory_gib=1.5")
    assert device_limit(given) == (False, int(1.5 * GIB), "trainer.device_memory_gib=1.5")
    with pytest.raises(ConfigError, match="trainer.device_memory_gib"):
        small(trainer={"device_memory_gib": 0})[0].check()


DRY_RUNS = {
    # launcher=ray at an address nothing listens on: a run that started Ray would fail there
    "fits": ["launcher.address=127.0.0.1:9"],
    # ~1.2 GiB of activations and logits against 1 GiB
    "too_big": ["launcher=local", "model.n_layer=4", "model.n_embd=256", "model.block_size=1024",
                "trainer.micro_batch_size=32", "trainer.device_memory_gib=1"],
}


@pytest.fixture(scope="module")
def dry_runs(small_dataset, tmp_path_factory) -> dict[str, tuple[subprocess.CompletedProcess, Path]]:
    """The real kiln-train's dry runs, started together: each is ~4 s of imports on one core."""
    root = tmp_path_factory.mktemp("dry-runs")
    procs = {}
    for name, extra in DRY_RUNS.items():
        run_dir = root / name
        args = ["trainer.dry_run=true", f"data.path={small_dataset}", "logger=none", *extra]
        procs[name] = (subprocess.Popen(["kiln-train", *with_storage(args, run_dir), f"hydra.run.dir={run_dir}"],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True), run_dir)
    done = {}
    for name, (proc, run_dir) in procs.items():
        out, err = proc.communicate(timeout=50)  # (their output is a few lines: no pipe fills)
        done[name] = (subprocess.CompletedProcess(proc.args, proc.returncode, out, err), run_dir)
    return done


@pytest.mark.timeout(60)
def test_dry_run_prints_plan_and_estimate_and_starts_nothing(dry_runs):
    proc, run_dir = dry_runs["fits"]
    assert_ok(proc)
    out = proc.stdout
    assert "[kiln] plan: run kiln" in out and "2 rank(s)" in out
    assert "memory per device (estimate):" in out and "params" in out and "activations" in out
    assert "dry run: nothing started" in out
    assert "worker(s)" not in out and "step 1/" not in out
    assert not (run_dir.parent / f"{run_dir.name}-checkpoints").exists()  # no checkpoint store
    assert not (run_dir / "resolved_config.yaml").exists() and not (run_dir / "summary.json").exists()


@pytest.mark.timeout(60)
def test_too_big_for_the_given_memory_exits_2_with_suggestions(dry_runs):
    proc, _ = dry_runs["too_big"]
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "Traceback" not in err
    assert "config error at `trainer.micro_batch_size`" in err and "1.00 GiB are usable" in err
    assert "settings that fit, cheapest first: `trainer.micro_batch_size=16 trainer.grad_accum_steps=2`" in err
    assert "trainer.activation_checkpointing=" in err


@pytest.mark.timeout(60)
def test_the_step_counts_only_where_it_outgrows_the_activations():
    """The optimizer step runs after the backward pass has freed the activations and logits."""
    terms = dict(parameters=1, gradients=2, optimizer=3, buffers=6, host=7, n_params=10, world_size=1)
    small_step = Estimate(activations=40, logits=50, step=80, on_gpu=True, **terms)
    big_step = Estimate(activations=40, logits=50, step=100, on_gpu=True, **terms)
    assert small_step.device == 12 + 90 and big_step.device == 12 + 100
    assert small_step.peak == small_step.device  # offloaded bytes are elsewhere on a GPU run
    assert Estimate(activations=40, logits=50, step=0, on_gpu=False, **terms).peak == 12 + 90 + 7


@pytest.mark.timeout(60)
def test_fp32_loss_of_one_chunk_is_its_own_buffer():
    _, m = config("model=tiny")
    assert loss_bytes(m, 128, 8, 4) == 2 * 1024 * 257 * 4  # logits + gradient (the softmax chunk itself)
    assert loss_bytes(m, 128, 8, 2) == 2 * 1024 * 257 * 2 + 8 * 1024 * 257  # + the upcast chunk and softmax
