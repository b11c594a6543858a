"""`rft_shm`: the weight-transfer backend for CPU engines, registered in vLLM's factories.

vLLM ships backends for GPUs (`nccl` between GPUs, `ipc` on a shared GPU); this one moves the
same four-phase protocol (`init_weight_transfer_engine`, `start_weight_update`, `update_weights`
per bucket, `finish_weight_update`) through shared memory on CPU. The trainer (learner rank 0)
packs its weights into buckets in memfds of its own (`staging.py`); an engine's worker process
on the same node maps the file through /proc and copies the bucket out. A rollout worker on
another node gets the bucket through Ray's object store and stages it in its own memfd first
(`weight_transfer.FleetClient`). Two staging areas alternate, so the trainer packs the next
bucket while the engines load the last one.

Loading is vLLM's own: `load_weights` between `initialize_layerwise_reload` and
`finalize_layerwise_reload`, as its GPU backends do, which re-creates the parameters that CPU
GEMM packing freed and re-packs them afterwards.

`register` is the `vllm.general_plugins` entry point (pyproject.toml): vLLM calls it in every
process it starts, so the engine's workers know the backend by name.
"""

from __future__ import annotations

from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np
import torch
from vllm.distributed.weight_transfer.base import (
    TrainerInitInfo,
    TrainerWeightTransferEngine,
    VLLMWeightSyncClient,
    WeightSource,
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from rft_cluster.staging import Mappings, Staging, pack, unflatten

BACKEND = "rft_shm"


def register() -> None:
    """Registers both sides of `rft_shm` in vLLM's factories (idempotent: plugins load per process,
    and the trainer side registers again before its first publish)."""
    from vllm.distributed.weight_transfer.factory import (
        WeightTransferEngineFactory,
        WeightTransferTrainerFactory,
    )

    for factory, cls in ((WeightTransferEngineFactory, ShmWeightTransferEngine), (WeightTransferTrainerFactory, ShmTrainerWeightTransferEngine)):
        if BACKEND not in factory._registry:
            factory.register_engine(BACKEND, cls)


# ---------------------------------------------------------------- trainer side


@dataclass
class ShmTrainerInitInfo(TrainerInitInfo):
    backend: ClassVar[str] = BACKEND
    bucket_bytes: int = 64 << 20


class ShmTrainerWeightTransferEngine(TrainerWeightTransferEngine[ShmTrainerInitInfo]):
    """Trainer side: every rank iterates the source (ZeRO-3 gathers are collectives); rank 0
    packs into its staging areas and ships each bucket's location through the client, one
    bucket in flight while the next is packed."""

    init_info_cls = ShmTrainerInitInfo

    def __init__(self, *, client: VLLMWeightSyncClient, source: WeightSource, is_sender: bool, bucket_bytes: int) -> None:
        super().__init__(client=client, source=source, is_sender=is_sender)
        self.bucket_bytes = bucket_bytes
        self.areas = [Staging(), Staging()]
        self.buckets = 0
        self.nbytes = 0

    @classmethod
    def trainer_init(cls, init_info: ShmTrainerInitInfo, *, client: VLLMWeightSyncClient, source: WeightSource | None = None) -> ShmTrainerWeightTransferEngine:
        if source is None:
            raise ValueError(f"{BACKEND} weight transfer needs a WeightSource")
        engine = cls(client=client, source=source, is_sender=init_info.is_sender, bucket_bytes=init_info.bucket_bytes)
        if engine.is_sender:
            client.init_weight_transfer_engine({})
        return engine

    def send_weights(self) -> None:
        assert self.source is not None
        if not self.is_sender:
            for _ in self.source:
                pass
            return
        self.buckets = self.nbytes = 0
        weights = iter(self.source)
        try:
            self.client.start_weight_update()
            with ThreadPoolExecutor(max_workers=1) as exe:
                loading: Future[None] | None = None
                for bucket in pack(weights, self.areas, self.bucket_bytes):
                    if loading is not None:
                        loading.result()  # the engines are done with the area before the next pack reuses it
                    loading = exe.submit(self.client.update_weights, bucket.update_info())
                    self.buckets += 1
                    self.nbytes += bucket.nbytes
                if loading is not None:
                    loading.result()
            self.client.finish_weight_update()
        except BaseException:
            for _ in weights:  # the other ranks wait in each ZeRO-3 gather until this one reads it
                pass
            raise


# ---------------------------------------------------------------- engine side


@dataclass
class ShmWeightTransferInitInfo(WeightTransferInitInfo):
    pass


@dataclass
class ShmWeightTransferUpdateInfo(WeightTransferUpdateInfo):
    names: list[str]
    dtype_names: list[str]
    shapes: list[list[int]]
    path: str
    nbytes: int


class ShmWeightTransferEngine(WeightTransferEngine[ShmWeightTransferInitInfo, ShmWeightTransferUpdateInfo]):
    """Engine side (in each vLLM worker process): maps the staging file a bucket lies in and
    loads it through the model's own HF-name loader (which knows the stacked qkv / gate_up
    layout, and converts the dtype where the engine's differs)."""

    init_info_cls = ShmWeightTransferInitInfo
    update_info_cls = ShmWeightTransferUpdateInfo

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self._mappings = Mappings()

    def init_transfer_engine(self, init_info: ShmWeightTransferInitInfo) -> None:
        pass  # nothing to rendezvous: every bucket says where it lies

    def start_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import initialize_layerwise_reload

        initialize_layerwise_reload(self.model)

    def update_weights(self, update_info: dict[str, Any]) -> None:
        # The base class synchronises the accelerator after each bucket; a CPU load is done when it returns.
        self.receive_weights(self.parse_update_info(update_info))

    def receive_weights(self, update_info: ShmWeightTransferUpdateInfo) -> None:
        # Copied out of the staging area first: the reload may hold a layer's tensors until the
        # rest of it arrives (a later bucket, or `finish` for a padded one), and the trainer packs
        # the bucket after next into this area meanwhile. (vLLM's NCCL path receives each chunk
        # into fresh memory for the same reason.)
        view = self._mappings.view(update_info.path, update_info.nbytes)
        own = torch.empty(update_info.nbytes, dtype=torch.uint8)
        own.numpy()[:] = np.frombuffer(view, np.uint8)
        self.model.load_weights(weights=unflatten(update_info.names, update_info.shapes, update_info.dtype_names, own.numpy()))

    def finish_weight_update(self) -> None:
        from vllm.model_executor.model_loader.reload import finalize_layerwise_reload

        finalize_layerwise_reload(self.model, self.model_config)
        if self.model_config.hf_config.get_text_config().tie_word_embeddings:
            self._repack_tied_heads()

    def _repack_tied_heads(self) -> None:
        """A tied LM head loads nothing of its own (its weight is the embedding's, which the reload
        updated in place), so the reload leaves its CPU GEMM handle, packed from the old weights,
        as it was: pack it again from the new ones."""
        from vllm.model_executor.layers.vocab_parallel_embedding import (
            ParallelLMHead,
            UnquantizedEmbeddingMethod,
        )

        for module in self.model.modules():
            if isinstance(module, ParallelLMHead) and isinstance(module.quant_method, UnquantizedEmbeddingMethod):
                module.quant_method.process_weights_after_loading(module)

    def shutdown(self) -> None:
        self._mappings.close()
