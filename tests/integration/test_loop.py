"""The training loop's bookkeeping, read back from what runs write (metrics.jsonl, summary.json,
checkpoints): learning rates, gradient norms, divergence checks, the evaluation set, throughput
after a resume. The runs are launcher=local inside the test process (kiln-train's own steps,
without a subprocess); per-rank RNG streams are checked on two Ray workers in test_ray_runs.py."""

import json
import math
import re
import types

import pytest
import torch

from conftest import compose_config, train_in_process
from helpers.runs import losses
from kiln.engine.schedule import lr_at, schedule_params

pytestmark = pytest.mark.integration

BASE = ["launcher=local", "model=tiny", "logger=none", "data.num_workers=0", "trainer.micro_batch_size=4"]


def run_in_process(overrides: list[str], tmp_path, name: str) -> dict:
    """The summary of a BASE run in this process; its files are under tmp_path / name."""
    return train_in_process([*BASE, f"launcher.storage_path={tmp_path / 'ck'}", *overrides], tmp_path / name)


def records(tmp_path, name: str) -> dict[int, dict]:
    return losses(tmp_path / name)


def test_logged_lr_is_the_rate_each_step_used(tmp_path, small_dataset):
    args = [f"data.path={small_dataset}", "trainer.max_steps=8", "optim.warmup_steps=4", "trainer.log_interval=1",
            "trainer.eval_interval=8", "precision=fp32"]
    run_in_process(args, tmp_path, "run")
    got = records(tmp_path, "run")
    p = schedule_params(compose_config([*BASE, *args]))
    assert [got[s]["lr"] for s in range(1, 9)] == [lr_at(s, **p) for s in range(1, 9)]
    assert got[1]["lr"] == p["lr"] / 4 and got[8]["lr"] == pytest.approx(p["lr"] * p["min_lr_ratio"])


@pytest.mark.parametrize("overrides", [["optim.warmup_steps=0", "trainer.max_steps=3"], ["trainer.max_steps=1"]])
def test_no_warmup_and_one_step_runs_train(tmp_path, small_dataset, overrides):
    summary = run_in_process([f"data.path={small_dataset}", "trainer.log_interval=1", *overrides], tmp_path, "run")
    got = records(tmp_path, "run")
    n = summary["steps"]
    assert n == int(overrides[-1].split("=")[1]) and sorted(got) == list(range(1, n + 1))
    p = schedule_params(compose_config([*BASE, *overrides]))
    assert [got[s]["lr"] for s in got] == [lr_at(s, **p) for s in got] and all(got[s]["lr"] > 0 for s in got)


def test_zero0_bf16_runs_with_grad_norms(tmp_path, small_dataset):
    summary = run_in_process([f"data.path={small_dataset}", "parallelism=zero0", "precision=bf16",
                              "trainer.max_steps=6", "trainer.log_interval=2", "trainer.grad_accum_steps=2",
                              "trainer.eval_interval=6"], tmp_path, "run")
    got = records(tmp_path, "run")
    assert sorted(got) == [2, 4, 6] and summary["steps"] == 6
    for r in got.values():
        assert isinstance(r["grad_norm"], float) and r["grad_norm"] > 0 and r["loss"] > 0
    assert isinstance(got[6]["eval_loss"], float)


def test_zero0_fp32_grad_norm_is_the_global_norm_before_clipping(tmp_path, small_dataset):
    """ZeRO-0 in fp32 steps the plain torch optimizer, which records no norm: kiln computes it.
    The same first step under ZeRO-2 (whose norm DeepSpeed computes) gives the same norm, and it
    is above optim.grad_clip=1.0, so it is the norm before clipping."""
    norms = {}
    for stage in (0, 2):
        run_in_process([f"data.path={small_dataset}", f"parallelism=zero{stage}", "precision=fp32",
                        "trainer.max_steps=2", "trainer.log_interval=1", f"trainer.run_name=z{stage}"],
                       tmp_path, f"z{stage}")
        norms[stage] = [records(tmp_path, f"z{stage}")[s]["grad_norm"] for s in (1, 2)]
    assert all(isinstance(n, float) for n in norms[0]), norms
    assert norms[0][0] == pytest.approx(norms[2][0], rel=1e-5) and norms[0][0] > 1.0
    assert norms[0][1] == pytest.approx(norms[2][1], rel=1e-3)


def test_diverged_run_never_saves_a_checkpoint_past_the_divergence(tmp_path, small_dataset):
    """Checkpoints every step, progress logged only at the end: each save is checked."""
    from kiln.errors import TrainingError

    args = [f"data.path={small_dataset}", "precision=fp32", "optim.lr=1e6", "optim.warmup_steps=1",
            "trainer.max_steps=10", "trainer.eval_interval=1000"]
    with pytest.raises(TrainingError) as every_step:  # the reference: checked at every step
        run_in_process([*args, "trainer.log_interval=1", "trainer.checkpoint_interval=0",
                        "trainer.run_name=ref"], tmp_path, "ref")
    bad = int(re.search(r"at step (\d+)", str(every_step.value)).group(1))
    assert 1 < bad < 10 and all(s < bad for s in records(tmp_path, "ref"))

    with pytest.raises(TrainingError) as saving:
        run_in_process([*args, "trainer.log_interval=100", "trainer.checkpoint_interval=1",
                        "trainer.keep_checkpoints=0", "trainer.run_name=saving"], tmp_path, "saving")
    assert "training diverged" in str(saving.value) and f"at step {bad}" in str(saving.value)
    saved = sorted(int(p.name[5:]) for p in (tmp_path / "ck" / "saving").glob("step_*"))
    assert saved == list(range(1, bad)), saved  # every step before the divergence, none from it on
    for step in saved:
        states = torch.load(next((tmp_path / "ck" / "saving" / f"step_{step:09d}" / "ds").rglob("*model_states.pt")),
                            weights_only=False)["module"]
        assert all(torch.isfinite(v).all() for v in states.values() if v.is_floating_point())


def test_eval_set_is_read_once_per_run(tmp_path, small_dataset, monkeypatch):
    import kiln.data.validation as validation
    from kiln.data.manifest import load_manifest

    val = set(load_manifest(small_dataset).urls("val"))
    opened = []
    real = validation.read_documents

    def counting(url, *a, **kw):
        opened.append(url)
        return real(url, *a, **kw)

    monkeypatch.setattr(validation, "read_documents", counting)
    run_in_process([f"data.path={small_dataset}", "trainer.max_steps=6", "trainer.eval_interval=2",
                    "trainer.log_interval=2", "trainer.eval_batches=2"], tmp_path, "run")
    evals = [r["eval_loss"] for r in records(tmp_path, "run").values() if "eval_loss" in r]
    assert len(evals) == 3 and set(opened) <= val
    assert len(opened) == len(val), f"the validation shards were read {len(opened)} times for {len(val)} shard(s)"


def test_no_validation_split_is_labelled_train(tmp_path, capsys):
    from conftest import stdlib_files
    from kiln.data.build import build_shards
    from kiln.data.tokenizer import ByteTokenizer

    data = tmp_path / "noval"
    build_shards([str(p) for p in stdlib_files(12)], data, ByteTokenizer(), val_fraction=0.0, shard_tokens=50_000)
    summary = run_in_process([f"data.path={data}", "trainer.max_steps=2", "trainer.log_interval=1"], tmp_path, "run")
    got = records(tmp_path, "run")
    assert got[2]["eval_split"] == "train" and "eval_split" not in got[1] and "eval_loss" in got[2]
    assert summary["eval_split"] == "train"
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["eval_split"] == "train"
    out = capsys.readouterr().out
    assert "warning: no validation split" in out and "--val-fraction" in out and "(on train shards)" in out


@pytest.fixture
def one_second_per_step(monkeypatch):
    """The metrics logger's clock advances exactly one second per optimizer step."""
    import time

    import kiln.training.fit as loop
    import kiln.training.metrics as metrics

    clock = {"now": 0.0}
    real_step = loop.train_step

    def timed_step(*a, **kw):
        clock["now"] += 1.0
        return real_step(*a, **kw)

    monkeypatch.setattr(loop, "train_step", timed_step)
    monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: clock["now"],
                                                                 time=time.time))  # (wall clock stays real)


def test_tokens_per_s_after_resume_counts_only_this_process(tmp_path, small_dataset, one_second_per_step):
    """A clock that advances one second per training step: tokens/s must equal the tokens of one
    step in every interval, also the first after resuming from a checkpoint taken between logs."""
    args = [f"data.path={small_dataset}", "precision=fp32", "trainer.max_steps=10", "trainer.log_interval=5",
            "trainer.checkpoint_interval=3", "trainer.keep_checkpoints=0", "trainer.eval_interval=1000"]
    run_in_process([*args, "trainer.run_name=full"], tmp_path, "full")
    step3 = tmp_path / "ck" / "full" / "step_000000003"
    summary = run_in_process([*args, "trainer.run_name=again", f"trainer.resume_from={step3}"], tmp_path, "again")
    full, again = records(tmp_path, "full"), records(tmp_path, "again")
    cfg = compose_config([*BASE, *args])
    per_step = cfg.trainer.micro_batch_size * cfg.data.seq_len  # one rank, no accumulation
    assert sorted(again) == [5, 10] and summary["resumed_from_step"] == 3
    for r in (*full.values(), *again.values()):
        assert r["tokens_per_s"] == per_step, (r["step"], r["tokens_per_s"])
    assert summary["tokens_per_s"] == per_step
    assert again[5]["loss"] == full[5]["loss"]  # the interval's loss still spans steps 1-5


def test_mfu_counts_accumulated_tokens_and_is_absent_without_a_peak(tmp_path, small_dataset, one_second_per_step):
    """One second per optimizer step (a fake clock): tokens/s is micro-batch x accumulation x
    sequence, and MFU is that times the model's FLOPs per token over the configured peak. On a
    CPU without trainer.peak_tflops there is no MFU, and the summary says why."""
    from kiln.model.flops import flops_per_token

    args = [f"data.path={small_dataset}", "trainer.max_steps=4", "trainer.log_interval=2", "trainer.grad_accum_steps=2",
            "trainer.eval_interval=1000", "trainer.checkpoint_interval=0"]
    summary = run_in_process([*args, "trainer.peak_tflops=0.001", "trainer.run_name=peak"], tmp_path, "peak")
    cfg = compose_config([*BASE, *args])
    per_step = cfg.trainer.micro_batch_size * 2 * cfg.data.seq_len
    fpt = flops_per_token(summary["parameters"], cfg.model.build(257), cfg.data.seq_len)
    assert summary["flops_per_token"] == fpt and summary["peak_tflops"] == 0.001
    for r in records(tmp_path, "peak").values():
        assert r["tokens_per_s"] == per_step
        assert r["mfu"] == pytest.approx(per_step * fpt / 1e9)
    assert summary["mfu"] == pytest.approx(per_step * fpt / 1e9)
    assert summary["mfu_basis"] == "trainer.peak_tflops=0.001"

    plain = run_in_process([*args, "trainer.run_name=plain"], tmp_path, "plain")
    assert all("mfu" not in r for r in records(tmp_path, "plain").values())
    assert plain["mfu"] is None and "CPU" in plain["mfu_basis"]


@pytest.mark.timeout(300)
def test_activation_checkpointing_trains_the_same_run(tmp_path, small_dataset):
    """trainer.activation_checkpointing under a real DeepSpeed engine (ZeRO-2, bf16): the
    recomputed blocks give the losses of the stored ones, step for step."""
    got = {}
    for mode in ("none", "full"):
        run_in_process([f"data.path={small_dataset}", "model=llama-tiny", "model.dropout=0.1", "trainer.max_steps=4",
                        "trainer.log_interval=1", "trainer.eval_interval=4", f"trainer.activation_checkpointing={mode}",
                        f"trainer.run_name={mode}"], tmp_path, mode)
        got[mode] = [r["loss"] for r in records(tmp_path, mode).values()]
    assert len(got["none"]) == 4 and got["none"] == pytest.approx(got["full"], abs=1e-6)


@pytest.mark.timeout(300)
def test_on_nonfinite_skip_leaves_parameters_and_optimizer_state_as_they_were(tmp_path, small_dataset, monkeypatch):
    """trainer.on_nonfinite=skip: step 3's loss is NaN (a fault injected into the real loop);
    DeepSpeed's optimizer leaves that step unapplied, kiln counts it and trains on. The weights and
    every optimizer-state tensor saved after step 3 equal those saved after step 2."""
    from kiln.checkpoint.safe_load import weights_only_loads
    from kiln.checkpoint.weights import consolidated_state_dict

    monkeypatch.setenv("KILN_FAULT_NAN_STEP", "3")
    args = [f"data.path={small_dataset}", "parallelism=zero2", "precision=fp32", "trainer.max_steps=5",
            "trainer.log_interval=1", "trainer.eval_interval=5", "trainer.checkpoint_interval=1",
            "trainer.keep_checkpoints=0", "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=1"]
    summary = run_in_process(args, tmp_path, "run")
    assert summary["steps"] == 5 and summary["skipped_steps"] == 1
    got = records(tmp_path, "run")
    assert all(math.isfinite(got[s]["loss"]) for s in (1, 2, 4, 5)) and math.isnan(got[3]["loss"])
    assert got[5]["loss"] < got[1]["loss"]
    ck = tmp_path / "ck" / "kiln"
    before, after = (consolidated_state_dict(ck / f"step_00000000{s}") for s in (2, 3))
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    with weights_only_loads():
        optim = [torch.load(next((ck / f"step_00000000{s}" / "ds" / f"step{s}").glob("*optim_states.pt")))
                 for s in (2, 3)]

    def tensors(obj, path=""):
        if torch.is_tensor(obj):
            yield path, obj
        elif isinstance(obj, dict):
            for k, v in obj.items():
                yield from tensors(v, f"{path}/{k}")
        elif isinstance(obj, (list, tuple)):
            for i, v in enumerate(obj):
                yield from tensors(v, f"{path}/{i}")

    a, b = dict(tensors(optim[0]["optimizer_state_dict"])), dict(tensors(optim[1]["optimizer_state_dict"]))
    assert a.keys() == b.keys() and len(a) > 2
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    after4 = consolidated_state_dict(ck / "step_000000004")
    assert not all(torch.equal(before[k], after4[k]) for k in before)  # step 4 trained again


@pytest.mark.timeout(300)
def test_on_nonfinite_skip_stops_past_max_skipped_steps(tmp_path, small_dataset, monkeypatch):
    from kiln.errors import TrainingError

    monkeypatch.setenv("KILN_FAULT_NAN_STEP", "2")
    with pytest.raises(TrainingError, match="max_skipped_steps=0"):
        run_in_process([f"data.path={small_dataset}", "parallelism=zero2", "trainer.max_steps=4",
                        "trainer.log_interval=1", "trainer.on_nonfinite=skip", "trainer.max_skipped_steps=0"],
                       tmp_path, "run")


@pytest.mark.timeout(300)
def test_a_loss_spike_rolls_back_to_the_last_checkpoint_and_skips_its_data(tmp_path, small_dataset, monkeypatch):
    """Step 25's loss is multiplied by 50 (a fault injected into the real loop). The guard sees
    the interval 25-26 far above the recent ones, reloads the step-20 checkpoint and skips the
    data of steps 21-26. In fp32 a step replayed on the same data would log the same loss
    bitwise; the replayed steps log other losses, so their data really was skipped."""
    import json

    monkeypatch.setenv("KILN_FAULT_SPIKE_STEP", "25:50")
    args = [f"data.path={small_dataset}", "parallelism=zero0", "precision=fp32", "trainer.max_steps=30",
            "trainer.log_interval=2", "trainer.eval_interval=30", "trainer.checkpoint_interval=10",
            "trainer.spike_threshold=6", "trainer.spike_window=20"]
    summary = run_in_process(args, tmp_path, "run")
    assert summary["steps"] == 30 and summary["rollbacks"] == 1
    logged = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [r["step"] for r in logged]
    assert steps == list(range(2, 25, 2)) + list(range(22, 31, 2)), steps  # 26 never logged: rolled back
    first, replayed = {r["step"]: r["loss"] for r in logged[:12]}, {r["step"]: r["loss"] for r in logged[12:]}
    assert all(replayed[s] != first[s] for s in (22, 24)), (first, replayed)
    assert max(replayed.values()) < 2 * max(first[s] for s in range(12, 25, 2))  # back to normal
    (event,) = [json.loads(x) for x in (tmp_path / "run" / "events.jsonl").read_text().splitlines()]
    assert event["event"] == "loss_spike" and event["step"] == 26 and event["rolled_back_to"] == 20
    assert event["skipped_micro_batches"] == 6 and event["loss"] > event["limit"] > event["recent_mean"]


def test_spike_guard_arms_then_flags_only_a_loss_far_above_its_recent_ones():
    from kiln.errors import TrainingError
    from kiln.training.spikes import SpikeGuard

    guard = SpikeGuard(threshold=6, window=10, max_rollbacks=1)
    assert guard.is_spike(50.0) is None  # not armed yet: the start of a run is no spike
    noisy_fall = [5.0 - 0.1 * i + (0.05 if i % 2 else -0.05) for i in range(12)]
    assert all(guard.is_spike(x) is None for x in noisy_fall)
    spike = guard.is_spike(9.0)
    assert spike is not None and spike["loss"] == 9.0 and spike["limit"] < 9.0
    assert len(guard.history) == 10 and 9.0 not in guard.history  # a spike does not join the history
    assert guard.is_spike(float("nan")) is None  # trainer.on_nonfinite handles those
    guard.check_allowed(30)
    guard.rollbacks += 1
    with pytest.raises(TrainingError, match="spike_max_rollbacks=1"):
        guard.check_allowed(40)
    assert SpikeGuard(None, 10, 1).is_spike(1e9) is None  # off
