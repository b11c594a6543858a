"""`rft-cluster k8s`: manifests that the KubeRay v1.7 CRDs accept, that the operator's own rules
accept, whose resources follow the job, and that carry no secret value.

The CRDs are the copies in shared/schemas/kuberay (beside the clone; see its README.md for how
they are turned into strict JSON Schemas). No Kubernetes cluster is involved."""

from __future__ import annotations

import copy
from decimal import Decimal
from pathlib import Path
from typing import Any

import jsonschema
import pytest
import yaml

from rft_cluster.cli import main
from rft_cluster.k8s import K8sError, K8sOptions, render
from rft_cluster.k8s_rules import manifest_problems, quantity

REPO = Path(__file__).resolve().parents[1]
GPU_JOB = REPO / "cluster_configs" / "finqa-gpu.yaml"
COMMITTED = REPO / "k8s" / "finqa-gpu"
# The command that rendered k8s/finqa-gpu (k8s/README.md shows it too).
COMMITTED_ARGS = [
    "k8s", "cluster_configs/finqa-gpu.yaml", "--output", "k8s/finqa-gpu",
    "--image", "registry.example.com/rft-cluster:0.1.0-gpu", "--storage", "s3://your-bucket/rft-runs/finqa-gpu",
]
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml"}


def _shared_dir() -> Path:
    """shared/ beside the clone; from a git worktree, beside its main checkout."""
    git = REPO / ".git"
    if git.is_file():  # a worktree: "gitdir: <main>/.git/worktrees/<name>"
        return Path(git.read_text().split(":", 1)[1].strip()).parents[2].parent / "shared"
    return REPO.parent / "shared"


def _strict(node: Any) -> Any:
    """The CRD schema as the apiserver applies it: unknown fields refused (what kubectl's strict
    validation does), and fields with defaults not required (the apiserver fills them first)."""
    if isinstance(node, list):
        return [_strict(n) for n in node]
    if not isinstance(node, dict):
        return node
    out = {k: (v if k == "properties" else _strict(v)) for k, v in node.items()}
    if "properties" in node:
        out["properties"] = {k: _strict(v) for k, v in node["properties"].items()}
        if "additionalProperties" not in node and not node.get("x-kubernetes-preserve-unknown-fields"):
            out["additionalProperties"] = False
        defaulted = {k for k, v in node["properties"].items() if "default" in v}
        if "required" in node:
            out["required"] = [r for r in node["required"] if r not in defaulted]
    return out


@pytest.fixture(scope="module")
def validators() -> dict[str, jsonschema.Draft4Validator]:
    crds = _shared_dir() / "schemas" / "kuberay"
    if not crds.is_dir():
        pytest.fail(f"KubeRay CRDs not found at {crds}: copy shared/ beside the clone (shared/schemas/kuberay)")
    out = {}
    for kind, file in CRD_FILES.items():
        crd = yaml.load((crds / file).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (v1,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        out[kind] = jsonschema.Draft4Validator(_strict(v1["schema"]["openAPIV3Schema"]))
    return out


def problems(doc: dict[str, Any], validators: dict[str, jsonschema.Draft4Validator]) -> list[str]:
    """Everything wrong with one manifest: its CRD's schema, then the rules the CRD cannot express."""
    found = []
    if doc["kind"] in validators:
        found += [f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in validators[doc["kind"]].iter_errors(doc)]
    return found + manifest_problems(doc)


def _job(tmp_path: Path, cluster: str = "", extra: str = "") -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        "model: Qwen/Qwen3-1.7B\n"
        "training_file: /data/train.jsonl\n"
        "storage: s3://bucket/runs/x\n"
        "method:\n  type: reinforcement\n  reinforcement:\n"
        "    tools: [{name: lookup, server_url: '${TOOL_URL}/tool', headers: {Authorization: 'Bearer ${TOOL_TOKEN}'}}]\n"
        "    grader: {type: string_check, input: '{{sample.output_text}}', reference: '{{item.answer}}'}\n"
        + extra + (f"cluster:\n{cluster}" if cluster else "")
    )
    return path


def _group(cluster: dict[str, Any], name: str) -> dict[str, Any]:
    (group,) = [g for g in cluster["spec"]["workerGroupSpecs"] if g["groupName"] == name]
    return group


def _limits(group: dict[str, Any]) -> dict[str, str]:
    return group["template"]["spec"]["containers"][0]["resources"]["limits"]


# --- committed manifests -----------------------------------------------------------------------


def test_committed_manifests_equal_a_fresh_render(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)
    fresh = tmp_path / "fresh"
    args = [str(fresh) if a == "k8s/finqa-gpu" else a for a in COMMITTED_ARGS]
    assert main(args) == 0
    committed = sorted(p.name for p in COMMITTED.iterdir())
    assert committed == sorted(p.name for p in fresh.iterdir())
    for name in committed:
        assert (COMMITTED / name).read_text() == (fresh / name).read_text(), f"k8s/finqa-gpu/{name} is stale: re-render it"


def test_every_committed_manifest_validates(validators: dict[str, jsonschema.Draft4Validator]) -> None:
    docs = [d for p in sorted(COMMITTED.iterdir()) for d in yaml.safe_load_all(p.read_text())]
    assert sorted(d["kind"] for d in docs) == ["ConfigMap", "RayCluster", "RayJob", "Secret"]
    for doc in docs:
        assert problems(doc, validators) == [], doc["kind"]
    (secret,) = [d for d in docs if d["kind"] == "Secret"]
    assert set(secret["stringData"].values()) == {"REPLACE-ME"}


# --- rendered manifests ------------------------------------------------------------------------


@pytest.mark.parametrize("job", sorted((REPO / "cluster_configs").glob("*.yaml")), ids=lambda p: p.name)
def test_every_shipped_job_renders_manifests_that_validate(job: Path, validators: dict[str, jsonschema.Draft4Validator]) -> None:
    manifests = render(job, K8sOptions(storage="s3://bucket/runs/x"))
    docs = [manifests.configmap, manifests.raycluster, manifests.rayjob, manifests.secret_example]
    assert [p for d in docs for p in problems(d, validators)] == []


def test_stdout_is_one_stream_that_validates_and_runs_the_job_from_its_configmap(
    tmp_path: Path, capsys: pytest.CaptureFixture, validators: dict[str, jsonschema.Draft4Validator]
) -> None:
    assert main(["k8s", str(GPU_JOB), "--storage", "gs://b/run", "--name", "qwen-rl", "--namespace", "ml", "--secret", "rl-env"]) == 0
    out = capsys.readouterr()
    assert "has no rft-cluster installed" in out.err  # the default image needs replacing
    configmap, cluster, job = list(yaml.safe_load_all(out.out))
    for doc in (configmap, cluster, job):
        assert problems(doc, validators) == []
        assert doc["metadata"]["namespace"] == "ml"
    assert configmap["data"] == {"finqa-gpu.yaml": GPU_JOB.read_text()}
    assert job["spec"]["clusterSelector"] == {"ray.io/cluster": "qwen-rl"}
    assert job["spec"]["entrypoint"] == "rft-cluster train /home/ray/rft-job/finqa-gpu.yaml --output gs://b/run"
    head = cluster["spec"]["headGroupSpec"]["template"]["spec"]
    assert {"name": "job", "configMap": {"name": configmap["metadata"]["name"]}} in head["volumes"]
    assert {"name": "job", "mountPath": "/home/ray/rft-job", "readOnly": True} in head["containers"][0]["volumeMounts"]
    pods = [head] + [g["template"]["spec"] for g in cluster["spec"]["workerGroupSpecs"]]
    for pod in pods:
        assert pod["containers"][0]["envFrom"] == [{"secretRef": {"name": "rl-env"}}]
        assert pod["containers"][0]["image"] == "rayproject/ray:2.60.0-py311-gpu"


def test_resources_follow_the_job(tmp_path: Path, validators: dict[str, jsonschema.Draft4Validator]) -> None:
    cluster = (
        "  rollout_workers: 3\n  tool_proxies: 3\n  graders: 3\n"
        "  learner: {ranks: 3}\n"
        "  engine: {tensor_parallel_size: 2}\n"
        "  resources:\n"
        "    rollout_worker: {cpus: 8, gpus: 2, memory_gb: 70, resources: {vllm_node: 1}, node_labels: {pool: rollout}}\n"
        "    learner: {cpus: 6, gpus: 2, node_labels: {pool: train, example.com/accelerator: h100}}\n"
        "    tool_proxy: {cpus: 0.5, resources: {tools: 0.1}, node_labels: {pool: cpu}}\n"
        "    grader: {cpus: 1, memory_gb: 3}\n"
    )
    manifests = render(_job(tmp_path, cluster), K8sOptions(min_rollout_replicas=1, max_rollout_replicas=5))
    spec = manifests.raycluster
    assert problems(spec, validators) == []
    assert spec["spec"]["enableInTreeAutoscaling"] is True

    rollout = _group(spec, "rollout")
    assert (rollout["minReplicas"], rollout["replicas"], rollout["maxReplicas"]) == (1, 3, 5)
    assert rollout["resources"] == {"vllm_node": "1"} and rollout["labels"] == {"pool": "rollout"}
    # 70 GiB reserved for actors plus Ray's object store (30% of the pod): 100 GiB.
    assert _limits(rollout) == {"cpu": "8", "memory": "100Gi", "nvidia.com/gpu": "2"}

    learner = _group(spec, "learner")
    assert (learner["minReplicas"], learner["replicas"], learner["maxReplicas"]) == (3, 3, 3)
    assert learner["labels"] == {"pool": "train", "example.com/accelerator": "h100"} and "resources" not in learner
    assert _limits(learner) == {"cpu": "6", "memory": "24Gi", "nvidia.com/gpu": "2"}

    # 3 proxies x 0.5 CPU + 3 graders x 1 CPU = 4.5 -> 5 CPUs; 3 x 3 GiB reserved -> 13 GiB with the
    # object store, 20 GiB by CPU count; 3 x 0.1 `tools` advertised as 0.3.
    services = _group(spec, "services")
    assert (services["minReplicas"], services["replicas"], services["maxReplicas"]) == (1, 1, 1)
    assert services["resources"] == {"tools": "0.3"} and services["labels"] == {"pool": "cpu"}
    assert _limits(services) == {"cpu": "5", "memory": "20Gi"}
    assert "tolerations" not in services["template"]["spec"]
    assert spec["spec"]["headGroupSpec"]["rayStartParams"] == {"num-cpus": "0"}  # the driver only


def test_a_cpu_only_job_asks_for_no_gpu(tmp_path: Path, validators: dict[str, jsonschema.Draft4Validator]) -> None:
    manifests = render(_job(tmp_path), K8sOptions(image="me/rft:cpu"))
    spec = manifests.raycluster
    assert problems(spec, validators) == []
    for group in spec["spec"]["workerGroupSpecs"]:
        assert "nvidia.com/gpu" not in _limits(group) and "tolerations" not in group["template"]["spec"]
        assert group["replicas"] == 1  # one rollout worker, one learner rank, one services pod
    assert render(_job(tmp_path)).raycluster["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == (
        "rayproject/ray:2.60.0-py311"
    )


def test_a_planted_secret_never_reaches_the_manifests(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    planted = "planted-secret-7f3a9c"
    for var in ("RFT_DEMO_TOKEN", "RFT_DEMO_URL", "RFT_DEMO_DIR", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(var, f"{planted}-{var}")
    args = ["k8s", str(GPU_JOB), "--storage", "s3://bucket/run"]
    assert main(args) == 0
    stdout = capsys.readouterr().out
    assert main([*args, "--output", str(tmp_path / "out")]) == 0
    written = "".join(p.read_text() for p in sorted((tmp_path / "out").iterdir()))
    for text in (stdout, written):
        assert planted not in text
        assert "Bearer ${RFT_DEMO_TOKEN}" in text  # the reference travels; the pod's env resolves it
    secret = yaml.safe_load((tmp_path / "out" / "secret.yaml.example").read_text())
    assert secret["stringData"] == {
        k: "REPLACE-ME" for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "RFT_DEMO_DIR", "RFT_DEMO_TOKEN", "RFT_DEMO_URL")
    }


def test_the_output_directory_keeps_kubectl_apply_off_the_secret_example(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["k8s", str(_job(tmp_path)), "--output", str(tmp_path / "out")]) == 0
    listed = capsys.readouterr().out.split()
    assert sorted(Path(p).name for p in listed) == ["configmap.yaml", "raycluster.yaml", "rayjob.yaml", "secret.yaml.example"]
    # `kubectl apply -f DIR` reads only .json, .yaml and .yml files.
    applied = [p for p in (tmp_path / "out").iterdir() if p.suffix in (".json", ".yaml", ".yml")]
    assert sorted(d["kind"] for p in applied for d in yaml.safe_load_all(p.read_text())) == ["ConfigMap", "RayCluster", "RayJob"]


@pytest.mark.parametrize(
    ("args", "extra", "message"),
    [
        (["--name", "Bad_Name"], "", "DNS-1035 label of at most 47"),
        (["--name", "a" * 48], "", "DNS-1035 label of at most 47"),
        (["--min-rollout-replicas", "3", "--max-rollout-replicas", "2"], "", "need 0 <= min <= max"),
        (["--storage", "runs/x"], "", "is a local path"),
        (["--storage", "s3://b/r?endpoint_override=minio:9000&scheme=http"], "", "set AWS_ENDPOINT_URL in the Secret"),
        ([], "validation_file: data/valid.jsonl\n", "validation_file 'data/valid.jsonl' is relative"),
        ([], "cluster:\n  resources:\n    learner: {node_labels: {'bad key!': x}}\n", "not a valid Kubernetes label"),
        ([], "cluster:\n  resources:\n    tool_proxy: {node_labels: {pool: a}}\n    grader: {node_labels: {pool: b}}\n",
         "the roles sharing a services pod ask for node label pool='a' and pool='b'"),
        ([], "cluster:\n  rollout_workers: 0\n", "cluster.rollout_workers"),  # the job's own validation
    ],
)
def test_bad_input_is_one_clear_error(
    tmp_path: Path, capsys: pytest.CaptureFixture, args: list[str], extra: str, message: str
) -> None:
    assert main(["k8s", str(_job(tmp_path, extra=extra)), *args]) == 1
    out = capsys.readouterr()
    assert message in out.err and out.out == ""


def test_storage_is_required(tmp_path: Path) -> None:
    job = _job(tmp_path)
    job.write_text(job.read_text().replace("storage: s3://bucket/runs/x\n", ""))
    with pytest.raises(K8sError, match="no storage"):
        render(job)


# --- the validator can fail -----------------------------------------------------------------


def _mutate(doc: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    """A copy of `doc` with `value` at `path`: keys joined by '.', list indices as numbers; a last
    key after '|' is taken whole (resource names such as nvidia.com/gpu hold dots)."""
    out = copy.deepcopy(doc)
    head, _, resource = path.partition("|")
    node: Any = out
    keys = head.split(".")
    for key in keys[:-1]:
        node = node[int(key)] if isinstance(node, list) else node[key]
    if resource:
        node[keys[-1]][resource] = value
    else:
        node[keys[-1]] = value
    return out


@pytest.mark.parametrize(
    ("kind", "path", "value", "message"),
    [
        ("RayCluster", "spec.workerGroupSpecs.0.replica", 2, "Additional properties are not allowed ('replica'"),
        ("RayCluster", "spec.headGroupSpec.template.spec.containers.0.envFromm", [], "'envFromm' was unexpected"),
        ("RayJob", "spec.entrypoint", ["rft-cluster", "train"], "is not of type 'string'"),
        ("RayCluster", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.limits|memory", "lots", "does not match"),
        ("RayCluster", "metadata.name", "Finqa-GPU", "DNS-1035 label"),
        ("RayJob", "metadata.name", "x" * 48, "at most 47 characters"),
        ("RayCluster", "metadata.name", "y" * 54, "at most 53 characters"),
        ("RayCluster", "spec.workerGroupSpecs.1.groupName", "rollout", "'rollout' is used more than once"),
        ("RayCluster", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.requests|cpu", "5", "cpu request 5 exceeds its limit 4"),
        ("RayCluster", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.requests|memory", "17Gi", "exceeds its limit 16Gi"),
        ("RayCluster", "spec.workerGroupSpecs.0.template.spec.containers.0.resources.requests|nvidia.com/gpu", "0", "must equal its limit"),
        ("RayCluster", "spec.workerGroupSpecs.0.minReplicas", 2, "minReplicas <= replicas <= maxReplicas"),
        ("RayCluster", "spec.workerGroupSpecs.0.labels", {"pool": "a b"}, "not a valid Kubernetes label"),
        ("RayCluster", "spec.workerGroupSpecs.0.rayStartParams", {"labels": "pool=a"}, "not rayStartParams"),
        ("RayJob", "spec.clusterSelector", {}, "needs clusterSelector"),
    ],
)
def test_the_validator_rejects_a_bad_manifest(
    kind: str, path: str, value: Any, message: str, validators: dict[str, jsonschema.Draft4Validator]
) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(render(GPU_JOB, K8sOptions(storage="s3://b/r")).to_yaml())}
    doc = _mutate(docs[kind], path, value)
    assert problems(docs[kind], validators) == []
    found = problems(doc, validators)
    assert any(message in p for p in found), found


@pytest.mark.parametrize(("text", "value"), [("500m", "0.5"), ("8Gi", 8 * 2**30), ("2", 2), ("1.5G", 1_500_000_000), ("1e3", 1000)])
def test_quantities_parse(text: str, value: str | int) -> None:
    assert quantity(text) == Decimal(value)


def test_quantity_rejects_garbage() -> None:
    with pytest.raises(ValueError):
        quantity("8 GB")
