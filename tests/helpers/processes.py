"""Find real Ray Train worker processes from outside, as an operator would."""

import psutil


def worker_pids() -> list[int]:
    """Ray Train worker processes (not their forked DataLoader readers, which share the title)."""

    def is_worker(p):
        return any("RayTrainWorker" in part for part in (p.cmdline() or []))

    pids = []
    for p in psutil.process_iter():
        try:
            if is_worker(p) and not (p.parent() and is_worker(p.parent())):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids
