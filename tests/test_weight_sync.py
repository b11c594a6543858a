"""The publish protocol's own parts: the reused pack buffer, the shared staging memory an engine
maps, and a publish that loses workers on the way. (That a publish lands in a real engine is
proven by logprobs: tests/test_rollout.py, tests/test_learner_group.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys

import numpy as np
import ray
import torch

from rft_cluster.weight_sync import Staging, pack_buckets, publish
from tests.test_learner import RecordingWorker


def named_tensors() -> dict[str, torch.Tensor]:
    """Mixed dtypes and one tensor larger than the 4 KiB buckets used below."""
    g = torch.Generator().manual_seed(0)
    return {
        "a": torch.randn(10, 20, generator=g),
        "b": torch.randn(3000, generator=g),  # 12 KB: a bucket of its own, larger than bucket_bytes
        "c": torch.randn(7, generator=g).to(torch.bfloat16),
        "d": torch.randn(5, 5, generator=g),
        "e": torch.randn(600, generator=g),
    }


def test_a_reused_pack_buffer_yields_each_bucket_intact_until_the_next() -> None:
    want = named_tensors()
    got: dict[str, torch.Tensor] = {}
    buffers = set()
    for b in pack_buckets(want.items(), 4096, reuse_buffer=True):
        buffers.add(b.data.__array_interface__["data"][0])
        got |= {n: t.clone() for n, t in b.tensors()}  # consumed (copied out) before the next
    assert len(buffers) < 5  # shared, not one per bucket
    assert got.keys() == want.keys()
    for name, t in want.items():
        assert got[name].dtype == t.dtype and torch.equal(got[name], t), name


READ = "import mmap, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); sys.stdout.buffer.write(mmap.mmap(fd, 0, prot=mmap.PROT_READ)[: int(sys.argv[2])])"


def read_elsewhere(path: str, nbytes: int) -> bytes:
    """The staged bytes as another process (the engine's worker) maps them."""
    return subprocess.run([sys.executable, "-c", READ, path, str(nbytes)], capture_output=True, check=True).stdout


def test_staging_memory_is_mapped_by_another_process_and_grows_into_a_new_file() -> None:
    staging = Staging()
    small = np.arange(1000, dtype=np.uint8)
    path, n = staging.write(small)
    assert n == 1000 and read_elsewhere(path, n) == small.tobytes()
    same_path, _ = staging.write(small[::-1].copy())  # fits: the same file, rewritten
    assert same_path == path and read_elsewhere(path, n) == small[::-1].tobytes()
    big = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    grown, n = staging.write(big)
    assert grown != path  # the engine side must not keep using its mapping of the smaller file
    assert read_elsewhere(grown, n) == big.tobytes()


@ray.remote(num_cpus=0)
class DyingWorker:
    """A rollout worker stand-in whose process is SIGKILLed by its second bucket (mid-publish)."""

    def __init__(self) -> None:
        self.loads = 0

    async def begin_weight_sync(self) -> None:
        pass

    async def load_weight_bucket(self, bucket: object) -> None:
        self.loads += 1
        if self.loads == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    async def finish_weight_sync(self, version: int) -> None:
        pass


def test_publish_goes_on_without_workers_that_died_and_names_them(ray_local: None) -> None:
    """One worker is killed before the publish, one dies during it: both are reported lost, and
    the others still get every tensor between begin and finish."""
    want = named_tensors()
    dead, dying = RecordingWorker.remote(), DyingWorker.remote()
    pid = ray.get(dead.__ray_call__.remote(lambda _: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    workers = [RecordingWorker.remote(), dead, dying, RecordingWorker.remote()]

    try:
        result = publish(want.items(), workers, version=3, bucket_bytes=4096)
        recorded = ray.get([workers[0].recorded.remote(), workers[3].recorded.remote()])
    finally:
        for w in workers:
            ray.kill(w)

    assert result.lost == [1, 2]
    assert result.buckets > 2  # the dying worker got its second bucket, so died mid-publish
    assert result.stats()["weight_sync_lost_workers"] == 2.0
    for calls, tensors in recorded:
        assert calls == ["begin"] + ["load"] * result.buckets + ["finish 3"]
        assert tensors.keys() == want.keys()
        for name, t in want.items():
            assert torch.equal(tensors[name], t), name
