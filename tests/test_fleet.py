"""An elastic rollout fleet under Ray's autoscaler: a run asks for 1..2 rollout workers on a
cluster with one rollout node; the autoscaler (its fake multi-node provider, real raylets on
this machine) adds a second node for the pending worker, which joins mid-run with the learner's
current weights. And a run whose sampling runs one step ahead of training (max_staleness 1)."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml
from aiohttp import web

from rft_cluster.driver import train
from rft_cluster.serving import ThreadedServer
from rft_cluster.trajectory_store import TrajectoryStore
from tests.conftest import LEDGER_JOB, DelayedTool
from tests.ray_cluster import RayCluster

pytestmark = pytest.mark.slow


def fake_autoscaling_config(gcs_address: str, head_cpus: int, worker_types: dict) -> dict:
    """What `ray.cluster_utils.AutoscalingCluster` generates for Ray's fake multi-node provider,
    written here because its `start()` runs `ray stop --force` (which would end every Ray cluster
    on the machine) and its template file is missing from the wheel; the provider gets the
    head's GCS address instead of the default port."""
    return {
        "cluster_name": "fake_multinode",
        "max_workers": 8,
        "provider": {"type": "fake_multinode", "use_node_id_as_ip": True, "disable_node_updaters": True,
                     "disable_launch_config_check": True, "gcs_address": gcs_address},
        "available_node_types": {
            "ray.head.default": {"resources": {"CPU": head_cpus}, "node_config": {}, "max_workers": 0},
            **worker_types,
        },
        "head_node_type": "ray.head.default",
        "auth": {},
        "upscaling_speed": 1.0,
        "idle_timeout_minutes": 5,
        "docker": {},
        "initialization_commands": [], "setup_commands": [], "head_setup_commands": [], "worker_setup_commands": [],
        "head_start_ray_commands": [], "worker_start_ray_commands": [],
        "file_mounts": {}, "cluster_synced_files": [], "file_mounts_sync_continuously": False,
        "rsync_exclude": [], "rsync_filter": [],
    }


def test_the_autoscaler_adds_a_rollout_node_and_its_worker_joins_with_current_weights(tmp_path: Path, demo_job, ledger_env) -> None:
    app = web.Application()
    app.router.add_post("/tool", DelayedTool(ledger_env.tool_url, 0.5).handle)
    with ThreadedServer(app) as tool:
        job = yaml.safe_load(LEDGER_JOB.read_text())
        rl = job["method"]["reinforcement"]
        rl["hyperparameters"].update(batch_size=2, max_steps=24)
        rl["grader"] = {"type": "endpoint", "name": "by-trace", "url": demo_job.rl.grader.url,
                        "headers": {"Authorization": "Bearer ${RFT_DEMO_TOKEN}"}}
        rl["tools"][0]["server_url"] = f"{tool.url}/tool"
        job.pop("validation_file")
        job["cluster"].update(rollout_workers={"min": 1, "max": 2}, placement_timeout_s=120,
                              resources={"rollout_worker": {"cpus": 1, "resources": {"rollout_node": 1}}})
        job_file = tmp_path / "job.yaml"
        job_file.write_text(yaml.safe_dump(job, sort_keys=False))

        # demo_job copied the model and datasets into tmp_path, where ${RFT_DEMO_DIR} points.
        env = {"RFT_DEMO_DIR": str(tmp_path), "RFT_DEMO_URL": ledger_env.base_url,
               "RFT_DEMO_TOKEN": ledger_env.token, "WANDB_SILENT": "true", "HF_HUB_OFFLINE": "1"}
        config_file = tmp_path / "autoscaler.yaml"
        cluster = RayCluster(env=env, head_cpus=2, head_env={"RAY_FAKE_CLUSTER": "1", "AUTOSCALER_UPDATE_INTERVAL_S": "2"})
        rollout_type = {"resources": {"CPU": 1, "rollout_node": 1}, "node_config": {}, "min_workers": 1, "max_workers": 2}
        config_file.write_text(json.dumps(fake_autoscaling_config(cluster.address, 2, {"rollout": rollout_type})))
        cluster.head_args = (f"--autoscaling-config={config_file}",)
        with cluster:
            cluster.wait_for_nodes(2)  # the head and the rollout type's min_workers node
            run = subprocess.run(
                [sys.executable, "-m", "rft_cluster.cli", "train", str(job_file), "--output", str(tmp_path / "run")],
                env={**cluster.client_env(), **env, "RAY_ADDRESS": cluster.address}, capture_output=True, text=True, timeout=1500,
            )
            nodes = {n["node_id"]: n["resources_total"] for n in cluster.nodes()}
        assert run.returncode == 0, run.stdout[-5000:] + run.stderr[-3000:]

    rollout_nodes = {n for n, res in nodes.items() if "rollout_node" in res}
    assert len(rollout_nodes) == 2, "the autoscaler should have added a second rollout node"
    # Whichever slot was placed second joined.
    joined = re.findall(r"rollout worker \d joined on node (\w+) at weight version (\d+)", run.stdout)
    assert len(joined) == 1, "\n".join(line for line in run.stdout.splitlines() if "[rft]" in line)
    node, version = joined[0][0], int(joined[0][1])
    assert node in rollout_nodes
    started = next(line for line in run.stdout.splitlines() if "[rft] actors up" in line)
    assert "'rollout_worker': 1," in started, started  # sampling began with the fleet's min

    rows = TrajectoryStore(tmp_path / "run").read("train").to_pylist()
    assert len(rows) == 24 * 2 * 4 and len({r["trace_id"] for r in rows}) == len(rows)
    by_node = Counter(r["node_id"] for r in rows)
    assert set(by_node) == rollout_nodes, by_node
    # The joiner's first rollouts were sampled by the learner's weights of that moment: with
    # max_staleness 0, step s samples on version s - 1 (the SIGKILL test in test_faults.py has a
    # replacement load version 1 before its first rollout).
    first_step = min(r["step"] for r in rows if r["node_id"] == node)
    first = [r for r in rows if r["node_id"] == node and r["step"] == first_step]
    assert version <= first_step - 1
    assert {v for r in first for v in r["weight_versions"] if v >= 0} == {first_step - 1}
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    sizes = [len(r["nodes"]["rollout_worker"]) for r in records]
    assert sizes[-1] == 2 and records[-1]["pipeline/rollout_workers"] == 2


def test_sampling_runs_one_step_ahead_within_max_staleness(ray_local, demo_job, tmp_path: Path) -> None:
    demo_job.rl.hyperparameters.max_staleness = 1
    demo_job.validation_file = None
    out = tmp_path / "run"
    assert train(demo_job, out, max_steps=3)["steps"] == 3
    table = pq.read_table(out / "trajectories")
    rows = table.to_pylist()
    assert len(rows) == 3 * 2 * 4 and len({r["trace_id"] for r in rows}) == len(rows)

    def oldest(r: dict) -> int:
        return min(v for v in r["weight_versions"] if v >= 0)

    # Step s+1 was sampled while step s trained: its oldest tokens come from version s-1 ...
    assert any(oldest(r) == 0 for r in rows if r["step"] == 2)
    # ... and nothing trained on is more than one learner update old.
    trained = [r for r in rows if r["status"] in ("ok", "budget_exhausted")]
    assert all(r["step"] - 1 - oldest(r) <= 1 for r in trained)
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert max(m["pipeline/staleness_max"] for m in metrics) == 1
    assert all(m["pipeline/staleness_max"] <= 1 and m["pipeline/dropped_stale"] == 0 for m in metrics)
    assert all(m["timing.step.training"] > 0 and "pipeline/buffered_rollouts" in m for m in metrics)
