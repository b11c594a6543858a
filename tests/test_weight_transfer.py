"""The weight-transfer protocol's own parts: packing into alternating staging areas, shared memory
another process maps, the fleet client's fan-out (a worker on another node, workers that die).
(That a publish lands in a real engine is proven by logprobs: tests/test_rollout.py,
tests/test_learner_group.py.)"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from typing import Any

import numpy as np
import ray
import torch

from rft_cluster.staging import Bucket, Mappings, Staging, pack, unflatten
from rft_cluster.weight_transfer import NamedWeights, publish, resolve_backend


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


def read_bucket(b: Bucket, mappings: Mappings) -> dict[str, torch.Tensor]:
    """A bucket's tensors as an engine's worker reads them (mapping the staging file), copied out."""
    return {n: t.clone() for n, t in unflatten(b.names, b.shapes, b.dtype_names, mappings.view(b.path, b.nbytes))}


@ray.remote(num_cpus=0)
class RecordingWorker:
    """Stands in for a rollout worker: records the protocol's calls and each bucket's tensors,
    read from the publisher's shared memory as an engine's worker maps it, or from Ray's object
    store when it says it runs on another node (`node`)."""

    def __init__(self, node: str | None = None) -> None:
        self.node = node or ray.get_runtime_context().get_node_id()
        self.calls: list[str] = []
        self.tensors: dict[str, torch.Tensor] = {}
        self.mappings = Mappings()

    async def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> str:
        self.calls.append("init")
        return self.node

    async def start_weight_update(self) -> None:
        self.calls.append("start")

    async def update_weights(self, info: dict[str, Any]) -> None:
        if "bucket" in info:
            self.calls.append("update from the object store")
            buffer = memoryview(await info["bucket"])
        else:
            self.calls.append("update")
            buffer = self.mappings.view(info["path"], info["nbytes"])
        self.tensors |= {n: t.clone() for n, t in unflatten(info["names"], info["shapes"], info["dtype_names"], buffer)}

    async def finish_weight_update(self, version: int) -> None:
        self.calls.append(f"finish {version}")

    def recorded(self) -> tuple[list[str], dict[str, torch.Tensor]]:
        return self.calls, self.tensors


def test_auto_is_shared_memory_for_a_cpu_engine_and_nccl_for_a_gpu_one() -> None:
    assert resolve_backend("auto", on_gpu=False) == "rft_shm"
    assert resolve_backend("auto", on_gpu=True) == "nccl"
    assert resolve_backend("ipc", on_gpu=True) == "ipc"


def test_alternating_staging_areas_keep_each_bucket_intact_until_the_next_turn() -> None:
    """Two areas: bucket k is still readable while bucket k+1 is packed (the engines load one while
    the learner packs the next), and no area grows past the largest bucket."""
    want = named_tensors()
    areas, mappings = [Staging(), Staging()], Mappings()
    got: dict[str, torch.Tensor] = {}
    previous: Bucket | None = None
    list_paths: list[str] = []
    for b in pack(want.items(), areas, 4096):
        if previous is not None:  # the next bucket is packed: the previous one must be intact
            got |= read_bucket(previous, mappings)
        previous = b
        list_paths.append(b.path)
    got |= read_bucket(previous, mappings)
    # [a] [b, alone: larger than a bucket] [c d e]: consecutive buckets in different areas, the
    # first area reused for the third
    assert len(list_paths) == 3 and list_paths[0] != list_paths[1] and list_paths[2] == list_paths[0]
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
    path = staging.write(small)
    assert read_elsewhere(path, 1000) == small.tobytes()
    same_path = staging.write(small[::-1].copy())  # fits: the same file, rewritten
    assert same_path == path and read_elsewhere(path, 1000) == small[::-1].tobytes()
    big = np.random.default_rng(0).integers(0, 256, 5000, dtype=np.uint8)
    grown = staging.write(big)
    assert grown != path  # the engine side must not keep using its mapping of the smaller file
    assert read_elsewhere(grown, 5000) == big.tobytes()


def test_a_reader_is_not_fooled_when_another_area_takes_over_a_closed_fd_number() -> None:
    """Area a grows into a new file and closes its old fd; area b then grows and its new file gets
    that fd number, so b's path is the one the reader mapped for a's old file."""
    a, b, reader = Staging(), Staging(), Mappings()
    old = a.write(np.full(300, 1, np.uint8))
    b.write(np.full(100, 2, np.uint8))
    assert bytes(reader.view(old, 300)) == b"\x01" * 300
    a.write(np.full(400, 3, np.uint8))  # a grows: its old fd is closed
    reused = b.write(np.full(200, 4, np.uint8))  # b grows into the freed fd number
    assert reused == old  # and its bytes fit in the reader's old mapping: only the inode tells
    assert bytes(reader.view(reused, 200)) == b"\x04" * 200


@ray.remote(num_cpus=0)
class DyingWorker:
    """A rollout worker stand-in whose process is SIGKILLed by its second bucket (mid-publish)."""

    def __init__(self) -> None:
        self.loads = 0

    async def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> str:
        return ray.get_runtime_context().get_node_id()

    async def start_weight_update(self) -> None:
        pass

    async def update_weights(self, info: dict[str, Any]) -> None:
        self.loads += 1
        if self.loads == 2:
            os.kill(os.getpid(), signal.SIGKILL)

    async def finish_weight_update(self, version: int) -> None:
        pass


def test_publish_goes_on_without_workers_that_died_and_names_them(ray_local: None) -> None:
    """One worker is killed before the publish, one dies during it: both are reported lost, and
    the others, one of them on "another node" (its buckets through the object store), still get
    every tensor between start and finish."""
    want = named_tensors()
    dead, dying = RecordingWorker.remote(), DyingWorker.remote()
    pid = ray.get(dead.__ray_call__.remote(lambda _: os.getpid()))
    os.kill(pid, signal.SIGKILL)
    workers = [RecordingWorker.remote(), dead, dying, RecordingWorker.remote(node="another-node")]

    try:
        result = publish(NamedWeights.of(want), workers, version=3, bucket_bytes=4096)
        recorded = ray.get([workers[0].recorded.remote(), workers[3].recorded.remote()])
    finally:
        for w in workers:
            ray.kill(w)

    assert result.lost == [1, 2]
    assert result.buckets > 2  # the dying worker got its second bucket, so died mid-publish
    assert result.bytes == sum(t.numel() * t.element_size() for t in want.values())
    assert result.stats()["weight_sync_lost_workers"] == 2.0
    for (calls, tensors), how in zip(recorded, ["update", "update from the object store"]):
        assert calls == ["init", "start"] + [how] * result.buckets + ["finish 3"]
        assert tensors.keys() == want.keys()
        for name, t in want.items():
            assert torch.equal(tensors[name], t), name
