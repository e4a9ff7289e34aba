"""launcher=ray: Ray Train's TorchTrainer runs the training loop on N workers.

Ray Train creates the torch.distributed process group (NCCL on GPUs, gloo on CPUs) before
calling the worker function; DeepSpeed then finds and uses it.
"""

from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
import uuid
from pathlib import Path

import torch

from kiln.checkpoint.store import abandoned_on_failure, fault_injection_pause, step_dir_name
from kiln.config.schema import LauncherConfig
from kiln.config.validate import use_gpus
from kiln.context import Context
from kiln.errors import ConfigError, TrainingError
from kiln.launch.channel import RunChannel
from kiln.launch.env import set_worker_env
from kiln.launch.ranks import ray_node, record_ranks
from kiln.launch.stop import StopRequest
from kiln.plan import RunPlan
from kiln.launch.ray_console import show_worker_output
from kiln.tracking.console import print_line, routed, wants_bar
from kiln.tracking.progress import ProgressBar, streams_through
from kiln.tracking.rank_log import RankLog
from kiln.training.fit import fit

# Ray Train's V2 implementation (TrainController actor); must be set before ray.train is imported.
# (Ray itself is imported inside the functions that use it: a local run never loads it.)
os.environ.setdefault("RAY_TRAIN_V2_ENABLED", "1")
# Ray Train's PreemptionWatcher (node-drain observability; kiln reads none of it: a preempted run
# stops through SIGTERM and resumes from its checkpoint) is built with the workers' actor handles
# as arguments, so Ray core logs an E-level "constructor arguments in the object store" line at
# every start. Off: no false error, one actor process less per run. Ray Train hands the variable
# to its controller; set it to 1 to have the watcher back.
os.environ.setdefault("RAY_TRAIN_ENABLE_PREEMPTION_WATCHER", "0")


class RayStore:
    """Checkpoints through Ray Train's API: each worker writes its part to a local temporary
    directory and reports it; Ray merges the parts in storage and registers the checkpoint only
    once every worker has reported. Retention is Ray's CheckpointConfig(num_to_keep)."""

    def __init__(self, resume_from: Path | None):
        self.resume_from = resume_from  # another run's checkpoint to branch from, if Ray holds none of this run

    @contextlib.contextmanager
    def latest(self):
        import ray.train

        ckpt = ray.train.get_checkpoint()  # this run's latest (after a restart or a re-run), if any
        if ckpt is None:
            yield self.resume_from
            return
        with ckpt.as_directory() as local:
            yield Path(local)

    @contextlib.contextmanager
    def last_saved(self):
        import ray.train

        # get_checkpoint() is the one this worker group started from; a rollback wants the newest
        reported = ray.train.get_all_reported_checkpoints()
        if not reported:
            with self.latest() as ckpt:
                yield ckpt
            return
        with reported[-1].checkpoint.as_directory() as local:
            yield Path(local)

    def save(self, step: int, write, metrics: dict) -> None:
        import ray.train

        with tempfile.TemporaryDirectory(prefix="kiln-ckpt-", ignore_cleanup_errors=True) as tmp:
            with abandoned_on_failure(Path(tmp), step):  # staged on this node's disk before Ray copies it
                write(Path(tmp))
            fault_injection_pause(Path(tmp), step)
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(tmp),
                             checkpoint_dir_name=step_dir_name(step))


def flight_recorder_env(output_dir) -> dict:
    """PyTorch's NCCL flight recorder: each rank keeps its last collectives in a ring buffer and,
    when one times out (launcher.timeout_s), dumps it to <output_dir>/nccl_trace/rank_<r>
    (docs/checkpoints.md: reading it). Read by ProcessGroupNCCL when Ray Train creates it."""
    prefix = f"{output_dir}/nccl_trace/rank_"
    os.makedirs(f"{output_dir}/nccl_trace", exist_ok=True)
    return {"TORCH_NCCL_TRACE_BUFFER_SIZE": "2000", "TORCH_NCCL_DUMP_ON_TIMEOUT": "1",
            "TORCH_FR_DUMP_TEMP_FILE": prefix, "TORCH_NCCL_DEBUG_INFO_TEMP_FILE": prefix}


def watch_stop_signal(channel) -> threading.Event:
    """A worker-side thread that mirrors the driver's stop flag into a local event."""
    import ray

    event = threading.Event()

    def poll():
        while not event.is_set():
            try:
                if ray.get(channel.stop_requested.remote(), timeout=10):
                    event.set()
            except Exception:  # driver gone or actor restarting: keep training, keep polling
                pass
            time.sleep(1.0)

    threading.Thread(target=poll, daemon=True, name="kiln-stop-watch").start()
    return event


def _worker_fn(config: dict) -> None:
    """Runs in every Ray Train worker process: the plan made on the driver, used as it is."""
    plan: RunPlan = config["plan"]
    set_worker_env(plan.config.launcher.socket_ifname, config["use_gpu"])
    import ray
    import ray.train
    import ray.train.torch

    # Ray Train logs every report and checkpoint at INFO on every rank; kiln prints its own lines.
    logging.getLogger("ray.train").setLevel(logging.WARNING)
    try:  # this one is named after its file path, outside the "ray.train" hierarchy
        from ray.train.v2._internal.execution import context as _train_context

        _train_context.logger.setLevel(logging.WARNING)
    except (ImportError, AttributeError):
        pass
    rank = ray.train.get_context().get_world_rank()
    channel = ray.get_actor(config["channel"])
    # Everything this process prints also goes to <output_dir>/logs/rank_<r>.log. Only rank 0
    # speaks on the console; under the driver's progress bar it sends its records there instead.
    to_driver = channel.put_progress.remote if rank == 0 and config.get("progress_bar") else None
    with RankLog(plan.output_dir, rank) as log, routed(log, quiet=rank != 0, progress=to_driver):
        summary = _train_rank(plan, channel)
    if rank == 0:
        ray.get(channel.put_summary.remote(summary))


def _train_rank(plan: RunPlan, channel) -> dict:
    """This worker's rank: its context, its record in ranks/, the training loop."""
    import ray.train
    import ray.train.torch

    tc = ray.train.get_context()
    stop = watch_stop_signal(channel)
    ctx = Context(
        rank=tc.get_world_rank(),
        world_size=tc.get_world_size(),
        local_rank=tc.get_local_rank(),
        node_rank=tc.get_node_rank(),
        device=ray.train.torch.get_device(),
        output_dir=plan.output_dir,
        checkpoints=RayStore(plan.resume.checkpoint if not plan.resume.own else None),
        stop_requested=stop.is_set,
    )
    # <output_dir>/ranks/rank_<r>.json: node, address, interface of this rank (written before any
    # collective, for debugging multi-node set-up); rank 0 prints "ranks: N on M nodes (...)".
    record_ranks(ctx, *ray_node())
    return fit(plan, ctx)


class RayLauncher:
    """Ray Train's TorchTrainer over launcher.num_workers workers. It joins (or starts) Ray once
    and keeps the connection for every run it launches (a sweep's trials share one instance)."""

    def __init__(self, keep_ray: bool = False):
        self.started_here = False  # whether this launcher started the Ray instance it uses
        self.keep_ray = keep_ray  # leave Ray up even after a failure (a sweep's next trial uses it)

    def connect(self, lc: LauncherConfig, num_cpus_needed: int) -> str:
        """Join the configured cluster or start a local instance; returns a description."""
        import ray

        if ray.is_initialized():  # e.g. a sweep: Ray is started once and reused by every trial
            return "existing Ray connection" + (" (local instance)" if self.started_here else "")
        quiet = dict(logging_level=logging.WARNING, log_to_driver=True)
        address = lc.address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, **quiet)
            return f"Ray cluster at {address}"
        # A fresh local instance with at least one CPU slot per worker, even on a 2-core laptop.
        # Its token authentication is on by default; the notice about it is noise for a private instance.
        logging.getLogger("ray._private.authentication.authentication_token_setup").setLevel(logging.ERROR)
        ray.init(address="local", num_cpus=max(os.cpu_count() or 1, num_cpus_needed), **quiet)
        self.started_here = True
        return "local Ray instance"

    def check_capacity(self, lc: LauncherConfig) -> None:
        """A local instance never grows: a worker group larger than it would wait forever."""
        import ray

        need, have = lc.num_workers * lc.cpus_per_worker, int(ray.cluster_resources().get("CPU", 0))
        if self.started_here and need > have:
            raise ConfigError("launcher.num_workers", f"{lc.num_workers} workers x {lc.cpus_per_worker} CPU "
                              f"need {need} CPUs, but the local Ray instance (sized for this sweep's first trial) has "
                              f"{have}", "list the largest trial first, or start Ray yourself (ray start --head "
                              "--num-cpus=N) and set launcher.address")

    def run(self, plan: RunPlan) -> dict:
        import ray
        from ray.train import CheckpointConfig, FailureConfig, LoggingConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        lc, tr = plan.config.launcher, plan.config.trainer
        if not ray.is_initialized() and not (lc.address or os.environ.get("RAY_ADDRESS")):
            # A local instance will have this machine's GPUs: refuse a run they cannot hold (fp16
            # on a CPU machine, too few GPUs) before spending seconds starting Ray.
            use_gpus(plan.config, torch.cuda.device_count())
        where = self.connect(lc, lc.num_workers * lc.cpus_per_worker)
        worker_output = show_worker_output()  # the workers' lines as they wrote them (ray_console.py)
        self.check_capacity(lc)
        use_gpu = use_gpus(plan.config, int(ray.cluster_resources().get("GPU", 0)))
        print_line(f"{where}: {lc.num_workers} {'GPU' if use_gpu else 'CPU'} worker(s)")

        channel_name = f"kiln-run-{uuid.uuid4().hex[:12]}"
        channel = ray.remote(**RunChannel._ray_options)(RunChannel).options(name=channel_name).remote()
        # No print patching: Ray Train V2 would echo every worker print a second time via its logger.
        worker_env = {"RAY_TRAIN_V2_ENABLED": "1", "RAY_TRAIN_ENABLE_PRINT_PATCH": "0"}
        # W&B's own settings reach rank 0 as they would a local run (not WANDB_API_KEY: Ray's runtime
        # env is readable by every user of the cluster; set the key on the cluster's nodes instead)
        for var in ("KILN_FAULT_SAVE_PAUSE", "KILN_FAULT_STALL", "KILN_FAULT_NAN_STEP", "KILN_FAULT_SPIKE_STEP",
                    "KILN_CACHE_DIR", "WANDB_MODE", "WANDB_DISABLED", "WANDB_PROJECT", "WANDB_ENTITY",
                    "WANDB_RUN_GROUP", "WANDB_TAGS", "WANDB_NOTES", "WANDB_DIR", "WANDB_BASE_URL"):
            if os.environ.get(var):
                worker_env[var] = os.environ[var]
        if lc.socket_ifname:
            # In the workers' environment from their start: Ray Train creates the gloo/NCCL process
            # group before kiln's worker function runs, so setting it there would be too late.
            worker_env.update(GLOO_SOCKET_IFNAME=lc.socket_ifname, NCCL_SOCKET_IFNAME=lc.socket_ifname)
        if use_gpu:
            worker_env.update(flight_recorder_env(plan.output_dir))
        show_bar = wants_bar()  # decided here, where the terminal is: a worker's stdout never is one
        trainer = TorchTrainer(
            _worker_fn,
            train_loop_config={"plan": plan, "channel": channel_name, "use_gpu": use_gpu,
                               "progress_bar": show_bar},
            torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo", timeout_s=lc.timeout_s),
            scaling_config=ScalingConfig(
                num_workers=lc.num_workers,
                use_gpu=use_gpu,
                resources_per_worker={"CPU": lc.cpus_per_worker, **({"GPU": 1} if use_gpu else {})},
                placement_strategy=str(lc.placement_strategy),
            ),
            run_config=RunConfig(
                name=plan.run_name,
                storage_path=plan.storage,
                failure_config=FailureConfig(max_failures=lc.max_failures),
                checkpoint_config=CheckpointConfig(num_to_keep=tr.keep_checkpoints or None),
                worker_runtime_env={"env_vars": worker_env},
                # Ray Train's INFO lines (resources requested, worker group started, process group set
                # up, each report) stay in its own log files; its warnings and errors still show.
                logging_config=LoggingConfig(log_level="WARNING"),
            ),
        )
        bar = ProgressBar.of_this_process(tr.max_steps) if show_bar else None
        try:
            with StopRequest("asking all workers to checkpoint and stop", on_stop=channel.request_stop.remote), \
                    (streams_through(bar) if bar else contextlib.nullcontext()):
                error = fit_until_done(trainer, tick=(lambda: show_progress_of(channel, bar)) if bar else None)
            summary = None if error is not None else ray.get(channel.summary.remote())
        finally:
            if bar is not None:
                bar.close()
            ray.kill(channel)
        if error is not None:  # Ray wraps the worker's exception; surface the worker's own message
            logs = ray_logs_dir()
            if not self.keep_ray:
                ray.shutdown()  # flush Ray's buffered worker logs now, so kiln's summary of the error comes last
                self.started_here = False
            if worker_output is not None:
                worker_output.flush()
            message = worker_message(error)
            if "timed out" in message.lower() or "timeout" in message.lower():
                message += (f"\n  a collective waited launcher.timeout_s={lc.timeout_s} s for a rank that never "
                            f"joined it: that rank stalled or died (its own line above says which; on GPUs the "
                            f"NCCL flight recorder dumped each rank's last collectives to "
                            f"{plan.output_dir}/nccl_trace)")
            raise TrainingError(f"training failed on the Ray workers:\n{message}\n"
                                f"  (full worker tracebacks are above, in each rank's {plan.output_dir}/logs/"
                                f"rank_<r>.log, and in Ray's logs under {logs})"
                                ) from error
        if worker_output is not None:
            worker_output.flush()
        if summary is None:
            raise TrainingError("training finished but rank 0 handed back no summary (see the workers' output above)")
        return summary


def ray_logs_dir() -> str:
    """This Ray session's log directory on this node (a cluster may use its own --temp-dir)."""
    try:
        import ray._private.worker as ray_worker

        return ray_worker._global_node.get_logs_dir_path()
    except Exception:  # private API moved: name the default place
        return "/tmp/ray/session_latest/logs"


def show_progress_of(channel, bar: ProgressBar) -> None:
    """The driver's bar, from rank 0's latest record (none yet, or the actor busy: next time)."""
    import ray

    try:
        record = ray.get(channel.progress.remote(), timeout=5)
    except Exception:
        return
    if record:
        bar.update(record)


def fit_until_done(trainer, tick=None) -> BaseException | None:
    """trainer.fit() in a thread, so that the main thread stays free for signals (StopRequest);
    tick(): called about twice a second meanwhile, and once at the end."""
    outcome: dict = {}

    def fit_all():
        try:
            trainer.fit()
        except BaseException as e:  # reported to the main thread
            outcome["error"] = e

    thread = threading.Thread(target=fit_all, name="kiln-fit", daemon=True)
    thread.start()
    while thread.is_alive():
        thread.join(0.5)
        if tick is not None:
            tick()
    return outcome.get("error")


def worker_message(exc: BaseException) -> str:
    """One line per failed rank with the error it raised, without Ray's wrapping."""
    failures = getattr(exc, "worker_failures", None)
    if not failures:
        cause = exc
        while cause.__cause__ is not None:
            cause = cause.__cause__
        return _last_error_line(str(cause) or repr(cause))
    return "\n".join(f"  rank {rank}: {_describe(e)}" for rank, e in sorted(failures.items()))


def _describe(e: BaseException) -> str:
    text = str(e).strip() or repr(e)
    if "\n" not in text:  # the worker's own exception, unwrapped: name its type
        return f"{type(e).__name__}: {text}"
    return _last_error_line(text)


def _last_error_line(text: str) -> str:
    """The final `SomeError: message` line of a traceback text (kiln's errors unprefixed)."""
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for line in reversed(lines):
        head = line.split(":", 1)[0]
        if head.endswith(("Error", "Exception", "Interrupt", "Exit")) and " " not in head:
            return line.replace("kiln.errors.", "")
    return lines[-1] if lines else text
