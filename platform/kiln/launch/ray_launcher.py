"""launcher=ray: Ray Train's TorchTrainer runs the training loop on N workers.

Ray Train creates the torch.distributed process group (NCCL on GPUs, gloo on CPUs) before
calling the worker function; DeepSpeed then finds and uses it.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from kiln.errors import TrainingError

# Ray Train's V2 implementation (TrainController actor); must be set before ray.train is imported.
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")


def _worker_fn(config: dict) -> None:
    """Runs in every Ray Train worker process."""
    from kiln.launch.env import set_worker_env

    cfg = config["cfg"]
    set_worker_env(cfg["launcher"]["socket_ifname"])
    import ray.train
    import ray.train.torch

    from kiln.context import Context
    from kiln.loop import train

    tc = ray.train.get_context()
    ctx = Context(
        rank=tc.get_world_rank(),
        world_size=tc.get_world_size(),
        local_rank=tc.get_local_rank(),
        node_rank=tc.get_node_rank(),
        device=ray.train.torch.get_device(),
        output_dir=Path(cfg["output_dir"]),
    )
    train(cfg, ctx)


def connect(launcher: dict, num_cpus_needed: int) -> str:
    """Join the configured cluster or start a local instance; returns a description."""
    import ray

    if ray.is_initialized():  # e.g. a sweep: Ray is started once and reused by every trial
        return "existing Ray connection"
    quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
    address = launcher["address"] or os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, **quiet)
        return f"Ray cluster at {address}"
    # A fresh local instance with at least one CPU slot per worker, even on a 2-core laptop.
    # Its token authentication is on by default; the notice about it is noise for a private instance.
    logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
    ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus_needed), **quiet)
    return "local Ray instance"


def run_ray(cfg: dict) -> dict:
    import ray
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from kiln.config.validate import validate_devices
    from kiln.tracking.console import print_line

    lc = cfg["launcher"]
    where = connect(lc, lc["num_workers"] * lc["cpus_per_worker"])
    gpus = int(ray.cluster_resources().get("GPU", 0))
    use_gpu = validate_devices(cfg, gpus)
    print_line(f"{where}: {lc['num_workers']} {'GPU' if use_gpu else 'CPU'} worker(s)")

    output_dir = Path(cfg["output_dir"])
    storage = lc["storage_path"] or str(output_dir / "ray")
    # No print patching: Ray Train V2 would echo every worker print a second time via its logger.
    worker_env = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
    trainer = TorchTrainer(
        _worker_fn,
        train_loop_config={"cfg": cfg},  # a plain dict: never OmegaConf objects across Ray
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(
            num_workers=lc["num_workers"],
            use_gpu=use_gpu,
            resources_per_worker={"CPU": lc["cpus_per_worker"], **({"GPU": 1} if use_gpu else {})},
        ),
        run_config=RunConfig(
            name=output_dir.name,
            storage_path=storage,
            failure_config=FailureConfig(max_failures=lc["max_failures"]),
            worker_runtime_env={"env_vars": worker_env},
        ),
    )
    try:
        trainer.fit()
    except Exception as e:  # Ray wraps the worker's exception; surface the worker's own message
        ray.shutdown()  # flush Ray's buffered worker logs now, so kiln's summary of the error comes last
        raise TrainingError(f"training failed on the Ray workers:\n{worker_message(e)}\n"
                            f"  (full worker tracebacks are above, and in Ray's logs under /tmp/ray/session_latest/logs)"
                            ) from e
    return read_summary(output_dir)


def worker_message(exc: BaseException) -> str:
    """One line per failed rank with the error it raised, without Ray's wrapping."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return _last_error_line(str(cause) or repr(cause))
    return "\n".join(f"  rank {rank}: {_last_error_line(str(e) or repr(e))}" for rank, e in sorted(failures.items()))


def _last_error_line(text: str) -> str:
    """The final `SomeError: message` line of a traceback text (kiln's errors unprefixed)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt", "Exit")) and " " not in head:
            return line.replace("kiln.errors.", "")
    return lines[-1] if lines else text


def read_summary(output_dir: Path) -> dict:
    import json

    from kiln.tracking.tracker import SUMMARY

    path = output_dir / SUMMARY
    if not path.is_file():
        raise TrainingError(
            f"training finished but rank 0's {path} is not visible on the driver; "
            f"on multi-node clusters put the run's output directory (hydra.run.dir) on shared storage"
        )
    return json.loads(path.read_text())
