"""kiln's LR schedule, and the rate DeepSpeed's optimizer really applies at each step."""

import math
import os

import pytest
import torch

from kiln.config.schema import TrainConfig
from kiln.engine.schedule import lr_at, schedule_params

LR = 6e-4


def rates(n: int, **kw) -> list[float]:
    return [lr_at(s, **kw) for s in range(1, n + 1)]


def test_linear_warmup_then_cosine_to_min():
    kw = dict(lr=LR, warmup_steps=4, max_steps=10, min_lr_ratio=0.1)
    r = rates(10, **kw)
    assert r[:4] == [LR * 1 / 4, LR * 2 / 4, LR * 3 / 4, LR]  # step 1 is the first warmup value, not 0
    assert all(a > b for a, b in zip(r[3:], r[4:]))  # then decays monotonically
    assert r[-1] == pytest.approx(LR * 0.1, rel=1e-12)
    assert lr_at(7, **kw) == pytest.approx(LR * 0.1 + LR * 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 6)))


def test_no_warmup_and_single_step_schedules():
    r = rates(5, lr=LR, warmup_steps=0, max_steps=5, min_lr_ratio=0.1)
    assert 0 < r[-1] < r[0] < LR and r[-1] == pytest.approx(LR * 0.1)
    assert lr_at(1, lr=LR, warmup_steps=0, max_steps=1, min_lr_ratio=0.1) == pytest.approx(LR * 0.1)


def test_warmup_is_capped_below_the_run_length(compose):
    p = schedule_params(compose(["trainer.max_steps=30", "optim.warmup_steps=100"]))
    assert p["warmup_steps"] == 29 and lr_at(30, **p) == pytest.approx(p["lr"] * p["min_lr_ratio"])
    assert schedule_params(compose(["trainer.max_steps=1"]))["warmup_steps"] == 0


@pytest.fixture
def process_group():
    """A one-process gloo group, as launcher=local makes (DeepSpeed needs one)."""
    import deepspeed
    import deepspeed.comm
    import torch.distributed as dist

    from kiln.engine.build import skip_unused_deepspeed_ops
    from kiln.launch.env import free_port

    skip_unused_deepspeed_ops()  # as the launchers do: no JIT build of DeepSpeed's CPU comm op
    if not dist.is_initialized():
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    yield
    deepspeed.comm.destroy_process_group()


def applied_rates(cfg: TrainConfig, steps: int) -> list[list[float]]:
    """Run `steps` optimizer steps through build_engine and record, per step, the lr of every
    param group of the torch optimizer at the moment DeepSpeed steps it."""
    from kiln.engine.build import build_engine
    from kiln.model.gpt import GPT

    torch.manual_seed(0)
    model = GPT(cfg.model.build(257))
    engine, _ = build_engine(model, cfg, 1)
    seen: list[list[float]] = []
    wrapped = engine.optimizer.step  # ZeRO's wrapper steps the torch optimizer once per param group

    def step(*args, **kwargs):
        seen.append([float(g["lr"]) for g in engine.basic_optimizer.param_groups])
        return wrapped(*args, **kwargs)

    engine.optimizer.step = step
    x = torch.randint(0, 257, (2, 16))
    for _ in range(steps * cfg.trainer.grad_accum_steps):
        _, loss = engine(x, x)
        engine.backward(loss)
        engine.step()
    return seen


@pytest.mark.parametrize("parallelism", ["zero0", "zero2"])
def test_optimizer_applies_the_schedule_from_step_one(compose, process_group, parallelism):
    cfg = compose(["model=tiny", f"parallelism={parallelism}", "precision=fp32", "trainer.max_steps=6",
                   "optim.warmup_steps=3", "trainer.micro_batch_size=2", "trainer.grad_accum_steps=2"])
    seen = applied_rates(cfg, 6)
    p = schedule_params(cfg)
    assert len(seen) == 6  # one optimizer step per accumulation boundary
    assert [g[0] for g in seen] == [lr_at(s, **p) for s in range(1, 7)]
    assert seen[0][0] == cfg.optim.lr / 3
    assert all(len(set(g)) == 1 for g in seen)  # decay and no-decay groups share the rate


@pytest.mark.parametrize("overrides", [["optim.warmup_steps=0", "trainer.max_steps=4"], ["trainer.max_steps=1"]])
def test_warmup_zero_and_one_step_run_through_deepspeed(compose, process_group, overrides):
    cfg = compose(["model=tiny", "precision=fp32", "trainer.micro_batch_size=2", *overrides])
    n = cfg.trainer.max_steps
    seen = applied_rates(cfg, n)
    assert [g[0] for g in seen] == [lr_at(s, **schedule_params(cfg)) for s in range(1, n + 1)]
    assert all(r > 0 for g in seen for r in g)
