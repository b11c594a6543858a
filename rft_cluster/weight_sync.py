"""How weights travel from the learner into vLLM engines: the publish protocol and its buckets.

The learner only hands its weights out (`Learner.hand_out_weights`); `publish_from` is what the
driver calls, and everything from there to the engines' memory is this module's. The learner's
rank 0 packs its parameters (HF names) into a few flat byte buffers; each bucket
travels once (Ray object store on CPU) to every rollout worker, which stages it in shared
memory that the engine's worker process maps, where `WeightSyncExtension` (a vLLM
`worker_extension_cls`) loads it.

Buckets are raw bytes plus a dtype name, so any dtype travels (bfloat16 has no numpy type).
Copies of each bucket's bytes on the way (not counting kernel socket copies):

    first:  param -> CPU copy -> torch.cat -> pickled torch tensor -> object store ->
            unpickled tensor -> numpy().tobytes() -> RPC message -> decoded bytes ->
            bytearray -> load_weights                                         (10 copies)
    then:   param -> its slice of a fresh bucket buffer -> object store -> RPC message
            (msgpack bin, to the engine core process) -> decoded -> re-sent to the worker
            process -> load_weights                             (6 copies, 0.005 of memcpy)
    now:    param -> its slice of the reused pack buffer (the device-to-host copy on GPU) ->
            object store (numpy view, out of band; read in place by the rollout worker) ->
            the rollout worker's staging memory, which the engine's worker processes map ->
            load_weights                                                       (4 copies)

The RPC to the engine carries only names, shapes and where the bytes lie: the engine core
and its workers always run on the rollout worker's node. The staging memory is a memfd, so it
lives exactly as long as the rollout worker process (nothing to clean up in /dev/shm).

Why begin/finish around the buckets: on CPU, vLLM packs every Linear weight into a oneDNN (or
AMX) handle after loading and frees `layer.weight`, and the lm_head keeps its own packed copy of
the embedding. Loading into the freed parameters would fail, and loading into kept ones would
not reach the packed handles. So `begin` re-creates the freed parameters exactly as vLLM's
constructor does, the buckets go through the model's own `load_weights` (which knows the
stacked qkv / gate_up layout), and `finish` re-runs the packing. On GPU nothing is freed or
packed, so begin/finish change nothing there.
"""

from __future__ import annotations

import math
import mmap
import os
import time
import warnings
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar

import numpy as np
import torch


@dataclass
class WeightBucket:
    """Several tensors of one dtype as one flat byte buffer (one transfer, not one per tensor)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    dtype: str  # torch dtype name, e.g. "bfloat16"
    data: np.ndarray  # uint8, C-contiguous: pickled out of band, so read in place from the object store

    @property
    def nbytes(self) -> int:
        return self.data.nbytes

    def staged_args(self) -> tuple[list[str], list[tuple[int, ...]], str, str, int]:
        """Copies the bytes into this process's `Staging` and returns the
        `rft_load_weight_bucket` arguments that point the engine's workers at them."""
        return self.names, self.shapes, self.dtype, *_staging().write(self.data)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, view) pairs over the buffer, without copying it."""
        yield from _unflatten(self.names, self.shapes, _typed_view(self.data, self.dtype))


def _typed_view(buffer: Any, dtype: str) -> torch.Tensor:
    """A flat tensor of `dtype` over `buffer`'s memory, even a read-only one (the object store's,
    a read-only mapping): torch warns that it cannot mark a tensor read-only, and every
    consumer here copies out of it (`load_weights`, the tests' clones), so the warning is moot."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given buffer is not writable", category=UserWarning)
        return torch.frombuffer(buffer, dtype=getattr(torch, dtype))


def _unflatten(names: list[str], shapes: list[tuple[int, ...]], flat: torch.Tensor) -> Iterator[tuple[str, torch.Tensor]]:
    offset = 0
    for name, shape in zip(names, shapes):
        n = math.prod(shape)
        yield name, flat[offset : offset + n].view(shape)
        offset += n


class Staging:
    """Shared memory a rollout worker stages buckets in for its engine's worker processes
    (same node): an anonymous memfd, mapped by the engine side through /proc/PID/fd/FD. It
    grows to the largest bucket and is reused, so its pages are faulted in once, not per
    bucket; it is freed when both processes have closed it (a killed actor leaks nothing)."""

    def __init__(self) -> None:
        self._fd = -1
        self._map: mmap.mmap | None = None

    def write(self, data: np.ndarray) -> tuple[str, int]:
        """Copies `data` in; returns (path to map, bytes written). Valid until the next write."""
        if self._map is None or len(self._map) < data.nbytes:
            # The new file is opened before the old one is closed, so its fd (and path) differ
            # from the one the engine side has mapped.
            fd = os.memfd_create("rft-weight-staging")
            os.ftruncate(fd, data.nbytes)
            old_fd, self._fd, self._map = self._fd, fd, mmap.mmap(fd, data.nbytes)
            if old_fd >= 0:
                os.close(old_fd)
        np.frombuffer(self._map, np.uint8, count=data.nbytes)[:] = data
        return f"/proc/{os.getpid()}/fd/{self._fd}", data.nbytes


_process_staging: Staging | None = None


def _staging() -> Staging:
    """The process's staging memory: a rollout worker loads one bucket at a time into its one
    engine, so one area serves every bucket and publish."""
    global _process_staging
    if _process_staging is None:
        _process_staging = Staging()
    return _process_staging


def _copy_into(dst: torch.Tensor, t: torch.Tensor) -> None:
    """Copies `t`'s bytes into the uint8 tensor `dst`. A CPU tensor goes through numpy, a plain
    memcpy: torch's copy_ splits the work over its threads, which on a busy CPU made packing
    3-6x slower. Anything else (a GPU tensor: the device-to-host copy) goes through torch."""
    if t.device.type == "cpu" and t.is_contiguous():
        dst.numpy()[:] = t.reshape(-1).view(torch.uint8).numpy()
    else:
        dst.view(t.dtype).view(t.shape).copy_(t)


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int, reuse_buffer: bool = False
) -> Iterator[WeightBucket]:
    """Copies tensors (any device; each need only stay valid until the next is requested, e.g. a
    ZeRO-3 gather) straight into buckets of at most `bucket_bytes` (one tensor may exceed it
    alone); a dtype change also starts a new bucket. Each bucket owns a fresh buffer, or with
    `reuse_buffer` all share one (each valid until the next is requested: for a consumer that
    copies it out, like `ray.put`), which saves faulting in fresh pages for every bucket."""
    names: list[str] = []
    shapes: list[tuple[int, ...]] = []
    buffer = torch.empty(0, dtype=torch.uint8)
    used, dtype = 0, torch.float32

    def bucket() -> WeightBucket:
        return WeightBucket(list(names), list(shapes), str(dtype).removeprefix("torch."), buffer[:used].numpy())

    for name, t in named_tensors:
        nb = t.numel() * t.element_size()
        if names and (used + nb > buffer.numel() or t.dtype != dtype):
            yield bucket()
            names.clear(), shapes.clear()
        if not names:
            # torch.empty does not zero; the tail of the last bucket stays unused and unsent.
            if not reuse_buffer or buffer.numel() < nb:
                buffer = torch.empty(max(bucket_bytes, nb), dtype=torch.uint8)
            used, dtype = 0, t.dtype
        _copy_into(buffer[used : used + nb], t.detach())
        names.append(name)
        shapes.append(tuple(t.shape))
        used += nb
    if names:
        yield bucket()


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: bytes (one copy of the weights), seconds, buckets, and `lost`, the
    indices into the `workers` given whose actor died (they missed the rest of the publish; the
    fleet replaces them)."""

    bytes: int
    seconds: float
    buckets: int
    lost: list[int] = field(default_factory=list)

    def stats(self) -> dict[str, float]:
        """As step metrics; GB/s is bytes / 1e9 / s."""
        return {
            "weight_sync_bytes": float(self.bytes),
            "weight_sync_s": self.seconds,
            "weight_sync_gbps": self.bytes / 1e9 / self.seconds,
            "weight_sync_buckets": float(self.buckets),
            "weight_sync_lost_workers": float(len(self.lost)),
        }


class _Fanout:
    """Calls a method on every worker still alive, and waits; a worker whose actor died is
    set aside as lost instead of failing the others' publish (any other error still raises)."""

    def __init__(self, workers: list[Any]):
        self.workers = workers
        self.lost: list[int] = []

    def send(self, method: str, *args: Any) -> dict[int, Any]:
        return {i: getattr(w, method).remote(*args) for i, w in enumerate(self.workers) if i not in self.lost}

    def wait(self, calls: dict[int, Any]) -> None:
        import ray

        for i, ref in calls.items():
            try:
                ray.get(ref)
            except ray.exceptions.RayActorError:
                self.lost.append(i)


def publish(named_tensors: Iterable[tuple[str, torch.Tensor]], workers: list[Any], version: int, bucket_bytes: int) -> PublishResult:
    """Loads the weights into every rollout worker, bucket by bucket, between `begin_weight_sync`
    and `finish_weight_sync(version)`.

    Each bucket is put into the object store once and the same ref goes to all workers. One
    bucket is in flight at a time (loads into an engine must not interleave with begin/finish),
    while the next one is packed. A worker that dies is left out from then on and reported in
    `lost`; the tensors are read to the end whatever happens (ZeRO-3 gathers are collectives).
    """
    import ray

    t0 = time.perf_counter()
    fanout = _Fanout(workers)
    fanout.wait(fanout.send("begin_weight_sync"))
    nbytes, buckets, pending = 0, 0, {}
    for b in pack_buckets(named_tensors, bucket_bytes, reuse_buffer=True):  # ray.put copies it out
        ref = ray.put(b)
        nbytes += b.nbytes
        buckets += 1
        fanout.wait(pending)
        pending = fanout.send("load_weight_bucket", ref)
    fanout.wait(pending)
    fanout.wait(fanout.send("finish_weight_sync", version))
    return PublishResult(nbytes, time.perf_counter() - t0, buckets, fanout.lost)


R = TypeVar("R")


class WeightSource(Protocol):
    """What hands weights out: a `Learner` or a `LearnerGroup` (all ranks take part, rank 0 gives)."""

    def hand_out_weights(self, receive: Callable[[Iterator[tuple[str, torch.Tensor]]], R]) -> R | None: ...


@dataclass(frozen=True)
class Publish:
    """`publish` as a receiver of handed-out weights: it travels to the learner's rank 0 (the
    process that holds the weights) and runs there."""

    workers: list[Any]
    version: int
    bucket_bytes: int

    def __call__(self, named_tensors: Iterator[tuple[str, torch.Tensor]]) -> PublishResult:
        return publish(named_tensors, self.workers, self.version, self.bucket_bytes)


def publish_from(learner: WeightSource, workers: list[Any], version: int, bucket_bytes: int) -> PublishResult:
    """The learner's current weights into every rollout worker as `version` (see `publish`)."""
    result = learner.hand_out_weights(Publish(workers, version, bucket_bytes))
    if result is None:
        raise RuntimeError("the learner handed out no weights (only rank 0 gives them)")
    return result


def _unquantized_methods() -> tuple[type, ...]:
    from vllm.model_executor.layers.linear import UnquantizedLinearMethod
    from vllm.model_executor.layers.vocab_parallel_embedding import UnquantizedEmbeddingMethod

    return (UnquantizedLinearMethod, UnquantizedEmbeddingMethod)


class WeightSyncExtension:
    """Mixed into vLLM's worker (see `worker_extension_cls`); called via `collective_rpc`.

    Method names carry an `rft_` prefix: vLLM workers already own `update_weights` and friends.
    """

    def rft_begin_weight_sync(self) -> int:
        """Restores the parameters that CPU packing freed. Returns how many were restored."""
        from vllm.model_executor.layers.linear import LinearBase, ReplicatedLinear, UnquantizedLinearMethod

        restored = 0
        for module in self.model_runner.model.modules():
            if not isinstance(module, LinearBase) or not isinstance(module.quant_method, UnquantizedLinearMethod):
                continue
            if module.weight.numel() > 0:
                continue
            del module.weight
            # The same call LinearBase subclasses make in __init__ (vllm/model_executor/layers/
            # linear.py); ReplicatedLinear has no per-partition size and uses the v1 loader.
            replicated = isinstance(module, ReplicatedLinear)
            module.quant_method.create_weights(
                layer=module,
                input_size_per_partition=module.input_size if replicated else module.input_size_per_partition,
                output_partition_sizes=module.output_partition_sizes,
                input_size=module.input_size,
                output_size=module.output_size,
                params_dtype=module.params_dtype,
                weight_loader=module.weight_loader if replicated else module.weight_loader_v2,
            )
            restored += 1
        return restored

    def rft_load_weight_bucket(self, names: list[str], shapes: list[list[int]], dtype: str, path: str, nbytes: int) -> int:
        """Loads one bucket (`WeightBucket.staged_args`) through the model's own HF-name loader,
        reading the staging memory in place; the loader copies (and converts the dtype where
        the engine's differs). Returns bytes loaded."""
        flat = _typed_view(memoryview(self._rft_staging(path))[:nbytes], dtype)
        self.model_runner.model.load_weights(weights=_unflatten(names, [tuple(s) for s in shapes], flat))
        return nbytes

    def _rft_staging(self, path: str) -> mmap.mmap:
        """The rollout worker's staging memory, mapped once (read-only) and kept while the
        rollout worker keeps the same file (a new path means it grew into a new one)."""
        if getattr(self, "_rft_staging_path", None) != path:
            fd = os.open(path, os.O_RDONLY)
            try:
                self._rft_staging_map = mmap.mmap(fd, 0, prot=mmap.PROT_READ)
            finally:
                os.close(fd)
            self._rft_staging_path = path
        return self._rft_staging_map

    def rft_finish_weight_sync(self) -> None:
        """Re-runs vLLM's post-load processing (CPU GEMM packing) on unquantized layers."""
        methods = _unquantized_methods()
        for module in self.model_runner.model.modules():
            qm = getattr(module, "quant_method", None)
            if isinstance(qm, methods):
                qm.process_weights_after_loading(module)

