"""The driver's pure parts: grouping, advantages, reward shaping, prompt order."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rft_cluster.config import load_job
from rft_cluster.driver import Trainer, _request, batches, run_storage
from rft_cluster.grpo import group_advantages, shaped_reward
from rft_cluster.types import RolloutStatus, Trajectory


def test_rollouts_of_one_prompt_share_a_group_and_train_with_nonzero_advantages() -> None:
    row = {"messages": [{"role": "user", "content": "q"}], "answer": 1}
    requests = [_request(row, 7, step=3, split="train") for _ in range(4)] + [_request(row, 8, step=3, split="train")]
    assert len({r.group_id for r in requests[:4]}) == 1 and requests[4].group_id != requests[0].group_id
    trajs = [
        Trajectory(r.trace_id, r.prompt_id, r.group_id, 3, [1, 2, 3], [0, 1, 1], [0.0, -1.0, -1.0], [-1, 0, 0], 1, "", reward=float(i % 2))
        for i, r in enumerate(requests)
    ]
    samples = Trainer.train_samples(trajs)
    assert len(samples) == 4 and sorted(s.advantage > 0 for s in samples) == [False, False, True, True]


def test_discarded_rollouts_leave_their_group() -> None:
    requests = [_request({"messages": []}, 0, step=1, split="train") for _ in range(3)]
    trajs = [
        Trajectory(r.trace_id, r.prompt_id, r.group_id, 1, [1, 2], [0, 1], [0.0, -1.0], [-1, 0], 1, "", reward=rew, status=st)
        for r, rew, st in zip(requests, [1.0, 0.0, None], [RolloutStatus.OK, RolloutStatus.OK, RolloutStatus.TOOL_FAILED])
    ]
    samples = Trainer.train_samples(trajs)
    # Two graded rollouts remain; the failed one neither trains nor shifts the group mean.
    assert len(samples) == 2 and abs(samples[0].advantage + samples[1].advantage) < 1e-9


def test_batches_are_a_pure_function_of_seed_and_step() -> None:
    a, b = batches(10, 3, seed=5), batches(10, 3, seed=5)
    first = [next(a) for _ in range(7)]
    assert first == [next(b) for _ in range(7)]
    assert sorted(i for batch in first[:3] for i in batch) == sorted(set(i for batch in first[:3] for i in batch))  # no repeats in an epoch
    other = batches(10, 3, seed=6)
    assert first[:3] != [next(other) for _ in range(3)]


def test_scaled_tool_call_penalty_charges_only_rollouts_that_earned_credit() -> None:
    # subtract: a failed rollout with fewer calls out-scores one that looked harder
    assert shaped_reward(0.0, 1, 0, 0.05, "subtract", 0.0) > shaped_reward(0.0, 6, 0, 0.05, "subtract", 0.0)
    # scale: failures tie whatever their calls, so a group that all failed carries no signal ...
    rewards = [shaped_reward(0.0, n, 0, 0.05, "scale", 0.0) for n in (1, 3, 6, 10)]
    assert rewards == [0.0] * 4 and group_advantages(rewards, ["g"] * 4) == [0.0] * 4
    # ... while among right answers the one with fewer calls wins, partial credit pays its share
    assert shaped_reward(1.0, 2, 0, 0.05, "scale", 0.0) == pytest.approx(0.9)
    assert shaped_reward(0.5, 6, 0, 0.05, "scale", 0.0) == pytest.approx(0.35)
    assert shaped_reward(1.0, 30, 0, 0.05, "scale", 0.0) == 0.0  # never below zero
    assert shaped_reward(1.0, 2, 10, 0.05, "scale", 0.01) == pytest.approx(0.8)


def test_run_storage_prefers_output_then_the_jobs_storage_then_runs_train(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_file = tmp_path / "jobs" / "job.json"
    job_file.parent.mkdir()
    job_file.write_text(json.dumps({
        "model": "some/model", "training_file": "train.jsonl", "storage": "out/run",
        "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}}},
    }))
    job = load_job(job_file)
    monkeypatch.chdir(tmp_path)
    assert run_storage(job, f"file://{tmp_path}/x").uri == f"file://{tmp_path}/x"
    assert run_storage(job, "here").uri == str(tmp_path / "here")  # --output: relative to the working directory
    assert run_storage(job).uri == str(tmp_path / "jobs" / "out" / "run")  # storage: relative to the job file, as its other paths
    job.storage = f"file://{tmp_path}/y"
    assert run_storage(job).uri == f"file://{tmp_path}/y"
    job.storage = None
    assert run_storage(job).uri == str(tmp_path / "runs" / "train")
