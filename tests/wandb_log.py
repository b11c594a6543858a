"""Reads an offline W&B run's transaction log, for tests (wandb 0.31 ships no reader)."""

from __future__ import annotations

import json
import struct
from pathlib import Path

from wandb.proto import wandb_internal_pb2 as pb


def wandb_records(run_dir: Path) -> list[pb.Record]:
    """Records of an offline run's transaction log (`run-<id>.wandb`, what `wandb sync` uploads).

    wandb 0.31 writes nothing else for offline runs (no files/wandb-summary.json), so this is
    where logged metrics can be checked. Format: a 7-byte header, then LevelDB-log records in
    32 KiB blocks, each with a (crc32, length, type) header; types 1 (full) and 4 (last) end one.
    """
    [log] = run_dir.glob("run-*.wandb")
    data, block = log.read_bytes(), 32 * 1024
    assert data[:4] == b":W&B"
    records, pos, buf = [], 7, b""
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos : pos + 7])
        buf += data[pos + 7 : pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            records.append(pb.Record.FromString(buf))
            buf = b""
    return records


def wandb_history(run_dir: Path) -> dict[int, dict[str, object]]:
    """step -> the metrics logged at that step (W&B's own `_`-keys removed)."""
    history: dict[int, dict[str, object]] = {}
    for r in wandb_records(run_dir):
        if r.WhichOneof("record_type") == "history":
            items = {"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
            history[items.pop("_step")] = {k: v for k, v in items.items() if not k.startswith("_")}
    return history
