"""One weight publish's bytes/s against a plain memory copy of the same bytes.

    .venv/bin/python benchmarks/bench_weight_sync.py [--repeats 3] [--models demo 100m]

For the demo's tiny model and for one of >= 100 M parameters (the same builder, larger
dimensions; untrained weights move exactly as many bytes), a real learner (a one-rank
LearnerGroup, ZeRO-2, fp32) publishes into a real vLLM rollout worker engine (one per model)
through vLLM's weight-transfer protocol and the CPU backend, `rft_shm`. The first publish is
reported on its own (it faults in the staging memory's pages); `seconds` is the median of the
following `repeats`. `memcpy_seconds` is the median of as many numpy copies of a buffer of the
same size into one already touched.

The CPU backend could move bytes through shared memory (what it does) or a gloo broadcast from
the learner to the engines' workers: `transports` times both for the same bytes in the same
bucket size, between two processes (the part of a publish where they differ; loading and GEMM
re-packing are the same either way).
Writes benchmarks/results/weight-sync.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import ray

from rft_cluster.config import EngineSpec, LearnerSpec
from rft_cluster.learner_group import LearnerGroup
from rft_cluster.rollout_worker import RolloutWorker
from rft_cluster.staging import Mappings, Staging
from rft_cluster.tiny_model import make_tiny_model
from rft_cluster.weight_transfer import CPU_BACKEND, Publish, publish_from

# make_tiny_model's defaults are the demo's model; the large one keeps its vocabulary and
# head_dim (64, as the copy circuit needs) and grows width and depth to ~103 M parameters.
MODELS: dict[str, dict[str, int]] = {
    "demo": {},
    "100m": {"hidden_size": 1024, "num_layers": 8, "num_heads": 16, "num_kv_heads": 8, "intermediate_size": 3072},
}


def memcpy_seconds(nbytes: int, repeats: int) -> float:
    """Median seconds of one plain copy of `nbytes` between two touched buffers."""
    src = np.ones(nbytes, np.uint8)
    dst = np.zeros_like(src)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        np.copyto(dst, src)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, model_dir: Path, repeats: int) -> dict[str, Any]:
    """Starts an engine and a learner on the model, publishes 1 + `repeats` times."""
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(str(model_dir), EngineSpec(dtype="float32", max_model_len=512), 0, [])
    started = worker.start.remote()  # the engine starts while the learner does
    group = LearnerGroup(str(model_dir), LearnerSpec(zero_stage=2), 1e-5, 0.2, seed=0)
    try:
        ray.get(started)
        bucket = LearnerSpec().weight_bucket_mb << 20
        first = publish_from(group, Publish([worker], 1, bucket, CPU_BACKEND, None))
        runs = [publish_from(group, Publish([worker], 2 + i, bucket, CPU_BACKEND, None)) for i in range(repeats)]
        assert not first.lost and not any(r.lost for r in runs), "the engine's actor died during a publish"
    finally:
        group.shutdown()
        ray.get(worker.shutdown.remote())
        ray.kill(worker)
    seconds = statistics.median(r.seconds for r in runs)
    copy_s = memcpy_seconds(first.bytes, max(repeats, 3))
    row = {
        "model": name,
        "params": first.bytes // 4,  # fp32
        "bytes": first.bytes,
        "buckets": first.buckets,
        "seconds": round(seconds, 4),
        "memcpy_seconds": round(copy_s, 4),
        "publish_gbps": round(first.bytes / 1e9 / seconds, 3),
        "memcpy_gbps": round(first.bytes / 1e9 / copy_s, 3),
        "fraction_of_memcpy": round(copy_s / seconds, 4),
        "first_publish_s": round(first.seconds, 4),
        "repeats_s": [round(r.seconds, 4) for r in runs],
        "transports": transports(first.bytes, bucket, max(repeats, 3)),
    }
    print(f"[bench] {name}: {row['params'] / 1e6:.1f} M params, publish {row['publish_gbps']:.2f} GB/s "
          f"({seconds:.3f} s), memcpy {row['memcpy_gbps']:.2f} GB/s: {row['fraction_of_memcpy']:.3f} of memcpy", flush=True)
    return row


def _shm_reader(conn: Any) -> None:
    """The engine worker's side of the shared-memory transport: maps each bucket and copies it
    out (as `load_weights` does)."""
    mappings, dst = Mappings(), None
    while (msg := conn.recv()) is not None:
        path, nbytes = msg
        src = np.frombuffer(mappings.view(path, nbytes), np.uint8)
        dst = np.empty_like(src) if dst is None or dst.size != src.size else dst
        np.copyto(dst, src)
        conn.send(True)


def _gloo_receiver(port: int, nbytes: int, bucket: int, rounds: int) -> None:
    import torch
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=1, world_size=2)
    buf = torch.empty(bucket, dtype=torch.uint8)
    for _ in range(rounds):
        for start in range(0, nbytes, bucket):
            dist.broadcast(buf[: min(bucket, nbytes - start)], src=0)
    dist.destroy_process_group()


def transports(nbytes: int, bucket: int, repeats: int) -> dict[str, Any]:
    """Seconds to move `nbytes` in `bucket`-sized pieces from this process into another one's
    memory: shared memory (write the staging file, the reader copies it out) vs a gloo
    broadcast (into the reader's buffer). Medians of `repeats`."""
    import multiprocessing as mp
    import socket

    import torch
    import torch.distributed as dist

    ctx = mp.get_context("spawn")
    src = torch.ones(nbytes, dtype=torch.uint8)
    here, there = ctx.Pipe()
    reader = ctx.Process(target=_shm_reader, args=(there,))
    reader.start()
    areas, shm = [Staging(), Staging()], []
    for _ in range(repeats + 1):  # the first round faults the pages in
        t0 = time.perf_counter()
        for i, start in enumerate(range(0, nbytes, bucket)):
            n = min(bucket, nbytes - start)
            area = areas[i % 2]
            area.reserve(bucket)[:n].numpy()[:] = src[start : start + n].numpy()
            here.send((area.path, n))
            here.recv()
        shm.append(time.perf_counter() - t0)
    here.send(None)
    reader.join()

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    receiver = ctx.Process(target=_gloo_receiver, args=(port, nbytes, bucket, repeats + 1))
    receiver.start()
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=2)
    gloo = []
    for _ in range(repeats + 1):
        t0 = time.perf_counter()
        for start in range(0, nbytes, bucket):
            dist.broadcast(src[start : start + min(bucket, nbytes - start)], src=0)
        gloo.append(time.perf_counter() - t0)
    dist.destroy_process_group()
    receiver.join()
    out = {"shared_memory_s": round(statistics.median(shm[1:]), 4), "gloo_broadcast_s": round(statistics.median(gloo[1:]), 4)}
    print(f"[bench]   transport of {nbytes / 1e6:.0f} MB: shared memory {out['shared_memory_s']:.3f} s, "
          f"gloo broadcast {out['gloo_broadcast_s']:.3f} s", flush=True)
    return out


def run(models: tuple[str, ...] = ("demo", "100m"), repeats: int = 3) -> dict[str, Any]:
    """The `weight_sync` fragment of the throughput result. Uses the connected Ray cluster, or
    starts a local one."""
    if not ray.is_initialized():
        ray.init(num_cpus=4, include_dashboard=False)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in models:
            model_dir = make_tiny_model(Path(tmp) / name, pretrain_steps=0, **MODELS[name])
            rows.append(measure(name, model_dir, repeats))
    return {"weight_sync": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", choices=list(MODELS), default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=None, help="directory for weight-sync.json (default: benchmarks/results)")
    args = parser.parse_args()
    from common import RESULTS, write_result  # benchmarks/common.py, beside this script

    result = run(tuple(args.models), args.repeats)
    write_result(args.results or RESULTS, "weight-sync.json", result)
    ray.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
