"""The learner as `ranks` Ray actors forming one data-parallel DeepSpeed world.

The driver's one handle on the learner: its methods are synchronous (they wait on the ranks)
and make every rank take part, because steps, ZeRO-3 weight gathers and checkpoints are
collectives. Rendezvous goes through the driver: rank 0's actor picks a free port on its own
node, and every rank then joins at that address (no fixed port, so runs can share nodes).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import ray

from rft_cluster.config import LearnerSpec
from rft_cluster.learner import Learner, Rendezvous, free_port
from rft_cluster.storage import RunStorage
from rft_cluster.types import TrainSample
from rft_cluster.weight_transfer import Publish, PublishResult


@dataclass(frozen=True)
class RankPlacement:
    """Where a rank runs (for placement records)."""

    rank: int
    node_id: str
    node_ip: str
    gpu_ids: list[str]


class LearnerRank:
    """One rank's actor: empty until `start`, so that the driver can ask rank 0 for an address
    before any rank joins the world."""

    def __init__(self) -> None:
        self.learner: Learner | None = None

    def node(self) -> tuple[str, str, list[str]]:
        """(node id, node IP, GPU ids Ray gave this actor)."""
        return ray.get_runtime_context().get_node_id(), ray.util.get_node_ip_address(), [str(g) for g in ray.get_gpu_ids()]

    def free_port(self) -> int:
        return free_port(ray.util.get_node_ip_address())

    def start(self, rendezvous: Rendezvous, visible_gpus: str | None, args: tuple[Any, ...]) -> None:
        if visible_gpus is not None:
            # Before CUDA starts in this process: LOCAL_RANK must index this rank's own GPU.
            os.environ["CUDA_VISIBLE_DEVICES"] = visible_gpus
        self.learner = Learner(*args, rendezvous=rendezvous)

    def call(self, method: str, *args: Any) -> Any:
        return getattr(self.learner, method)(*args)


def split_by_tokens(samples: Sequence[TrainSample], parts: int) -> list[list[TrainSample]]:
    """Longest first, each sample to the part with the fewest tokens so far: balanced compute."""
    shares: list[list[TrainSample]] = [[] for _ in range(parts)]
    load = [0] * parts
    for s in sorted(samples, key=lambda s: len(s.token_ids), reverse=True):
        i = load.index(min(load))
        shares[i].append(s)
        load[i] += len(s.token_ids)
    return shares


def _wait_all(refs: list[ray.ObjectRef]) -> list[Any]:
    """Results in order; fails as soon as any rank fails (its peers would wait in a collective)."""
    pending = list(refs)
    while pending:
        done, pending = ray.wait(pending, num_returns=1)
        ray.get(done)
    return ray.get(refs)


class LearnerGroup:
    """`spec.ranks` `Learner`s in one DeepSpeed world (gloo on CPU, nccl on GPU), data parallel:
    each step's samples are split across ranks, and the result equals one rank's step on the
    whole batch. `actor_options[i]` are Ray `.options(...)` for rank i (placement, CPUs, GPUs);
    by default each rank takes one CPU."""

    def __init__(
        self,
        model: str,
        spec: LearnerSpec,
        learning_rate: float,
        clip_epsilon: float,
        seed: int,
        warmup_steps: int = 0,
        kl_coef: float = 0.0,
        actor_options: list[dict[str, Any]] | None = None,
        *,
        old_logprobs: Literal["learner", "engine"] = "learner",
        tis_cap: float | None = 2.0,
    ):
        options = actor_options if actor_options is not None else [{"num_cpus": 1}] * spec.ranks
        if len(options) != spec.ranks:
            raise ValueError(f"actor_options: {len(options)} entries for learner.ranks = {spec.ranks}")
        actor = ray.remote(LearnerRank)
        self.actors = [actor.options(**o).remote() for o in options]
        try:
            nodes = _wait_all([a.node.remote() for a in self.actors])
            self.ranks = [RankPlacement(i, *n) for i, n in enumerate(nodes)]
            addr, port = self.ranks[0].node_ip, ray.get(self.actors[0].free_port.remote())
            args = (model, spec, learning_rate, clip_epsilon, seed, warmup_steps, kl_coef, old_logprobs, tis_cap)
            starts = []
            for r, a in zip(self.ranks, self.actors):
                peers = [p for p in self.ranks if p.node_id == r.node_id]  # in rank order
                local = peers.index(r)
                # Ray shows each actor only its own GPUs; a rank sees its node's ranks' GPUs
                # (one each) so that device LOCAL_RANK is its own, as torchrun would have it.
                gpus = ",".join(p.gpu_ids[0] for p in peers) if all(p.gpu_ids for p in peers) else None
                rdv = Rendezvous(r.rank, spec.ranks, local, addr, port)
                starts.append(a.start.remote(rdv, gpus, args))
            _wait_all(starts)
        except BaseException:
            self.shutdown()
            raise

    def _all(self, method: str, *args: Any) -> list[Any]:
        return _wait_all([a.call.remote(method, *args) for a in self.actors])

    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One GRPO step on the whole batch (see `Learner.train_step`)."""
        shares = split_by_tokens(samples, len(self.actors))
        return _wait_all([a.call.remote("train_step", s) for a, s in zip(self.actors, shares)])[0]

    def publish(self, job: Publish) -> PublishResult:
        """Every rank runs `job` (see `Learner.publish`); rank 0's result."""
        return self._all("publish", job)[0]

    def compute_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        return self._all("compute_logprobs", token_ids)[0]

    # Checkpoint methods run on every rank with the same arguments (DeepSpeed's checkpoint and
    # ZeRO-3 gathers are collectives); they return rank 0's result.
    def save_hf(self, storage: RunStorage, rel: str) -> str:
        return self._all("save_hf", storage, rel)[0]

    def save_state(self, storage: RunStorage, rel: str, tag: str) -> None:
        self._all("save_state", storage, rel, tag)

    def load_state(self, storage: RunStorage, rel: str, tag: str) -> None:
        self._all("load_state", storage, rel, tag)

    def shutdown(self) -> None:
        """Ends every rank's actor (and so its process group)."""
        for a in self.actors:
            ray.kill(a)
        self.actors = []
