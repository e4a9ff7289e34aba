"""Find real Ray Train worker processes from outside, as an operator would."""

import psutil


def worker_pids(token: str) -> list[int]:
    """Ray Train worker processes (not their forked DataLoader readers, which share the title) of
    the test cluster with this auth token: every test cluster (tests/cluster/ray_cluster.py) gives
    all its processes their own, so workers of other Ray instances on this host never count."""

    def is_worker(p):
        return any("RayTrainWorker" in part for part in (p.cmdline() or []))

    pids = []
    for p in psutil.process_iter():
        try:
            if (is_worker(p) and not (p.parent() and is_worker(p.parent()))
                    and p.environ().get("RAY_AUTH_TOKEN") == token):
                pids.append(p.pid)
        except psutil.Error:
            pass
    return pids
