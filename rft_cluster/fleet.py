"""The rollout fleet: elastic, and it outlives any one rollout worker.

Each of the fleet's `max` slots has its own placement group of one bundle, so every slot is
placed on its own as the cluster grows (a pending group is what Ray's autoscaler scales up
for). Sampling starts once `min` workers are up; a worker that comes up later joins the run
after the driver has loaded the current weights into it (`joined()`), so its first rollout
samples from the learner's version.

A worker that dies (its process killed, its node lost) is replaced in the same slot: a fresh
actor in the slot's placement group (which Ray re-places when its node is gone), joining like
any other. Each of the dead worker's unfinished rollouts comes back from `result()` as a lost
record, once; the driver re-runs its request on the survivors.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

import ray
from ray.exceptions import RayActorError
from ray.util.placement_group import placement_group, remove_placement_group

from rft_cluster.config import ClusterSpec
from rft_cluster.placement import PlacementError, RolePlacement, actor_nodes, bundle, describe_missing
from rft_cluster.rollout_worker import RolloutWorker, SamplingSettings
from rft_cluster.types import RolloutRequest, Trajectory

MAX_SLOT_RESTARTS = 3  # replacements of a worker that keeps dying before it comes up


@dataclass
class Slot:
    """One place for a rollout worker: its placement, and the worker in it (if any)."""

    index: int
    placement: RolePlacement
    worker: Any = None
    starting: Any = None  # the ObjectRef of `worker.start()` until the engine is up
    up: bool = False  # started and holding the current weights: takes rollouts
    node_id: str | None = None
    inflight: set[Any] = field(default_factory=set)  # refs of its unfinished rollouts
    started_at: float = 0.0
    restarts: int = 0


@dataclass
class Lost:
    """A rollout whose worker died before it finished: recorded once, then re-run."""

    request: RolloutRequest
    error: str
    node_id: str | None


class RolloutFleet:
    def __init__(self, cluster: ClusterSpec, model: str, seed: int, proxies: list[Any]):
        self.spec = cluster
        self.model = model
        self.seed = seed
        self.proxies = proxies
        res = cluster.resources.rollout_worker
        self.slots = [
            Slot(i, RolePlacement("rollout_worker", 1, bundle(res), dict(res.node_labels))) for i in range(cluster.fleet.max)
        ]
        self._rollouts: dict[Any, tuple[Slot, Any, RolloutRequest]] = {}  # ref -> (slot, its worker then, request)
        self.joins: list[dict[str, Any]] = []  # one record per worker that joined after the start
        self.losses = 0
        self._t0 = time.perf_counter()

    # ------------------------------------------------------------------ life cycle

    def launch(self) -> None:
        """Asks for every slot and starts an engine in each as soon as it is placed (returns at once)."""
        self._t0 = time.perf_counter()
        for s in self.slots:
            p = s.placement
            if p.bundle:
                p.group = placement_group([p.bundle], name=f"rft-rollout_worker-{s.index}",
                                          bundle_label_selector=[p.labels] if p.labels else None)
            self._launch(s)

    def placed(self) -> None:
        """Waits `placement_timeout_s` for `min` slots to be placed; else frees everything and
        raises PlacementError naming what is missing."""
        need = self.spec.fleet.min
        placed = [s.placement.group.ready() for s in self.slots if s.placement.group is not None]
        if placed:
            ready, _ = ray.wait(placed, num_returns=min(need, len(placed)), timeout=self.spec.placement_timeout_s)
            missing = need - len(ready) - (len(self.slots) - len(placed))
            if missing > 0:
                unplaced = RolePlacement("rollout_worker", missing, self.slots[0].placement.bundle, self.slots[0].placement.labels)
                message = describe_missing([unplaced], self.spec.placement_timeout_s)
                self.remove()
                raise PlacementError(message)

    def start(self) -> dict[str, Any]:
        """Waits for the first `min` engines to come up (the other slots keep waiting for room
        and join later, `poll`); returns the startup time and the parsers the engines read turns
        with (`RolloutWorker.start`)."""
        need = self.spec.fleet.min
        starting = {s.starting: s for s in self.slots}
        up, _ = ray.wait(list(starting), num_returns=need)
        facts = [self._started(starting[ref], ref) for ref in up]
        return {"startup_s": time.perf_counter() - self._t0, "parsers": facts[0]["parsers"], "weight_transfer": facts[0]["weight_transfer"]}

    def _launch(self, s: Slot) -> None:
        s.worker = ray.remote(RolloutWorker).options(**s.placement.options(0), max_restarts=0).remote(
            self.model, self.spec.engine, self.seed + s.index + 1000 * s.restarts, self.proxies
        )
        s.starting, s.up, s.node_id, s.started_at = s.worker.start.remote(), False, None, time.perf_counter()

    def _started(self, s: Slot, ref: Any) -> dict[str, Any]:
        facts = ray.get(ref)  # an engine that fails to start at launch fails the run: it is a setup error
        s.starting, s.up, s.node_id = None, True, actor_nodes([s.worker])[0]
        return facts

    def pending(self) -> list[Any]:
        """Refs the driver waits on besides rollouts: engines starting up."""
        return [s.starting for s in self.slots if s.starting is not None]

    def poll(self, ready: list[Any]) -> list[Slot]:
        """The slots whose engines came up among `ready` refs: they need the current weights,
        then `joined()`. A worker that died while starting is replaced (up to
        MAX_SLOT_RESTARTS times a slot); one whose engine failed to start is reported and its
        slot given up, so the run goes on with the others."""
        out = []
        for s in self.slots:
            if s.starting is None or s.starting not in ready:
                continue
            try:
                ray.get(s.starting)
                s.node_id = actor_nodes([s.worker])[0]
            except RayActorError as e:
                if s.restarts < MAX_SLOT_RESTARTS:
                    self._replace(s, type(e).__name__)
                else:
                    self._give_up(s, f"died {s.restarts + 1} times while starting")
                continue
            except Exception as e:  # noqa: BLE001 - a late worker's failure must not end the run
                self._give_up(s, f"{type(e).__name__}: {str(e)[:300]}")
                continue
            s.starting = None
            out.append(s)
        return out

    def _give_up(self, s: Slot, reason: str) -> None:
        print(f"[rft] rollout worker {s.index} could not start ({reason}); the run goes on without it", flush=True)
        ray.kill(s.worker)
        s.worker, s.starting, s.up = None, None, False
        if s.placement.group is not None:
            remove_placement_group(s.placement.group)
            s.placement.group = None

    def joined(self, s: Slot, version: int, seconds_to_weights: float) -> None:
        s.up = True
        self.joins.append({"slot": s.index, "node_id": s.node_id, "version": version,
                           "start_s": round(time.perf_counter() - s.started_at, 2), "weights_s": round(seconds_to_weights, 3)})

    def remove(self) -> None:
        """Ends every worker and frees the slots' placement groups."""
        live = [s.worker for s in self.slots if s.worker is not None]
        try:
            ray.get([w.shutdown.remote() for w in live], timeout=60)
        except Exception:  # noqa: BLE001 - a dead or stuck engine must not stop the teardown
            pass
        for s in self.slots:
            if s.worker is not None:
                ray.kill(s.worker)
            if s.placement.group is not None:
                remove_placement_group(s.placement.group)
                s.placement.group = None

    # ------------------------------------------------------------------ rollouts

    @property
    def workers(self) -> list[Any]:
        """The workers taking rollouts (up, holding the current weights)."""
        return [s.worker for s in self.slots if s.up]

    def node_ids(self) -> list[str]:
        return [s.node_id for s in self.slots if s.up and s.node_id]

    def submit_group(self, requests: list[RolloutRequest], settings: SamplingSettings) -> list[Any]:
        """Starts a GRPO group's rollouts on one worker (they share the prompt's KV cache there):
        the one with the fewest unfinished rollouts."""
        slot = min((s for s in self.slots if s.up), key=lambda s: len(s.inflight))
        return [self._submit(slot, r, settings) for r in requests]

    def _submit(self, slot: Slot, request: RolloutRequest, settings: SamplingSettings) -> Any:
        ref = slot.worker.rollout.remote(request, settings)
        slot.inflight.add(ref)
        self._rollouts[ref] = (slot, slot.worker, request)
        return ref

    def result(self, ref: Any) -> Trajectory | Lost:
        """The finished rollout of `ref`, or a Lost record when its worker died (the worker is
        then replaced in its slot)."""
        slot, worker, request = self._rollouts.pop(ref)
        slot.inflight.discard(ref)
        try:
            return ray.get(ref)
        except RayActorError as e:
            node = slot.node_id
            self.lost(worker, type(e).__name__)
            return Lost(request, f"rollout worker {slot.index} died mid-rollout ({type(e).__name__})", node)

    def lost(self, worker: Any, reason: str) -> None:
        """`worker` is dead: take it out of service and start a replacement in its slot (once,
        however many of its calls report the death). Its unfinished rollouts still come back
        through `result()`, each as Lost."""
        slot = next((s for s in self.slots if s.worker is worker), None)
        if slot is not None:
            self._replace(slot, reason)

    def _replace(self, slot: Slot, reason: str) -> None:
        self.losses += 1
        slot.up = False
        ray.kill(slot.worker)
        slot.restarts += 1
        print(f"[rft] rollout worker {slot.index} lost ({reason}); starting a replacement in its slot", flush=True)
        self._launch(slot)
