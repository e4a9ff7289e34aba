"""launcher=local: the training loop in this process, world size 1, no Ray.

For single-GPU and CPU debugging: breakpoints and profilers work as in any script.
"""

from __future__ import annotations

import os
import signal
import threading
from pathlib import Path

from kiln.launch.env import cuda_available, free_port, set_worker_env


def install_stop_handler() -> threading.Event:
    """First SIGTERM/SIGINT: ask the loop to checkpoint and stop; a second one: default action."""
    stop = threading.Event()

    def handler(signum, frame):
        if stop.is_set():
            signal.signal(signum, signal.SIG_DFL)
            os.kill(os.getpid(), signum)
        stop.set()
        print(f"[kiln] {signal.Signals(signum).name}: stopping at the next step with a checkpoint "
              f"(send it again to stop at once)", flush=True)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, handler)
    return stop


def run_local(cfg: dict, resume_from: Path | None) -> dict:
    set_worker_env(cfg["launcher"]["socket_ifname"])
    import torch
    import torch.distributed as dist

    from kiln.checkpoint.policy import run_dir
    from kiln.checkpoint.store import LocalStore
    from kiln.context import Context
    from kiln.loop import train

    use_gpu = cuda_available() and str(cfg["launcher"]["use_gpu"]).lower() != "false"
    device = torch.device("cuda", 0) if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    # DeepSpeed needs a process group even for one process.
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_WORLD_SIZE="1",
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()))
    import deepspeed

    from kiln.engine.build import captured_stdout

    with captured_stdout():
        deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo", auto_mpi_discovery=False,
                                   verbose=False)
    stop = install_stop_handler()
    store = LocalStore(run_dir(cfg), cfg["trainer"]["keep_checkpoints"], barrier=lambda: None, rank=0,
                       resume_from=resume_from)
    ctx = Context(rank=0, world_size=1, local_rank=0, node_rank=0, device=device,
                  output_dir=Path(cfg["output_dir"]), checkpoints=store, stop_requested=stop.is_set)
    try:
        return train(cfg, ctx)
    finally:
        if dist.is_initialized():
            # through DeepSpeed, which also drops its cached groups: the next run in this process
            # (a sweep's next trial) starts a fresh process group
            import deepspeed.comm

            deepspeed.comm.destroy_process_group()
