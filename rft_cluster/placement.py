"""Places each role's actors with a Ray placement group, so a role the cluster cannot hold is
reported at start-up (which role, what it asks for, what the cluster has) instead of hanging.

One placement group per role, one bundle per actor (a learner: one per rank), made from
`cluster.resources.<role>`: cpus -> CPU, gpus -> GPU, memory_gb -> memory, custom `resources`
as they are, `node_labels` as the bundle's label selector (nodes carry labels from
`ray start --labels k=v` or KubeRay's `rayStartParams`). Ray rejects a bundle that asks for
nothing, so a role that needs no resources and no labels (tool proxies and graders by default:
they wait on the network) is scheduled without a placement group, reserving nothing; one that
asks only for labels reserves a token LABEL_ONLY_CPU per actor so that it can carry them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import ray
from ray.util.placement_group import PlacementGroup, placement_group, remove_placement_group
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from rft_cluster.config import ClusterSpec, RoleResources

LABEL_ONLY_CPU = 0.01
# A learner's ranks pack (they talk every step); network roles spread.
_STRATEGY = {"learner": "PACK", "tool_proxy": "SPREAD", "grader": "SPREAD"}


class PlacementError(RuntimeError):
    """Some role could not be placed within `cluster.placement_timeout_s`; the message says what is missing."""


def bundle(res: RoleResources) -> dict[str, float]:
    """One actor's bundle; empty when the role asks for nothing at all."""
    b = {"CPU": res.cpus, "GPU": res.gpus, **res.resources}
    if res.memory_gb:
        b["memory"] = float(int(res.memory_gb * 2**30))
    b = {k: float(v) for k, v in b.items() if v}
    if not b and res.node_labels:
        b = {"CPU": LABEL_ONLY_CPU}
    return b


@dataclass
class RolePlacement:
    """Where one role's `count` actors go: bundle i of `group`, or anywhere when `group` is None."""

    role: str
    count: int
    bundle: dict[str, float]
    labels: dict[str, str]
    group: PlacementGroup | None = None

    def options(self, index: int) -> dict[str, Any]:
        """The Ray `.options(...)` of actor `index`: exactly its bundle's resources, in its bundle."""
        if self.group is None:
            return {"num_cpus": 0, "num_gpus": 0}
        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU", "memory")}
        opts: dict[str, Any] = {
            "num_cpus": self.bundle.get("CPU", 0),
            "num_gpus": self.bundle.get("GPU", 0),
            "scheduling_strategy": PlacementGroupSchedulingStrategy(self.group, placement_group_bundle_index=index),
        }
        if "memory" in self.bundle:
            opts["memory"] = self.bundle["memory"]
        if custom:
            opts["resources"] = custom
        return opts

    def all_options(self) -> list[dict[str, Any]]:
        return [self.options(i) for i in range(self.count)]

    def describe(self) -> str:
        need = ", ".join(f"{k}={_fmt(k, v)}" for k, v in self.bundle.items()) or "nothing"
        labels = f" on nodes labelled {self.labels}" if self.labels else ""
        return f"{self.role} needs {self.count} x {{{need}}}{labels}"


class Placement:
    """Every role's placement of a run; `remove()` frees what was reserved."""

    def __init__(self, roles: dict[str, RolePlacement]):
        self.roles = roles

    def __getitem__(self, role: str) -> RolePlacement:
        return self.roles[role]

    def remove(self) -> None:
        for r in self.roles.values():
            if r.group is not None:
                remove_placement_group(r.group)
                r.group = None


def place(cluster: ClusterSpec, learner: bool = True) -> Placement:
    """Reserves the bundles of the learner (unless `learner` is False), tool proxies and graders
    and waits up to `placement_timeout_s` for all of them. On timeout, frees them all and raises
    PlacementError naming the roles left unplaced. (Rollout workers are placed slot by slot:
    `fleet.py`.)"""
    counts = {
        **({"learner": cluster.learner.ranks} if learner else {}),
        "tool_proxy": cluster.tool_proxies,
        "grader": cluster.graders,
    }
    roles = {}
    for role, count in counts.items():
        res: RoleResources = getattr(cluster.resources, role)
        r = RolePlacement(role, count, bundle(res), dict(res.node_labels))
        if r.bundle:
            r.group = placement_group(
                [r.bundle] * count,
                strategy=_STRATEGY[role],
                name=f"rft-{role}",
                bundle_label_selector=[r.labels] * count if r.labels else None,
            )
        roles[role] = r
    placement = Placement(roles)
    pending = {r.group.ready(): r for r in roles.values() if r.group is not None}
    ready, _ = ray.wait(list(pending), num_returns=len(pending), timeout=cluster.placement_timeout_s)
    unplaced = [r for ref, r in pending.items() if ref not in ready]
    if unplaced:
        message = describe_missing(unplaced, cluster.placement_timeout_s)
        placement.remove()
        raise PlacementError(message)
    return placement


def describe_missing(unplaced: list[RolePlacement], timeout: float) -> str:
    """One line: what each unplaced role asks for, against the cluster's total and free resources
    and, where labels are asked for, the labels its nodes carry."""
    total, free = ray.cluster_resources(), ray.available_resources()
    keys = sorted({k for r in unplaced for k in r.bundle})
    have = "; ".join(f"{k}: {_fmt(k, free.get(k, 0))} free of {_fmt(k, total.get(k, 0))}" for k in keys)
    text = f"could not place {', '.join(r.role for r in unplaced)} within {timeout:g} s: "
    text += "; ".join(r.describe() for r in unplaced) + f" — the cluster has {have}"
    if any(r.labels for r in unplaced):
        labels = [n.get("Labels", {}) for n in ray.nodes() if n.get("Alive")]
        user = [{k: v for k, v in lab.items() if not k.startswith("ray.io/")} for lab in labels]
        text += f"; node labels: {json.dumps(user)}"
    return text + " (cluster.resources.<role> in the job says what each actor needs)"


def _fmt(key: str, value: float) -> str:
    return f"{value / 2**30:.1f}GiB" if key == "memory" else f"{value:g}"


def actor_nodes(actors: list[Any]) -> list[str]:
    """The id of the node each actor runs on."""
    return ray.get([a.__ray_call__.remote(_node_id) for a in actors])


def _node_id(_actor: Any) -> str:
    return ray.get_runtime_context().get_node_id()
