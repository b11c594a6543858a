"""The Parquet trajectory store, on a local directory and on S3 (`run_location`)."""

from __future__ import annotations

import math

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from rft_cluster.trajectory_store import SCHEMA, TrajectoryStore
from rft_cluster.types import RolloutStatus, ToolCallStatus, ToolResult, Trajectory
from tests.conftest import RunLocation


def traj(trace_id: str, step: int = 3, **kw) -> Trajectory:
    fields = dict(
        trace_id=trace_id,
        prompt_id="row-7",
        group_id="g-1",
        step=step,
        token_ids=[101, 7, 8, 9, 70_000],
        loss_mask=[0, 1, 1, 0, 1],
        logprobs=[0.0, -0.25, -1.5, 0.0, -0.125],
        weight_versions=[-1, 4, 4, -1, 5],
        prompt_len=1,
        output_text="42.0",
    )
    return Trajectory(**(fields | kw))


def test_round_trip_keeps_every_column(run_location: RunLocation) -> None:
    calls = [
        ToolResult("call_1", "search", '{"q": "x"}', "hits", ToolCallStatus.OK, 200, 0.5, 1),
        ToolResult("call_2", "cat", "{}", "", ToolCallStatus.CONNECTION_ERROR, None, 2.25, 4),
    ]
    t = traj(
        "trace_a",
        tool_calls=calls,
        status=RolloutStatus.TOOL_FAILED,
        score=0.75,
        reward=0.5,
        grader_error="boom",
        reasoning_tokens=7,
        unparsed_call_like=["llama3_json", "mistral"],
        num_turns=3,
        latency_s=9.5,
        grader_latency_s=0.75,
        error="cat: connection refused",
        node_id="node-1",
    )
    store = TrajectoryStore(run_location.uri)
    assert store.append([t]) == "trajectories/kind=train/step-000003.parquet"
    assert run_location.files() == ["trajectories/kind=train/step-000003.parquet"]

    table = store.read()
    assert table.schema == SCHEMA.append(pa.field("kind", pa.string(), nullable=False))
    [row] = table.to_pylist()
    assert row == {
        "trace_id": "trace_a",
        "step": 3,
        "prompt_id": "row-7",
        "group_id": "g-1",
        "token_ids": [101, 7, 8, 9, 70_000],
        "loss_mask": [0, 1, 1, 0, 1],
        "logprobs": [0.0, -0.25, -1.5, 0.0, -0.125],  # exact in float32
        "weight_versions": [-1, 4, 4, -1, 5],
        "prompt_len": 1,
        "output_text": "42.0",
        "tool_calls": [
            {"call_id": "call_1", "name": "search", "arguments": '{"q": "x"}', "output": "hits",
             "status": "ok", "http_status": 200, "latency_s": 0.5, "attempts": 1},
            {"call_id": "call_2", "name": "cat", "arguments": "{}", "output": "",
             "status": "connection_error", "http_status": None, "latency_s": 2.25, "attempts": 4},
        ],
        "score": 0.75,
        "reward": 0.5,
        "status": "tool_failed",
        "grader_error": "boom",
        "num_turns": 3,
        "latency_s": 9.5,
        "grader_latency_s": 0.75,
        "error": "cat: connection refused",
        "generated_tokens": 3,
        "reasoning_tokens": 7,
        "unparsed_call_like": ["llama3_json", "mistral"],
        "node_id": "node-1",
        "kind": "train",
    }


def test_reward_is_null_not_zero_or_nan(run_location: RunLocation) -> None:
    store = TrajectoryStore(run_location.uri)
    store.append([traj("trace_a", reward=None, status=RolloutStatus.GRADER_FAILED), traj("trace_b", reward=0.0)])
    rewards = store.read().column("reward").to_pylist()
    assert rewards == [None, 0.0]
    assert not any(r is not None and math.isnan(r) for r in rewards)


def test_rewriting_a_step_replaces_it(run_location: RunLocation) -> None:
    store = TrajectoryStore(run_location.uri)
    store.append([traj("trace_old1"), traj("trace_old2")])
    store.append([traj("trace_new")])  # the same step again, e.g. redone after a resume
    assert store.read().column("trace_id").to_pylist() == ["trace_new"]
    # Only the final file remains: no temp files are left behind.
    assert run_location.files() == ["trajectories/kind=train/step-000003.parquet"]


def test_files_sort_by_step_and_kinds_are_separate(run_location: RunLocation) -> None:
    store = TrajectoryStore(run_location.uri)
    for step in (10, 2, 1):
        store.append([traj(f"trace_{step}", step=step)])
    store.append([traj("trace_eval", step=2)], kind="eval")

    assert store.read("train").column("step").to_pylist() == [1, 2, 10]
    assert store.read("eval").column("trace_id").to_pylist() == ["trace_eval"]
    assert store.trace_ids() == {"trace_1", "trace_2", "trace_10", "trace_eval"}
    assert store.trace_ids("eval") == {"trace_eval"}
    everything = store.read()
    assert sorted(zip(everything.column("kind").to_pylist(), everything.column("step").to_pylist())) == [
        ("eval", 2), ("train", 1), ("train", 2), ("train", 10)
    ]
    # Other Parquet readers recover `kind` from the Hive-style directories.
    st = store.storage
    assert set(pq.read_table(st.path("trajectories"), filesystem=st.fs).column("kind").to_pylist()) == {"train", "eval"}


def test_drop_after_removes_later_steps_of_every_kind(run_location: RunLocation) -> None:
    store = TrajectoryStore(run_location.uri)
    for step in (1, 2, 3):
        store.append([traj(f"trace_{step}", step=step)])
    store.append([traj("trace_eval_0", step=0)], kind="eval")
    store.append([traj("trace_eval_3", step=3)], kind="eval")
    assert store.drop_after(1) == 3
    assert store.trace_ids() == {"trace_1", "trace_eval_0"}
    assert run_location.files() == ["trajectories/kind=eval/step-000000.parquet", "trajectories/kind=train/step-000001.parquet"]


def test_empty_store_reads_as_empty_table(run_location: RunLocation) -> None:
    store = TrajectoryStore(run_location.uri)
    assert store.read().num_rows == 0
    assert store.trace_ids() == set()


def test_append_rejects_mixed_or_no_steps_and_unknown_kind(run_location: RunLocation) -> None:
    store = TrajectoryStore(run_location.uri)
    with pytest.raises(ValueError, match="exactly one step"):
        store.append([traj("a", step=1), traj("b", step=2)])
    with pytest.raises(ValueError, match="exactly one step"):
        store.append([])
    with pytest.raises(ValueError, match="kind"):
        store.append([traj("a")], kind="test")  # type: ignore[arg-type]
