"""Where each rank runs, recorded at start-up: <output_dir>/ranks/rank_<world_rank>.json.

Every rank writes its own file (one writer per file: safe on shared storage) before any collective,
so when a multi-node run hangs in gloo/NCCL set-up the files still show which node, address and
network interface each rank had. Rank 0 then gathers the records and prints one line:

    [kiln] ranks: 2 on 2 nodes (10.0.0.1: rank 0; 10.0.0.2: rank 1) | socket interface eth0
"""

from __future__ import annotations

import json
import os
import socket
from pathlib import Path

import torch.distributed as dist

from kiln.tracking.console import print_line

RANKS_DIR = "ranks"


def rank_record(ctx, node_ip: str | None, node_id: str | None = None) -> dict:
    """This process's place in the job (ctx: kiln.context.Context)."""
    return {
        "world_rank": ctx.rank,
        "world_size": ctx.world_size,
        "local_rank": ctx.local_rank,
        "node_rank": ctx.node_rank,
        "node_ip": node_ip,
        "node_id": node_id,  # Ray's node id: tells nodes apart even when they share an address
        "hostname": socket.gethostname(),
        "pid": os.getpid(),
        "device": str(ctx.device),
        "socket_ifname": os.environ.get("GLOO_SOCKET_IFNAME") or os.environ.get("NCCL_SOCKET_IFNAME"),
    }


def write_rank_record(output_dir: Path, record: dict) -> Path:
    """Atomically (re)write this rank's file; rank 0 also removes files of ranks beyond the world
    size (left by an earlier, larger run in the same directory)."""
    folder = Path(output_dir) / RANKS_DIR
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"rank_{record['world_rank']}.json"
    tmp = folder / f".{path.name}.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(record, sort_keys=True) + "\n")
    os.replace(tmp, path)
    if record["world_rank"] == 0:
        for old in folder.glob("rank_*.json"):
            rank = old.stem.removeprefix("rank_")
            if rank.isdigit() and int(rank) >= record["world_size"]:
                old.unlink(missing_ok=True)
    return path


def read_rank_records(output_dir: Path) -> list[dict]:
    """The records in <output_dir>/ranks/, by world rank."""
    records = [json.loads(p.read_text()) for p in (Path(output_dir) / RANKS_DIR).glob("rank_*.json")]
    return sorted(records, key=lambda r: r["world_rank"])


def describe_ranks(records: list[dict]) -> str:
    """'2 on 2 nodes (10.0.0.1: rank 0; 10.0.0.2: rank 1) | socket interface eth0'."""
    nodes: dict[str, list[int]] = {}
    for r in sorted(records, key=lambda r: r["world_rank"]):
        key = r.get("node_id") or r.get("node_ip") or r["hostname"]
        nodes.setdefault(key, []).append(r["world_rank"])
    by_key = {r.get("node_id") or r.get("node_ip") or r["hostname"]: r for r in records}
    parts = []
    for key, ranks in nodes.items():
        label = by_key[key].get("node_ip") or by_key[key]["hostname"]
        parts.append(f"{label}: rank{'s' if len(ranks) > 1 else ''} {','.join(map(str, ranks))}")
    ifnames = sorted({r["socket_ifname"] for r in records if r.get("socket_ifname")})
    text = f"{len(records)} on {len(nodes)} node{'s' if len(nodes) != 1 else ''} ({'; '.join(parts)})"
    return text + (f" | socket interface {','.join(ifnames)}" if ifnames else "")


def ray_node() -> tuple[str | None, str]:
    """(address, node id) of the Ray node this worker runs on: the address the node registered
    with (`ray start --node-ip-address`), not ray.util.get_node_ip_address(), which in a worker
    process is the address this host would use to reach the internet."""
    import ray  # here: only Ray workers call this; a local run never imports Ray

    node_id = ray.get_runtime_context().get_node_id()
    for node in ray.nodes():
        if node.get("NodeID") == node_id:
            return node.get("NodeManagerAddress"), node_id
    return ray.util.get_node_ip_address(), node_id


def record_ranks(ctx, node_ip: str | None, node_id: str | None = None) -> dict:
    """Write this rank's record; rank 0 gathers every rank's and prints the one-line summary."""
    record = rank_record(ctx, node_ip, node_id)
    write_rank_record(ctx.output_dir, record)
    if dist.is_available() and dist.is_initialized() and ctx.world_size > 1:
        gathered: list = [None] * ctx.world_size
        dist.all_gather_object(gathered, record)  # tiny; the first collective of the run
    else:
        gathered = [record]
    if ctx.is_main:
        print_line(f"ranks: {describe_ranks(gathered)}")
    return record
