"""launcher=local: the training loop in this process, world size 1, no Ray.

For single-GPU and CPU debugging: breakpoints and profilers work as in any script.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from kiln.checkpoint.store import LocalStore
from kiln.config.validate import use_gpus
from kiln.context import Context
from kiln.engine.build import captured_stdout, skip_unused_deepspeed_ops
from kiln.launch.env import free_port, set_worker_env
from kiln.launch.stop import StopRequest
from kiln.plan import RunPlan
from kiln.tracking.console import routed, wants_bar
from kiln.tracking.progress import ProgressBar
from kiln.tracking.rank_log import RankLog
from kiln.training.fit import fit


class LocalLauncher:
    def run(self, plan: RunPlan) -> dict:
        cfg = plan.config
        use_gpu = use_gpus(cfg, 1 if torch.cuda.is_available() else 0)
        set_worker_env(cfg.launcher.socket_ifname, use_gpu)
        device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
        if use_gpu:
            torch.cuda.set_device(device)
        # DeepSpeed needs a process group even for one process.
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
        import deepspeed  # after set_worker_env: it picks its accelerator when first imported

        skip_unused_deepspeed_ops()

        with captured_stdout():
            deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False,
                                       verbose=False)
        store = LocalStore(plan.checkpoints, cfg.trainer.keep_checkpoints, barrier=lambda: None, rank=0,
                           resume_from=plan.resume.checkpoint)
        # This process is rank 0: its output is teed into <output_dir>/logs/rank_0.log, and on a
        # terminal the progress is a bar (kiln/tracking/console.py).
        bar = ProgressBar.of_this_process(cfg.trainer.max_steps) if wants_bar() else None
        try:
            with StopRequest("stopping at the next step with a checkpoint") as stop, \
                    RankLog(plan.output_dir, 0, terminal=bar) as log, \
                    routed(log, progress=bar.update if bar else None):
                ctx = Context(rank=0, world_size=1, local_rank=0, node_rank=0, device=device,
                              output_dir=plan.output_dir, checkpoints=store, stop_requested=stop.is_set)
                return fit(plan, ctx)
        finally:
            if bar is not None:
                bar.close()
            if dist.is_initialized():
                # through DeepSpeed, which also drops its cached groups: the next run in this process
                # (a sweep's next trial) starts a fresh process group
                import deepspeed.comm

                deepspeed.comm.destroy_process_group()
