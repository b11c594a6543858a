"""How weights travel from the learner into the rollout workers' vLLM engines: vLLM's own
weight-transfer protocol, with ours reduced to choosing the backend and talking to the fleet.

A publish is vLLM's four phases, driven by a trainer-side engine from vLLM's factory on every
learner rank (rank 0 sends; at ZeRO-3 the others take part in each gather):

    init_weight_transfer_engine   once per set of workers (a rendezvous for nccl)
    start_weight_update           each engine pauses between two steps, keeping its requests
    update_weights                per bucket (or one call around an NCCL broadcast)
    finish_weight_update          vLLM re-processes the weights; labelled with the new version

Backends (`cluster.engine.weight_transfer`): `nccl` (learner and engines on different GPUs),
`ipc` (CUDA IPC, learner and engines sharing a GPU), both vLLM's; `rft_shm` on CPU, ours
(`shm_transfer.py`), registered in vLLM's factories under that name. `FleetClient` is vLLM's
`VLLMWeightSyncClient` over the rollout workers' Ray actors: it fans each phase out, sets aside
a worker whose actor died (the fleet replaces it) and lets the others finish the publish.

Nothing here imports vLLM at module level: the learner's weight source (`NamedWeights`) runs
where only torch is installed (benchmarks/gpu_check.py).
"""

from __future__ import annotations

import functools
import math
import socket
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol

import torch

CPU_BACKEND = "rft_shm"  # shm_transfer.BACKEND, without importing vLLM here
BACKENDS = ("auto", CPU_BACKEND, "nccl", "ipc")


def resolve_backend(setting: str, on_gpu: bool) -> str:
    """`auto`: ours for a CPU engine; for a GPU engine `nccl` (the placement gives the learner and
    the engines GPUs of their own; `ipc` is for a learner sharing an engine's GPU, set explicitly)."""
    if setting != "auto":
        return setting
    return "nccl" if on_gpu else CPU_BACKEND


@dataclass(frozen=True)
class WeightMeta:
    """One parameter as vLLM's `ParamMeta`: HF name, dtype on the wire, full shape."""

    name: str
    dtype: torch.dtype
    shape: tuple[int, ...]


class NamedWeights:
    """vLLM's `WeightSource` protocol: what will be sent (`metadata`, without materialising
    anything) and a fresh pass over (name, tensor) pairs for each publish, each tensor valid until
    the next is requested (a ZeRO-3 gather)."""

    def __init__(self, meta: list[WeightMeta], produce: Callable[[], Iterator[tuple[str, torch.Tensor]]]):
        self._meta = meta
        self._produce = produce

    @classmethod
    def of(cls, tensors: Mapping[str, torch.Tensor]) -> NamedWeights:
        """Tensors already in memory (tests, benchmarks)."""
        meta = [WeightMeta(n, t.dtype, tuple(t.shape)) for n, t in tensors.items()]
        return cls(meta, lambda: iter(tensors.items()))

    def metadata(self) -> list[WeightMeta]:
        return self._meta

    def held_names(self) -> None:
        return None  # every rank can produce every parameter (gathering when partitioned)

    def __iter__(self) -> Iterator[tuple[str, torch.Tensor]]:
        return self._produce()

    def nbytes(self) -> int:
        return sum(m.dtype.itemsize * math.prod(m.shape) for m in self._meta)


@dataclass(frozen=True)
class PublishResult:
    """What a publish did: bytes (one copy of the weights), seconds, buckets (0 where the backend
    streams), and `lost`, the indices into the workers given whose actor died (they missed the
    rest of the publish; the fleet replaces them)."""

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


class FleetClient:
    """vLLM's `VLLMWeightSyncClient` over rollout workers (Ray actors with the same four methods).

    Each call goes to every worker still alive and waits for all; a worker whose actor died is
    set aside in `lost` and skipped from then on (any other error raises). The version the
    publish labels its weights with is the client's (`finish_weight_update` is called without
    one by vLLM's trainer engines)."""

    def __init__(self, workers: list[Any], engine_ranks: int):
        self.workers = workers
        self.engine_ranks = engine_ranks  # vLLM worker processes per engine (tensor parallel)
        self.nodes: dict[int, str] = {}
        self.version = 0
        self.lost: list[int] = []

    def _call(self, method: str, args: Callable[[int], tuple[Any, ...]] = lambda i: ()) -> dict[int, Any]:
        import ray

        refs = {i: getattr(w, method).remote(*args(i)) for i, w in enumerate(self.workers) if i not in self.lost}
        out = {}
        for i, ref in refs.items():
            try:
                out[i] = ray.get(ref)
            except ray.exceptions.RayActorError:
                self.lost.append(i)
        return out

    def init_weight_transfer_engine(self, init_info: dict[str, Any]) -> None:
        def per_worker(i: int) -> tuple[dict[str, Any]]:
            # A rendezvous (nccl) numbers trainer rank 0 first, then every engine's workers in turn.
            if "rank_offset" in init_info:
                return ({**init_info, "rank_offset": 1 + i * self.engine_ranks},)
            return (init_info,)

        self.nodes = self._call("init_weight_transfer_engine", per_worker)

    def start_weight_update(self) -> None:
        self._call("start_weight_update")

    def update_weights(self, update_info: dict[str, Any] | list[dict[str, Any]]) -> None:
        here = _node_id()
        elsewhere = functools.cache(lambda: _through_object_store(update_info))  # put once, on first need
        self._call("update_weights", lambda i: (update_info if self.nodes.get(i) == here else elsewhere(),))

    def finish_weight_update(self, weight_version: str | None = None) -> None:
        self._call("finish_weight_update", lambda i: (self.version,))


def _through_object_store(update_info: Any) -> Any:
    """A staged bucket lies in this node's shared memory: a worker on another node gets its bytes
    through Ray's object store instead. Anything else (nccl, ipc) goes as it is."""
    if not (isinstance(update_info, dict) and "path" in update_info):
        return update_info
    import numpy as np
    import ray

    with open(update_info["path"], "rb") as f:
        data = np.fromfile(f, dtype=np.uint8, count=update_info["nbytes"])
    return {**update_info, "bucket": ray.put(data)}


def _node_id() -> str | None:
    import ray

    return ray.get_runtime_context().get_node_id() if ray.is_initialized() else None


class _TrainerEngine(Protocol):
    client: Any
    source: Any

    def send_weights(self) -> None: ...
    def shutdown(self) -> None: ...


# The trainer-side engine of this process, kept across publishes to the same workers (an NCCL
# group is built once), rebuilt when the set of workers changes (a join, a loss).
_current: tuple[tuple[Any, ...], _TrainerEngine, FleetClient] | None = None


def _trainer_engine(backend: str, workers: list[Any], rank: int, bucket_bytes: int, engine_ranks: int,
                    source: NamedWeights) -> tuple[_TrainerEngine, FleetClient]:
    global _current
    key = (backend, tuple(w._actor_id.hex() if hasattr(w, "_actor_id") else id(w) for w in workers), rank, bucket_bytes)
    if _current is not None and _current[0] == key:
        _, engine, client = _current
        engine.source = source
        client.lost = []
        return engine, client
    if _current is not None:
        _current[1].shutdown()
        _current = None
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from rft_cluster import shm_transfer

    shm_transfer.register()
    client = FleetClient(workers, engine_ranks)
    engine = WeightTransferTrainerFactory.trainer_init(_init_info(backend, rank, bucket_bytes, 1 + len(workers) * engine_ranks),
                                                       client=client, source=source)
    _current = (key, engine, client)
    return engine, client


def _init_info(backend: str, rank: int, bucket_bytes: int, world_size: int) -> Any:
    """The trainer side's init info for `backend` (vLLM's dataclasses; unrun on GPUs here)."""
    if backend == CPU_BACKEND:
        from rft_cluster.shm_transfer import ShmTrainerInitInfo

        return ShmTrainerInitInfo(rank=rank, bucket_bytes=bucket_bytes)
    if backend == "ipc":
        from vllm.distributed.weight_transfer.ipc_engine import IPCTrainerInitInfo

        return IPCTrainerInitInfo(rank=rank, packed=True, packed_buffer_size_bytes=bucket_bytes)
    if backend == "nccl":
        import ray
        from vllm.distributed.weight_transfer.nccl_engine import NCCLTrainerInitInfo

        with socket.socket() as s:  # a free port for the rendezvous, on this (rank 0's) node
            s.bind(("", 0))
            port = s.getsockname()[1]
        return NCCLTrainerInitInfo(rank=rank, master_address=ray.util.get_node_ip_address(), master_port=port,
                                   world_size=world_size, packed=True, packed_buffer_size_bytes=bucket_bytes)
    raise ValueError(f"unknown weight transfer backend {backend!r}; known: {', '.join(BACKENDS[1:])}")


def publish(source: NamedWeights, workers: list[Any], version: int, bucket_bytes: int, *, backend: str = CPU_BACKEND,
            rank: int = 0, engine_ranks: int = 1) -> PublishResult:
    """Sends `source` to every worker as `version` through vLLM's protocol, from this process as
    trainer `rank` (only rank 0 talks to the workers; the others take part in the gathers). A
    worker that dies is left out from then on and reported in `lost`; the source is read to the
    end whatever happens (ZeRO-3 gathers are collectives)."""
    t0 = time.perf_counter()
    engine, client = _trainer_engine(backend, workers, rank, bucket_bytes, engine_ranks, source)
    client.version = version
    engine.send_weights()
    return PublishResult(source.nbytes(), time.perf_counter() - t0, getattr(engine, "buckets", 0), list(client.lost))


@dataclass(frozen=True)
class Publish:
    """`publish` as a job for every learner rank: it travels to each rank's process (which holds
    the weights) and runs there on the rank's `NamedWeights` (`Learner.publish`)."""

    workers: list[Any]
    version: int
    bucket_bytes: int
    backend: str
    dtype: str | None  # the engines' dtype on the wire; None: as the learner holds them
    engine_ranks: int = 1

    def __call__(self, source: NamedWeights, rank: int) -> PublishResult | None:
        result = publish(source, self.workers, self.version, self.bucket_bytes, backend=self.backend, rank=rank,
                         engine_ranks=self.engine_ranks)
        return result if rank == 0 else None


class WeightPublisher(Protocol):
    """What publishes: a `Learner` or a `LearnerGroup` (every rank runs the `Publish`)."""

    def publish(self, job: Publish) -> PublishResult | None: ...


def publish_from(learner: WeightPublisher, job: Publish) -> PublishResult:
    """The learner's current weights into every worker of `job` (see `publish`)."""
    result = learner.publish(job)
    if result is None:
        raise RuntimeError("the learner's rank 0 returned no publish result")
    return result
