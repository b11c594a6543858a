"""Kubernetes manifests for a job (KubeRay operator v1.7, `ray.io/v1`).

`render` turns a job file into a ConfigMap holding the job file as written, a RayCluster whose
groups match the job's `cluster` section, and a RayJob that runs `rft-cluster train` on that
cluster (`clusterSelector`), plus an example Secret with placeholder values:

- head: runs the driver (the Ray job's entrypoint) and no actors (`num-cpus: 0`);
- `rollout`: one pod per rollout worker, autoscaled between min and max replicas;
- `learner`: one pod per learner rank (a fixed world size);
- `services`: one CPU pod for every tool proxy and grader.

A group's pods advertise the custom Ray resources and node labels its roles ask for (KubeRay's
group-level `resources`/`labels`), so the driver's placement groups land on them. Secrets stay
out of the manifests: the job file keeps its `${VAR}` references, which resolve in the pods from
a Kubernetes Secret (`envFrom`), and the Secret example holds placeholders only.
"""

from __future__ import annotations

import json
import math
import re
import shlex
from dataclasses import dataclass
from decimal import Decimal
from importlib.metadata import version
from pathlib import Path
from typing import Any

import yaml

from rft_cluster.config import FleetSize, JobSpec, RoleResources, load_job
from rft_cluster.jobfile import ENV_REF, read_document
from rft_cluster.k8s_rules import MAX_NAME, manifest_problems

RAY_VERSION = version("ray")
JOB_DIR = "/home/ray/rft-job"  # where the head pod mounts the job's ConfigMap
DEFAULT_SECRET = "rft-cluster-env"
PLACEHOLDER = "REPLACE-ME"
HEAD_RESOURCES = {"cpu": "2", "memory": "8Gi"}  # the driver: tokenizer, Parquet, metrics
GI_PER_CPU = 4  # pod memory when a role does not say how much it reserves
# Ray's object store takes 30% of a pod's memory by default; the rest holds reserved actor memory.
HEAP_SHARE = 0.7


class K8sError(ValueError):
    """A job or option that cannot become working manifests; the message names which and why."""


@dataclass(frozen=True)
class K8sOptions:
    name: str | None = None  # default: from the job file's name
    namespace: str | None = None  # default: kubectl's current namespace
    image: str | None = None  # default: default_image(), which lacks rft-cluster (docs/deploy.md)
    secret: str = DEFAULT_SECRET
    storage: str | None = None  # default: the job's `storage`
    min_rollout_replicas: int | None = None  # default: the fleet's min / max (cluster.rollout_workers)
    max_rollout_replicas: int | None = None  # default: cluster.rollout_workers


def default_image(gpu: bool) -> str:
    return f"rayproject/ray:{RAY_VERSION}-py311{'-gpu' if gpu else ''}"


@dataclass(frozen=True)
class Manifests:
    configmap: dict[str, Any]
    raycluster: dict[str, Any]
    rayjob: dict[str, Any]
    secret_example: dict[str, Any]
    source: str  # the job file's name, for the headers

    @property
    def image(self) -> str:
        return self.raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"]

    def to_yaml(self) -> str:
        """What `kubectl apply -f -` takes: the ConfigMap, RayCluster and RayJob (no Secret,
        whose placeholders would replace real values)."""
        keys = ", ".join(self.secret_example["stringData"])
        header = (
            f"# rft-cluster k8s {self.source}: KubeRay v1.7 (ray.io/v1) manifests.\n"
            f"# The pods take their environment from the Secret {self.secret_example['metadata']['name']!r}:"
            f" create it first with the keys {keys}.\n"
        )
        return header + "---\n".join(_dump(d) for d in (self.configmap, self.raycluster, self.rayjob))

    def write(self, directory: Path) -> list[Path]:
        """One file per object. The Secret example's suffix keeps `kubectl apply -f DIR` off it."""
        directory.mkdir(parents=True, exist_ok=True)
        header = f"# Rendered by `rft-cluster k8s {self.source}`; re-render instead of editing.\n"
        secret_header = (
            "# Example only: put real values in place of the placeholders and apply it yourself\n"
            "# (kubectl apply -f secret.yaml.example), or use `kubectl create secret generic`.\n"
        )
        files = {
            "configmap.yaml": header + _dump(self.configmap),
            "raycluster.yaml": header + _dump(self.raycluster),
            "rayjob.yaml": header + _dump(self.rayjob),
            "secret.yaml.example": secret_header + _dump(self.secret_example),
        }
        for name, text in files.items():
            (directory / name).write_text(text)
        return [directory / name for name in files]


def render(job_path: Path, options: K8sOptions = K8sOptions()) -> Manifests:
    """The manifests for the job file at `job_path`; SpecError for a bad job, K8sError for a job
    or option that could not run on Kubernetes."""
    # `${VAR}`s stay unresolved: they resolve in the pods, from the Secret (this machine's values are not theirs).
    job = load_job(job_path, unset_env_ok=True, environ={})
    text = job_path.read_text()  # readable: load_job read it
    # Strings are taken from the file as written, so a value from this machine's env never lands in a manifest.
    raw: dict[str, Any] = read_document(job_path).data
    name = options.name or _name_from(job_path)
    storage = _storage(options.storage or raw.get("storage"))
    for field in ("training_file", "validation_file"):
        _check_dataset(field, raw.get(field))
    file_key = job_path.name
    if not re.fullmatch(r"[-._a-zA-Z0-9]+", file_key):
        raise K8sError(f"{job_path}: rename the job file to letters, digits, '-', '_' and '.' (it becomes a ConfigMap key)")

    cluster = job.cluster
    res = cluster.resources
    rollout, learner = _shape("rollout", (res.rollout_worker, 1)), _shape("learner", (res.learner, 1))
    services = _shape("services", (res.tool_proxy, cluster.tool_proxies), (res.grader, cluster.graders))
    gpu = bool(rollout.gpus or learner.gpus or services.gpus)
    image = options.image or default_image(gpu)
    min_r, replicas, max_r = _rollout_replicas(cluster.fleet, options)
    ranks = cluster.learner.ranks

    configmap = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(f"{name}-job", options.namespace, name),
        "data": {file_key: text},
    }
    raycluster = {
        "apiVersion": "ray.io/v1",
        "kind": "RayCluster",
        "metadata": _metadata(name, options.namespace, name),
        "spec": {
            "rayVersion": RAY_VERSION,
            # Ray's token authentication, with the token in a Secret KubeRay creates and shares with every pod.
            "authOptions": {"mode": "token"},
            "enableInTreeAutoscaling": True,
            "headGroupSpec": _head_group(image, options.secret, configmap["metadata"]["name"]),
            "workerGroupSpecs": [
                _worker_group("rollout", rollout, image, options.secret, replicas, min_r, max_r),
                _worker_group("learner", learner, image, options.secret, ranks, ranks, ranks),
                _worker_group("services", services, image, options.secret, 1, 1, 1),
            ],
        },
    }
    rayjob = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": _metadata(name, options.namespace, name),
        "spec": {
            "clusterSelector": {"ray.io/cluster": name},
            "submissionMode": "K8sJobMode",
            "entrypoint": shlex.join(["rft-cluster", "train", f"{JOB_DIR}/{file_key}", "--output", storage]),
        },
    }
    secret_example = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": _metadata(options.secret, options.namespace, name),
        "type": "Opaque",
        "stringData": {key: PLACEHOLDER for key in _secret_keys(raw, storage, job)},
    }
    manifests = Manifests(configmap, raycluster, rayjob, secret_example, job_path.name)
    problems = [p for doc in (configmap, raycluster, rayjob, secret_example) for p in manifest_problems(doc)]
    if problems:
        raise K8sError("; ".join(problems))
    return manifests


# --- groups ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PodShape:
    """What the actors placed on one pod of a group need together."""

    cpus: float
    gpus: float
    memory_gb: float  # Ray memory the actors reserve
    resources: dict[str, float]
    labels: dict[str, str]


def _shape(group: str, *roles: tuple[RoleResources, int]) -> PodShape:
    """`count` actors of each role on one pod; their node labels must agree (one node carries them)."""
    labels: dict[str, str] = {}
    resources: dict[str, float] = {}
    for role, count in roles:
        for key, value in role.node_labels.items():
            if labels.setdefault(key, value) != value:
                raise K8sError(
                    f"cluster.resources: the roles sharing a {group} pod ask for node label "
                    f"{key}={labels[key]!r} and {key}={value!r}"
                )
        for key, amount in role.resources.items():
            resources[key] = resources.get(key, 0) + amount * count
    return PodShape(
        cpus=sum(r.cpus * n for r, n in roles),
        gpus=sum(r.gpus * n for r, n in roles),
        memory_gb=sum((r.memory_gb or 0) * n for r, n in roles),
        resources=resources,
        labels=labels,
    )


def _container_resources(shape: PodShape) -> dict[str, dict[str, str]]:
    """Whole CPUs and GPUs (KubeRay rounds them for Ray anyway), and room for the reserved memory
    beside the object store. Requests equal limits: the pod gets exactly what Ray is told it has."""
    cpus = max(1, math.ceil(shape.cpus))
    amounts = {"cpu": str(cpus), "memory": f"{max(math.ceil(shape.memory_gb / HEAP_SHARE), GI_PER_CPU * cpus)}Gi"}
    if shape.gpus:
        amounts["nvidia.com/gpu"] = str(math.ceil(shape.gpus))
    return {"requests": amounts, "limits": dict(amounts)}


def _head_group(image: str, secret: str, configmap: str) -> dict[str, Any]:
    """The driver's pod: no actors (`num-cpus: 0`), the job file mounted from its ConfigMap."""
    pod = _pod("ray-head", image, secret, {"requests": dict(HEAD_RESOURCES), "limits": dict(HEAD_RESOURCES)},
               mounts=({"name": "job", "mountPath": JOB_DIR, "readOnly": True},),
               volumes=({"name": "job", "configMap": {"name": configmap}},))
    pod["spec"]["containers"][0]["ports"] = [
        {"containerPort": 6379, "name": "gcs-server"},
        {"containerPort": 8265, "name": "dashboard"},
        {"containerPort": 10001, "name": "client"},
    ]
    return {"rayStartParams": {"num-cpus": "0"}, "template": pod}


def _worker_group(group: str, shape: PodShape, image: str, secret: str, replicas: int, min_r: int, max_r: int) -> dict[str, Any]:
    spec: dict[str, Any] = {"groupName": group, "replicas": replicas, "minReplicas": min_r, "maxReplicas": max_r}
    if shape.resources:
        # Ray keeps resource amounts to 4 decimals: 3 x 0.1 is 0.3, not 0.30000000000000004.
        spec["resources"] = {key: _decimal(round(amount, 4)) for key, amount in sorted(shape.resources.items())}
    if shape.labels:
        spec["labels"] = dict(sorted(shape.labels.items()))
    spec["template"] = _pod("ray-worker", image, secret, _container_resources(shape))
    return spec


def _pod(container: str, image: str, secret: str, resources: dict[str, Any],
         mounts: tuple[dict[str, Any], ...] = (), volumes: tuple[dict[str, Any], ...] = ()) -> dict[str, Any]:
    """A Ray pod: env from the Secret, and /dev/shm in memory (Ray's object store, NCCL and vLLM use it)."""
    spec: dict[str, Any] = {
        "containers": [{
            "name": container,
            "image": image,
            "imagePullPolicy": "IfNotPresent",
            "envFrom": [{"secretRef": {"name": secret}}],
            "resources": resources,
            "volumeMounts": [{"name": "dshm", "mountPath": "/dev/shm"}, *mounts],
        }],
        "volumes": [{"name": "dshm", "emptyDir": {"medium": "Memory"}}, *volumes],
    }
    if "nvidia.com/gpu" in resources["limits"]:
        # GPU nodes are commonly tainted so that only pods asking for GPUs land there.
        spec["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return {"spec": spec}


def _rollout_replicas(fleet: FleetSize, options: K8sOptions) -> tuple[int, int, int]:
    """(min, initial, max) pods of the rollout group; by default the job's fleet: `min` pods at
    first, up to `max` (a plain `rollout_workers: N` is exactly N)."""
    max_r = options.max_rollout_replicas if options.max_rollout_replicas is not None else max(fleet.max, options.min_rollout_replicas or 0)
    min_r = options.min_rollout_replicas if options.min_rollout_replicas is not None else min(fleet.min, max_r)
    if not 0 <= min_r <= max_r or max_r < 1:
        raise K8sError(f"--min-rollout-replicas {min_r} and --max-rollout-replicas {max_r}: need 0 <= min <= max and max >= 1")
    return min_r, min(max(fleet.min, min_r), max_r), max_r


# --- inputs --------------------------------------------------------------------------------------


def _name_from(job_path: Path) -> str:
    """A DNS-1035 label from the job file's name (`finqa-gpu.yaml` -> `finqa-gpu`)."""
    name = re.sub(r"[^a-z0-9-]+", "-", job_path.stem.lower())
    name = re.sub(r"^[^a-z]+", "", name)[: MAX_NAME["RayJob"]].strip("-")
    if not name:
        raise K8sError(f"{job_path}: cannot make a Kubernetes name from the file name; pass --name")
    return name


def _storage(uri: str | None) -> str:
    if not uri:
        raise K8sError("no storage: pass --storage URI or set `storage` in the job (pods share no disk: s3://, gs://, hdfs://)")
    if "${" in uri:
        raise K8sError(f"storage {uri!r} uses an environment variable; pass the URI itself with --storage")
    if shlex.quote(uri) != uri:
        # K8sJobMode's submitter hands the entrypoint through bash and then Ray's shell, unquoted.
        raise K8sError(
            f"storage {uri!r} holds characters a shell would change on the way to the head pod; "
            "for an S3-compatible endpoint set AWS_ENDPOINT_URL in the Secret instead of ?endpoint_override="
        )
    if "://" not in uri:
        raise K8sError(
            f"storage {uri!r} is a local path, which pods do not share: use s3://, gs://, hdfs:// "
            "(or file:// on a volume that every pod mounts)"
        )
    return uri


def _check_dataset(field: str, path: str | None) -> None:
    """The head pod reads the job from a ConfigMap, so a path relative to the job file finds nothing."""
    if path is not None and not path.startswith(("/", "~", "${")):
        raise K8sError(
            f"{field} {path!r} is relative to the job file; on Kubernetes give a path inside the image "
            "(absolute, or under a ${VAR} set in the Secret)"
        )


def _secret_keys(raw: dict[str, Any], storage: str, job: JobSpec) -> list[str]:
    """Every `${VAR}` the job names, plus the credentials its storage and W&B mode read."""
    keys = set(ENV_REF.findall(json.dumps(raw, default=str)))  # values and keys, not comments
    if storage.startswith("s3://"):
        keys |= {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    if job.wandb.mode == "online":
        keys.add("WANDB_API_KEY")
    return sorted(keys)


def _metadata(name: str, namespace: str | None, run: str) -> dict[str, Any]:
    """`run` labels every object of one render alike."""
    meta: dict[str, Any] = {"name": name}
    if namespace:
        meta["namespace"] = namespace
    meta["labels"] = {"app.kubernetes.io/name": "rft-cluster", "app.kubernetes.io/instance": run}
    return meta


def _decimal(amount: float) -> str:
    """A Kubernetes quantity without an exponent (`0.5`, `2`)."""
    return format(Decimal(repr(amount)).normalize(), "f")


# --- YAML ----------------------------------------------------------------------------------------


class _Dumper(yaml.SafeDumper):
    """Block style for multi-line strings, so the job file in the ConfigMap reads as it was written."""


_Dumper.add_representer(
    str,
    lambda dumper, s: dumper.represent_scalar("tag:yaml.org,2002:str", s, style="|" if "\n" in s else None),
)


def _dump(doc: dict[str, Any]) -> str:
    return yaml.dump(doc, Dumper=_Dumper, sort_keys=False, width=120)
