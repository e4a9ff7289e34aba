"""Read back a W&B offline run file (run-<id>.wandb) in tests.

The file is W&B's transaction log: a 7-byte header (":W&B", magic 0xBEE1, version), then
LevelDB-log-style 32 KiB blocks of chunks (crc32 u32, length u16, type u8: 1 full, 2 first,
3 middle, 4 last), each record a serialized `wandb.proto.wandb_internal_pb2.Record`.
wandb 0.31 no longer ships a Python reader, so the tests carry this small one.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb

BLOCK = 32 * 1024
HEADER = struct.Struct("<4sHB")
CHUNK = struct.Struct("<IHB")


def records(path: str | Path) -> list[pb.Record]:
    data = Path(path).read_bytes()
    ident, magic, _ = HEADER.unpack_from(data, 0)
    assert ident == b":W&B" and magic == 0xBEE1, f"{path} is not a W&B run file"
    pos, out, pending = HEADER.size, [], b""
    while pos + CHUNK.size <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK.size:  # block trailer padding
            pos += left_in_block
            continue
        _, length, kind = CHUNK.unpack_from(data, pos)
        pos += CHUNK.size
        if kind == 0 and length == 0:
            break
        payload = data[pos:pos + length]
        pos += length
        if kind == 1:
            pending = payload
        elif kind == 2:
            pending = payload
            continue
        elif kind == 3:
            pending += payload
            continue
        elif kind == 4:
            pending += payload
        rec = pb.Record()
        rec.ParseFromString(pending)
        out.append(rec)
        pending = b""
    return out


def history(path: str | Path) -> list[dict]:
    """The logged rows: [{"_step": 10, "loss": 5.3, ...}, ...]."""
    rows = []
    for rec in records(path):
        if rec.WhichOneof("record_type") == "history":
            row = {}
            for item in rec.history.item:
                key = item.key or "/".join(item.nested_key)
                row[key] = json.loads(item.value_json)
            if rec.history.HasField("step"):
                row.setdefault("_step", rec.history.step.num)
            rows.append(row)
    return rows


def run_info(path: str | Path) -> dict:
    """id, project, and the config W&B recorded for the run."""
    for rec in records(path):
        if rec.WhichOneof("record_type") == "run":
            cfg = {u.key: json.loads(u.value_json) for u in rec.run.config.update}
            return {"id": rec.run.run_id, "project": rec.run.project, "group": rec.run.run_group,
                    "name": rec.run.display_name, "config": cfg}
    raise AssertionError(f"{path} has no run record")
