"""A 2-step `train` of the ledger job (cluster_configs/ledger.yaml) on local Ray, with
every role real: vLLM rollout worker, tool proxy, endpoint grader, DeepSpeed learner."""

from __future__ import annotations

import json
import os
import time
from collections import Counter
from pathlib import Path

import pyarrow.compute as pc
import pytest
from transformers import AutoModelForCausalLM

from rft_cluster.driver import train
from rft_cluster.trajectory_store import TrajectoryStore
from rft_cluster.types import RolloutStatus
from tests.conftest import trace_score
from tests.wandb_log import wandb_history

pytestmark = pytest.mark.slow


def test_two_step_train_runs_every_role_and_writes_every_output(ray_local, demo_job, tmp_path: Path, ledger_env) -> None:
    out = tmp_path / "run"
    seen_before = ledger_env.trace_ids()  # the servers are the session's
    started = time.perf_counter()
    result = train(demo_job, out, max_steps=2)
    wall_s = time.perf_counter() - started
    assert result["steps"] == 2 and result["roles"] == {"rollout_worker": 1, "tool_proxy": 1, "grader": 1, "learner": 1}

    # Parquet: one row per scheduled rollout, each accounted for by status.
    store = TrajectoryStore(out)
    train_rows = store.read("train")
    assert train_rows.num_rows == 2 * 2 * 4
    assert sorted(set(train_rows["step"].to_pylist())) == [1, 2]
    eval_rows = store.read("eval")
    assert eval_rows.num_rows == 16 * 2  # validation before training and after the last step

    # Tool proxy and grader: the tool server saw each rollout's trace_id on all its calls, and
    # the grader's score (a function of the trace_id it was sent) is the stored reward.
    rows = train_rows.to_pylist() + eval_rows.to_pylist()
    assert sum(len(r["tool_calls"]) for r in rows) > 0, "the warm-started policy should call tools"
    for r in rows:
        sent = [c["call_id"] for c in r["tool_calls"] if c["status"] != "malformed"]
        assert [c["call_id"] for c in ledger_env.calls(r["trace_id"])] == sent
        if r["status"] in ("ok", "budget_exhausted"):
            assert r["reward"] == trace_score(r["trace_id"])
        else:
            assert r["reward"] is None

    # Metrics: learner and weight-sync figures per step, in metrics.jsonl and the offline W&B run.
    lines = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    steps = {x["step"]: x for x in lines}
    assert set(steps) == {0, 1, 2}
    for s in (1, 2):
        m = steps[s]
        assert m["train_rollouts"] == 8 and m["train/weight_sync_bytes"] > 0
        assert m["train/trained_samples"] == m["train/samples"] > 0 and "train/loss" in m
        # Each step's status counts are those of its stored rows (zeros for the statuses it lacks).
        stored = Counter(r["status"] for r in train_rows.to_pylist() if r["step"] == s)
        assert {st.value: m[f"train_status/{st.value}"] for st in RolloutStatus} == {st.value: stored[st.value] for st in RolloutStatus}
        # The step's timer spans the parts it waited on, trained and published in.
        parts = m["timing.step.waiting"] + m["timing.step.training"] + m["timing.step.weight_sync"]
        assert 0 < parts <= m["timing.step.full_iteration"] and m["timing.step.sampling"] > 0
    # and each step's timer restarts: the steps together took less than the whole run.
    assert sum(steps[s]["timing.step.full_iteration"] for s in (1, 2)) < wall_s
    assert "valid_reward_mean" in steps[0] and "valid_reward_mean" in steps[2]
    # The engines were warmed before the baseline without calling the tool server: it saw the
    # stored rollouts' trace ids only (16 eval rows above).
    assert steps[0]["timing.warmup"] > 0 and ledger_env.trace_ids() - seen_before <= {r["trace_id"] for r in rows}
    [run_dir] = (out / "wandb").glob("offline-run-*")
    history = wandb_history(run_dir)
    assert history[2]["train_rollouts"] == 8 and "timing.step.weight_sync" in history[2]

    # The final policy is a plain HF directory that transformers loads.
    model = AutoModelForCausalLM.from_pretrained(out / "final")
    assert model.config.model_type == "qwen2"
    assert not any(os.environ["RFT_DEMO_TOKEN"].encode() in p.read_bytes() for p in out.rglob("*") if p.is_file())
    assert pc.sum(pc.list_value_length(train_rows["token_ids"])).as_py() > 0

