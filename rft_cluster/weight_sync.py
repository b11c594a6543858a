"""How weights travel from the learner into vLLM engines: the publish protocol and its buckets.

The learner's rank 0 packs its parameters (HF names) into a few flat byte buffers; each bucket
travels once (Ray object store on CPU) and is unpacked inside the engine's worker process by
`WeightSyncExtension`, a vLLM `worker_extension_cls`.

Buckets are raw bytes plus a dtype name, so any dtype travels (bfloat16 has no numpy type).
Copies of each bucket's bytes on the way (not counting kernel socket copies):

    before: param -> CPU copy -> torch.cat -> pickled torch tensor -> object store ->
            unpickled tensor -> numpy().tobytes() -> RPC message -> decoded bytes ->
            bytearray -> load_weights                                         (10 copies)
    now:    param -> its slice of the bucket buffer (the device-to-host copy on GPU) ->
            object store (numpy uint8 view, written out of band; the rollout worker reads it
            in place) -> RPC message (msgpack bin) -> decoded bytes (read in place by
            torch.frombuffer) -> load_weights                                  (5 copies)

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
import time
import warnings
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

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

    def wire_args(self) -> tuple[list[str], list[tuple[int, ...]], str, memoryview]:
        """The bucket as `rft_load_weight_bucket` arguments: vLLM's RPC decoder returns untyped
        array arguments as lists, while a buffer travels intact (as msgpack bin)."""
        return self.names, self.shapes, self.dtype, memoryview(self.data)

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, view) pairs over the buffer, without copying it."""
        yield from _unflatten(self.names, self.shapes, _typed_view(self.data, self.dtype))


def _typed_view(buffer: Any, dtype: str) -> torch.Tensor:
    """A flat tensor of `dtype` over `buffer`'s memory, even a read-only one (the object store's,
    a decoded RPC message): torch warns that it cannot mark a tensor read-only, and every
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


def pack_buckets(named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int) -> Iterator[WeightBucket]:
    """Copies tensors (any device; each need only stay valid until the next is requested, e.g. a
    ZeRO-3 gather) straight into buckets of at most `bucket_bytes` (one tensor may exceed it
    alone); a dtype change also starts a new bucket. Each bucket owns a fresh buffer."""
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
            # Allocated once per bucket (torch.empty does not zero); the tail of the last one
            # stays unused and is never sent.
            buffer, used, dtype = torch.empty(max(bucket_bytes, nb), dtype=torch.uint8), 0, t.dtype
        buffer[used : used + nb].view(t.dtype).view(t.shape).copy_(t.detach())
        names.append(name)
        shapes.append(tuple(t.shape))
        used += nb
    if names:
        yield bucket()


def publish(named_tensors: Iterable[tuple[str, torch.Tensor]], workers: list[Any], version: int, bucket_bytes: int) -> dict[str, float]:
    """Loads the weights into every rollout worker, bucket by bucket, between `begin_weight_sync`
    and `finish_weight_sync(version)`.

    Each bucket is put into the object store once and the same ref goes to all workers. One
    bucket is in flight at a time (loads into an engine must not interleave with begin/finish),
    while the next one is packed. Returns the bytes published (one copy of the weights),
    seconds, GB/s (bytes / 1e9 / s) and the number of buckets.
    """
    import ray

    t0 = time.perf_counter()
    ray.get([w.begin_weight_sync.remote() for w in workers])
    nbytes, buckets, pending = 0, 0, []
    for b in pack_buckets(named_tensors, bucket_bytes):
        ref = ray.put(b)
        nbytes += b.nbytes
        buckets += 1
        ray.get(pending)
        pending = [w.load_weight_bucket.remote(ref) for w in workers]
    ray.get(pending)
    ray.get([w.finish_weight_sync.remote(version) for w in workers])
    seconds = time.perf_counter() - t0
    return {
        "weight_sync_bytes": float(nbytes),
        "weight_sync_s": seconds,
        "weight_sync_gbps": nbytes / 1e9 / seconds,
        "weight_sync_buckets": float(buckets),
    }


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

    def rft_load_weight_bucket(self, names: list[str], shapes: list[list[int]], dtype: str, data: bytes) -> int:
        """Loads one bucket (`WeightBucket.wire_args`) through the model's own HF-name loader,
        reading the message's bytes in place; the loader copies (and converts the dtype where
        the engine's differs). Returns bytes loaded."""
        flat = _typed_view(data, dtype)
        self.model_runner.model.load_weights(weights=_unflatten(names, [tuple(s) for s in shapes], flat))
        return len(data)

    def rft_finish_weight_sync(self) -> None:
        """Re-runs vLLM's post-load processing (CPU GEMM packing) on unquantized layers."""
        methods = _unquantized_methods()
        for module in self.model_runner.model.modules():
            qm = getattr(module, "quant_method", None)
            if isinstance(qm, methods):
                qm.process_weights_after_loading(module)

