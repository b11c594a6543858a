"""Bucketed weight publishing from the learner into vLLM engines.

The learner packs its parameters (HF names) into a few flat buckets; each bucket travels once
(Ray object store on CPU) and is unpacked inside the engine's worker process by
`WeightSyncExtension`, a vLLM `worker_extension_cls`.

Why begin/finish around the buckets: on CPU, vLLM packs every Linear weight into a oneDNN (or
AMX) handle after loading and frees `layer.weight`, and the lm_head keeps its own packed copy of
the embedding. Loading into the freed parameters would fail, and loading into kept ones would
not reach the packed handles. So `begin` re-creates the freed parameters exactly as vLLM's
constructor does, the buckets go through the model's own `load_weights` (which knows the
stacked qkv / gate_up layout), and `finish` re-runs the packing. On GPU nothing is freed or
packed, so begin/finish change nothing there.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import torch


@dataclass
class WeightBucket:
    """Several tensors of one dtype flattened into one buffer (one transfer, not one per tensor)."""

    names: list[str]
    shapes: list[tuple[int, ...]]
    flat: torch.Tensor

    @property
    def nbytes(self) -> int:
        return self.flat.numel() * self.flat.element_size()

    def wire_args(self) -> tuple[list[str], list[tuple[int, ...]], str, bytes]:
        """The bucket as `rft_load_weight_bucket` arguments."""
        return self.names, self.shapes, str(self.flat.dtype).removeprefix("torch."), self.flat.numpy().tobytes()

    def tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        offset = 0
        for name, shape in zip(self.names, self.shapes):
            n = 1
            for d in shape:
                n *= d
            yield name, self.flat[offset : offset + n].view(shape)
            offset += n


def pack_buckets(
    named_tensors: Iterable[tuple[str, torch.Tensor]], bucket_bytes: int
) -> Iterator[WeightBucket]:
    """Groups tensors (CPU copies) into buckets of at most `bucket_bytes` (one tensor may exceed
    it alone); a dtype change also starts a new bucket."""
    names: list[str] = []
    parts: list[torch.Tensor] = []
    size = 0

    def flush() -> WeightBucket:
        return WeightBucket(list(names), [tuple(p.shape) for p in parts], torch.cat([p.reshape(-1) for p in parts]))

    for name, t in named_tensors:
        t = t.detach().to("cpu")
        nb = t.numel() * t.element_size()
        if parts and (size + nb > bucket_bytes or t.dtype != parts[0].dtype):
            yield flush()
            names.clear(), parts.clear()
            size = 0
        names.append(name)
        parts.append(t)
        size += nb
    if parts:
        yield flush()


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
        """Loads one bucket through the model's own HF-name loader. Returns bytes loaded.

        The bucket arrives as plain fields: vLLM's RPC decoder returns untyped tensor arguments
        as lists, while raw bytes pass through intact."""
        flat = torch.frombuffer(bytearray(data), dtype=getattr(torch, dtype))
        bucket = WeightBucket(names, [tuple(s) for s in shapes], flat)
        self.model_runner.model.load_weights(weights=bucket.tensors())
        return bucket.nbytes

    def rft_finish_weight_sync(self) -> None:
        """Re-runs vLLM's post-load processing (CPU GEMM packing) on unquantized layers."""
        methods = _unquantized_methods()
        for module in self.model_runner.model.modules():
            qm = getattr(module, "quant_method", None)
            if isinstance(qm, methods):
                qm.process_weights_after_loading(module)

