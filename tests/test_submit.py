"""Submitting to a live Ray cluster (`rft-cluster submit`), placement, and the refusals.

The live test starts a real two-node cluster on this machine (tests/ray_cluster.py): a head, and
a second raylet carrying the custom resource `rollout_node` that the job's rollout workers ask
for. The job's secret (the ledger servers' bearer token, a `${VAR}` in header values) is in the
cluster's environment only, never in the submitting process's.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import ray
import yaml

from rft_cluster.config import ClusterSpec, RoleResources
from rft_cluster.fleet import RolloutFleet
from rft_cluster.placement import PlacementError, bundle, place
from rft_cluster.storage import RunStorage
from rft_cluster.submit import SubmitError, submit
from tests.conftest import LEDGER_JOB
from tests.ray_cluster import RayCluster, free_port


def cli(*args: str, env: dict[str, str] | None = None, timeout: float = 120) -> subprocess.CompletedProcess:
    """`rft-cluster ARGS` in its own process (the Jobs API client changes process-wide auth state)."""
    return subprocess.run([sys.executable, "-m", "rft_cluster.cli", *args], env=env, capture_output=True, text=True, timeout=timeout)


def ledger_job(path: Path, data: Path, model: str = "someone/hub-model", **changes: object) -> Path:
    """The shipped ledger job with its datasets in `data`, its model as given; `changes` are
    top-level keys replaced."""
    raw = yaml.safe_load(LEDGER_JOB.read_text())
    raw.update(model=model, training_file=str(data / "train.jsonl"), validation_file=str(data / "valid.jsonl"), **changes)
    path.write_text(yaml.safe_dump(raw, sort_keys=False))
    return path


# --------------------------------------------------------------------------- the live cluster


def test_submit_to_a_live_two_node_cluster(tmp_path: Path, demo_job, ledger_env, s3_server, s3_prefix: str) -> None:
    t0 = time.perf_counter()
    secret = ledger_env.token
    job = yaml.safe_load(LEDGER_JOB.read_text())
    rl = job["method"]["reinforcement"]
    rl["hyperparameters"].update(batch_size=2, max_steps=2)
    rl["grader"] = {"type": "endpoint", "name": "by-trace", "url": demo_job.rl.grader.url,
                    "headers": {"Authorization": "Bearer ${RFT_DEMO_TOKEN}"}}
    job["cluster"]["resources"] = {"rollout_worker": {"cpus": 1, "resources": {"rollout_node": 1}}}
    job_file = tmp_path / "job.yaml"
    job_file.write_text(yaml.safe_dump(job, sort_keys=False))
    output = s3_server.uri(s3_prefix)  # no disk is shared: the cluster writes to the S3 server

    cluster_env = {"RFT_DEMO_URL": ledger_env.base_url, "RFT_DEMO_TOKEN": secret, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
    with RayCluster(env=cluster_env, head_cpus=4) as cluster:
        cluster.add_node(num_cpus=2, resources={"rollout_node": 1})
        cluster.wait_for_nodes(2)
        t_up = time.perf_counter()
        # The submitting side knows where the data is, not the secret nor the servers' URL.
        env = {k: v for k, v in cluster.client_env().items() if k not in ("RFT_DEMO_TOKEN", "RFT_DEMO_URL")}
        env["RFT_FORWARDED"] = "sent-on-purpose"  # named with --forward-env: it travels, and only it
        run = cli("submit", str(job_file), "--address", cluster.dashboard, "--output", output, "--follow",
                  "--forward-env", "RFT_FORWARDED", env=env, timeout=1500)
        t_run = time.perf_counter()
        print(f"\n[timing] cluster up {t_up - t0:.1f} s; submit --follow {t_run - t_up:.1f} s")
        assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]
        submission_id = run.stdout.splitlines()[0]
        assert run.stdout.splitlines()[-1].startswith(f"{submission_id}: SUCCEEDED")

        assert cli("status", submission_id, "--address", cluster.dashboard, env=env).stdout.startswith(f"{submission_id}: SUCCEEDED")
        stopped = cli("stop", submission_id, "--address", cluster.dashboard, env=env)
        assert stopped.returncode == 0 and "had already ended" in stopped.stdout
        logs = cli("logs", submission_id, "--address", cluster.dashboard, env=env)
        assert logs.returncode == 0 and "final policy saved" in logs.stdout
        job_info = cluster.get(f"/api/jobs/{submission_id}")  # every field get_job_info returns
        assert json.loads(job_info)["runtime_env"]["env_vars"] == {"RFT_FORWARDED": "sent-on-purpose"}
        job_list = cluster.get("/api/jobs/")
        rollout_nodes = [n["node_id"] for n in cluster.nodes() if "rollout_node" in n["resources_total"]]

    # Outputs complete in the bucket, read back through the run's storage.
    assert {"metrics.jsonl", "checkpoints/index.json", "final/config.json"} <= set(s3_server.keys(s3_prefix))
    local = RunStorage(output).download_dir("", tmp_path / "fetched")
    trajs = pq.read_table(local / "trajectories").to_pylist()
    assert {t["step"] for t in trajs if t["kind"] == "train"} == {1, 2} and {t["step"] for t in trajs if t["kind"] == "eval"} == {0, 2}
    # Rollout workers ran on the node with the resource; the secret resolved there (tools answered).
    assert {t["node_id"] for t in trajs} == set(rollout_nodes) and len(rollout_nodes) == 1
    assert any(c["status"] == "ok" for t in trajs for c in t["tool_calls"])
    records = [json.loads(x) for x in (local / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    assert all(r["nodes"]["rollout_worker"] == rollout_nodes for r in records)
    assert (local / "final" / "config.json").is_file() and any((local / "final").glob("*.safetensors"))
    assert list(local.glob("wandb/offline-run-*"))

    # The planted secret is in no job field, log or output.
    assert secret not in job_info + job_list + run.stdout + run.stderr + logs.stdout
    leaked = [p for p in local.rglob("*") if p.is_file() and secret.encode() in p.read_bytes()]
    assert leaked == []
    print(f"[timing] whole test {time.perf_counter() - t0:.1f} s")


# --------------------------------------------------------------------------- refusals


def test_a_cluster_without_the_resources_fails_the_job_naming_the_role(tmp_path: Path, ledger_data: Path) -> None:
    raw = yaml.safe_load(LEDGER_JOB.read_text())
    raw["cluster"].update(placement_timeout_s=5, resources={"rollout_worker": {"cpus": 1, "resources": {"rollout_node": 1}}})
    job = ledger_job(tmp_path / "job.yaml", ledger_data, cluster=raw["cluster"])
    with RayCluster(env={"RFT_DEMO_URL": "http://127.0.0.1:1", "RFT_DEMO_TOKEN": "unused"}, head_cpus=2) as cluster:
        r = cli("submit", str(job), "--address", cluster.dashboard, "--output", str(tmp_path / "out"), "--follow",
                env=cluster.client_env(), timeout=300)
    assert r.returncode == 1
    submission_id = r.stdout.splitlines()[0]
    assert "could not place rollout_worker within 5 s: rollout_worker needs 1 x {CPU=1, rollout_node=1}" in r.stdout
    assert "rollout_node: 0 free of 0" in r.stdout
    assert f"{submission_id}: FAILED" in r.stdout.splitlines()[-1]


def test_unreachable_address_is_one_line(tmp_path: Path, ledger_data: Path) -> None:
    address = f"http://127.0.0.1:{free_port()}"
    r = cli("submit", str(ledger_job(tmp_path / "job.yaml", ledger_data)), "--address", address, "--output", "s3://bucket/run")
    assert r.returncode == 1
    assert r.stderr.strip().splitlines() == [f"cannot reach the Ray Jobs API at {address}: Failed to connect to Ray at address: {address}."]


def test_train_names_an_unreachable_ray_address(tmp_path: Path, ledger_data: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_DEMO_URL", "http://127.0.0.1:1")
    monkeypatch.setenv("RFT_DEMO_TOKEN", "unused")
    address = f"127.0.0.1:{free_port()}"
    env = {**os.environ, "RAY_ADDRESS": address}  # what a Ray job's driver is given
    r = cli("train", str(ledger_job(tmp_path / "job.yaml", ledger_data)), "--output", str(tmp_path / "out"), env=env)
    assert r.returncode == 1
    assert r.stderr.strip().splitlines()[-1] == f"cannot connect to the Ray cluster at {address} (RAY_ADDRESS): Connection refused"


def test_train_without_an_address_starts_a_fresh_cluster_not_the_dead_one_ray_start_recorded(tmp_path: Path) -> None:
    # `ray start` writes its address to RAY_TMPDIR/ray/ray_current_cluster and leaves it there when the
    # cluster dies; a bare ray.init() would then retry that address until stopped.
    ray_tmp = Path(tempfile.mkdtemp(prefix="rt", dir="/tmp"))  # short: Ray's socket paths have a length limit
    (ray_tmp / "ray").mkdir()
    dead = f"127.0.0.1:{free_port()}"
    (ray_tmp / "ray" / "ray_current_cluster").write_text(dead)
    code = (
        "import types, ray\n"
        "from rft_cluster.config import ClusterSpec\n"
        "from rft_cluster.driver import init_ray\n"
        "init_ray(types.SimpleNamespace(cluster=ClusterSpec()))\n"
        "print(ray.get_runtime_context().gcs_address)\n"
        "ray.shutdown()\n"
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"} | {"RAY_TMPDIR": str(ray_tmp)}
    try:
        r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    finally:
        shutil.rmtree(ray_tmp, ignore_errors=True)
    assert r.returncode == 0, r.stderr[-2000:]
    started = r.stdout.strip().splitlines()[-1]
    assert started != dead  # joining the dead address would not return within the timeout


def test_job_failing_validation_is_refused_before_submitting(tmp_path: Path, ledger_data: Path) -> None:
    job = ledger_job(tmp_path / "job.yaml", ledger_data, seed="forty-two")
    address = f"http://127.0.0.1:{free_port()}"  # nothing listens: a contact would say so
    r = cli("submit", str(job), "--address", address, "--output", "s3://bucket/run")
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert lines[0].startswith(f"{job}:") and ": seed: " in lines[0]
    assert lines[-1] == f"1 problem(s) in {job}; nothing was submitted." and len(lines) == 2


def test_literal_header_values_are_refused(tmp_path: Path, ledger_data: Path) -> None:
    raw = yaml.safe_load(LEDGER_JOB.read_text())
    raw["method"]["reinforcement"]["tools"][0]["headers"]["Authorization"] = "Bearer s3cr3t"
    job = ledger_job(tmp_path / "job.yaml", ledger_data, method=raw["method"])
    with pytest.raises(SubmitError, match=r"job.yaml:\d+: method.reinforcement.tools.0.headers.Authorization: a literal header value"):
        submit(job, "http://127.0.0.1:1", "s3://bucket/run")


def test_staging_keeps_variables_unexpanded_and_limits_sizes(
    tmp_path: Path, ledger_data: Path, tiny_model_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from rft_cluster.config import load_job
    from rft_cluster.submit import STAGED_JOB, stage

    monkeypatch.setenv("RFT_DEMO_TOKEN", "planted-secret")  # set here too: it must still not be staged
    # Staging copies a directory: a model validate can load (config, tokenizer), weights of a set size.
    model_dir = tmp_path / "model-dir"
    shutil.copytree(tiny_model_dir, model_dir, ignore=shutil.ignore_patterns("*.safetensors"))
    (model_dir / "model.safetensors").write_bytes(bytes(700_000 - sum(f.stat().st_size for f in model_dir.iterdir())))
    job_file = ledger_job(tmp_path / "job.yaml", ledger_data, model=str(model_dir))
    job = load_job(job_file, unset_env_ok=True)
    dest = tmp_path / "staged"
    dest.mkdir()
    assert stage(job_file, job, dest) == STAGED_JOB
    staged = load_job(dest / STAGED_JOB, unset_env_ok=True)
    assert (staged.model, staged.training_file, staged.validation_file) == ("model", "data/training_file.jsonl", "data/validation_file.jsonl")
    assert (dest / "data/training_file.jsonl").read_bytes() == (ledger_data / "train.jsonl").read_bytes()
    assert (dest / "model/config.json").is_file()
    text = (dest / STAGED_JOB).read_text()
    assert "Bearer ${RFT_DEMO_TOKEN}" in text and "${RFT_DEMO_URL}/tool" in text
    assert not [p for p in dest.rglob("*") if p.is_file() and b"planted-secret" in p.read_bytes()]

    with pytest.raises(SubmitError, match=rf"model directory {model_dir} is 0.7 MiB, over the 0.5 MiB that travel"):
        submit(job_file, "http://127.0.0.1:1", "s3://bucket/run", model_limit=2**19)
    with pytest.raises(SubmitError, match=r"the staged working_dir \(job, datasets, model\) is [\d.]+ MiB, over Ray's 0.0 MiB package limit"):
        submit(job_file, "http://127.0.0.1:1", "s3://bucket/run", working_dir_limit=1024)
    with pytest.raises(SubmitError, match="absolute path on the cluster, got 'runs/x'"):
        submit(job_file, "http://127.0.0.1:1", "runs/x")


def test_a_role_that_cannot_be_placed_is_named_within_the_timeout(ray_local: None) -> None:
    spec = ClusterSpec(
        rollout_workers=2,
        placement_timeout_s=2,
        resources={"learner": RoleResources(cpus=1, resources={"learner_node": 1}),
                   "grader": RoleResources(cpus=0, node_labels={"pool": "cpu-only"})},
    )
    t0 = time.perf_counter()
    with pytest.raises(PlacementError) as e:
        place(spec)
    assert time.perf_counter() - t0 < 30
    message = str(e.value)
    assert "\n" not in message and message.startswith("could not place learner, grader within 2 s: ")
    assert "learner needs 1 x {CPU=1, learner_node=1}" in message and "learner_node: 0 free of 0" in message
    assert "grader needs 1 x {CPU=0.01} on nodes labelled {'pool': 'cpu-only'}" in message and "node labels: [{" in message
    # Nothing stays reserved: the tool proxies' group, which could be placed, was removed too.
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values() if g["name"].startswith("rft-"))


def test_a_fleet_below_its_min_is_named_within_the_timeout(ray_local: None) -> None:
    spec = ClusterSpec(rollout_workers={"min": 2, "max": 3}, placement_timeout_s=2,
                       resources={"rollout_worker": RoleResources(cpus=1, resources={"rollout_node": 1})})
    fleet = RolloutFleet(spec, "unused-model", 0, [])
    fleet.launch()
    with pytest.raises(PlacementError) as e:
        fleet.placed()
    message = str(e.value)
    assert message.startswith("could not place rollout_worker within 2 s: rollout_worker needs 2 x {CPU=1, rollout_node=1}")
    assert all(g["state"] == "REMOVED" for g in ray.util.placement_group_table().values() if g["name"].startswith("rft-rollout"))


def test_placement_bundles_and_options(ray_local: None) -> None:
    assert bundle(RoleResources(cpus=0)) == {}  # schedules without a group, reserving nothing
    assert bundle(RoleResources(cpus=2, gpus=1, memory_gb=1.5, resources={"r": 1})) == {"CPU": 2, "GPU": 1, "r": 1, "memory": 1.5 * 2**30}
    spec = ClusterSpec(rollout_workers=2, placement_timeout_s=60, learner={"ranks": 2}, resources={"learner": RoleResources(cpus=0.5)})
    placement = place(spec)
    try:
        assert placement["tool_proxy"].group is None and placement["tool_proxy"].options(0) == {"num_cpus": 0, "num_gpus": 0}
        learner = placement["learner"].all_options()
        assert len(learner) == 2 and [o["scheduling_strategy"].placement_group_bundle_index for o in learner] == [0, 1]
        assert all(o["num_cpus"] == 0.5 and o["scheduling_strategy"].placement_group == placement["learner"].group for o in learner)
        table = ray.util.placement_group_table(placement["learner"].group)
        assert table["state"] == "CREATED" and table["bundles"] == {0: {"CPU": 0.5}, 1: {"CPU": 0.5}}
    finally:
        placement.remove()


