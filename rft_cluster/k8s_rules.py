"""What the apiserver or the KubeRay v1.7 operator refuses in a manifest beyond its CRD's schema
(`rft-cluster k8s` checks its own output with this; the tests check it can fail)."""

from __future__ import annotations

import re
from decimal import Decimal
from typing import Any

MAX_NAME = {"RayCluster": 53, "RayJob": 47}  # the operator's limits (a RayJob's own cluster adds 6 characters)
SUBMISSION_MODES = ("K8sJobMode", "HTTPMode", "InteractiveMode", "SidecarMode")

_DNS1035 = re.compile(r"[a-z]([-a-z0-9]*[a-z0-9])?")
_DNS1123_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_QUANTITY = re.compile(r"([+-]?(?:\d+\.?\d*|\.\d+))(Ki|Mi|Gi|Ti|Pi|Ei|[numkMGTPE]|[eE][+-]?\d+)?")
_BINARY = {"Ki": 2**10, "Mi": 2**20, "Gi": 2**30, "Ti": 2**40, "Pi": 2**50, "Ei": 2**60}
_DECIMAL = {"n": -9, "u": -6, "m": -3, "": 0, "k": 3, "M": 6, "G": 9, "T": 12, "P": 15, "E": 18}


def quantity(text: str | int | float) -> Decimal:
    """A Kubernetes quantity's value (`500m` -> 0.5, `8Gi` -> 8589934592); ValueError if malformed."""
    m = _QUANTITY.fullmatch(str(text))
    if m is None:
        raise ValueError(f"not a Kubernetes quantity: {text!r}")
    number, suffix = Decimal(m.group(1)), m.group(2) or ""
    if suffix in _BINARY:
        return number * _BINARY[suffix]
    if suffix[:1] in ("e", "E"):
        return number.scaleb(int(suffix[1:]))
    return number.scaleb(_DECIMAL[suffix])


def manifest_problems(doc: dict[str, Any]) -> list[str]:
    """What the apiserver or the KubeRay operator would refuse in `doc` beyond its CRD's schema:
    names, group names, label syntax, requests <= limits, min <= replicas <= max."""
    kind, name = doc.get("kind", "?"), doc.get("metadata", {}).get("name", "")
    where = f"{kind} {name!r}"
    problems = []
    if kind in MAX_NAME:
        if not _DNS1035.fullmatch(name) or len(name) > MAX_NAME[kind]:
            problems.append(f"{where}: the name must be a DNS-1035 label of at most {MAX_NAME[kind]} characters")
    elif not _DNS1123_SUBDOMAIN.fullmatch(name) or len(name) > 253:
        problems.append(f"{where}: the name must be a DNS-1123 subdomain")
    spec = doc.get("spec", {})
    if kind == "RayJob":
        if spec.get("submissionMode", "K8sJobMode") not in SUBMISSION_MODES:
            problems.append(f"{where}: submissionMode must be one of {', '.join(SUBMISSION_MODES)}")
        if not spec.get("clusterSelector", {}).get("ray.io/cluster") and "rayClusterSpec" not in spec:
            problems.append(f"{where}: needs clusterSelector['ray.io/cluster'] or rayClusterSpec")
        spec = spec.get("rayClusterSpec", {})
    if kind in MAX_NAME and spec:
        problems += [f"{where}: {p}" for p in _cluster_problems(spec)]
    return problems


def _cluster_problems(spec: dict[str, Any]) -> list[str]:
    problems = []
    groups = [("head", spec.get("headGroupSpec", {}))] + [(g.get("groupName", ""), g) for g in spec.get("workerGroupSpecs", [])]
    names = [n for n, _ in groups[1:]]
    problems += [f"worker group name {n!r} is used more than once" for n in sorted(set(names)) if names.count(n) > 1]
    for group, g in groups:
        start = g.get("rayStartParams", {})
        if "labels" in start:
            problems.append(f"group {group}: node labels go in the group's `labels`, not rayStartParams")
        if g.get("resources") and any(k in start for k in ("num-cpus", "num-gpus", "memory", "resources")):
            problems.append(f"group {group}: Ray resources set in both `resources` and rayStartParams")
        for key, value in g.get("labels", {}).items():
            if not _label_key_ok(key) or not (value == "" or (len(value) <= 63 and _LABEL_NAME.fullmatch(value))):
                problems.append(f"group {group}: label {key}={value!r} is not a valid Kubernetes label")
        if group != "head":
            low, count, high = g.get("minReplicas", 0), g.get("replicas", g.get("minReplicas", 0)), g.get("maxReplicas", 2**31 - 1)
            if not low <= count <= high:
                problems.append(f"group {group}: needs minReplicas <= replicas <= maxReplicas, got {low} <= {count} <= {high}")
        pod = g.get("template", {}).get("spec", {})
        for c in pod.get("initContainers", []) + pod.get("containers", []):
            problems += [f"group {group}: container {c.get('name')!r}: {p}" for p in _request_problems(c.get("resources", {}))]
    if spec.get("authOptions", {}).get("mode") == "token" and not spec.get("rayVersion"):
        problems.append("authOptions.mode token needs rayVersion (>= 2.52.0)")
    return problems


def _label_key_ok(key: str) -> bool:
    prefix, _, label = key.rpartition("/")
    return (not prefix or (len(prefix) <= 253 and bool(_DNS1123_SUBDOMAIN.fullmatch(prefix)))) and (
        len(label) <= 63 and bool(_LABEL_NAME.fullmatch(label))
    )


def _request_problems(resources: dict[str, dict[str, Any]]) -> list[str]:
    """Requests must not exceed limits; extended resources (GPUs) must request exactly their limit."""
    requests, limits = resources.get("requests", {}), resources.get("limits", {})
    problems = []
    for amounts in (requests, limits):
        for key, amount in amounts.items():
            try:
                quantity(amount)
            except ValueError as e:
                problems.append(f"{key}: {e}")
    if problems:
        return problems
    for key in sorted(requests.keys() & limits.keys()):
        if quantity(requests[key]) > quantity(limits[key]):
            problems.append(f"{key} request {requests[key]} exceeds its limit {limits[key]}")
        elif "/" in key and quantity(requests[key]) != quantity(limits[key]):
            problems.append(f"{key} is an extended resource: its request must equal its limit")
    return problems
