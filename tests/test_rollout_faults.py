"""Issue 24, classes 1, 5, 6 and 7 on a real run: an exception at any stage of one rollout's path —
building its record in the rollout worker (as `grader_sample` raised on 5,000 nested `[`), one
escaping the worker, a tool call, grading, storing — ends that rollout with a status naming the
stage (a tool call's: `tool_failed`, never `engine_failed`), counted in its step's metrics, and
the run finishes its steps. A secret in each exception's text straddling the cut is redacted
whole, never shown in part. The warm-up calls no user endpoint."""

from __future__ import annotations

import itertools
import json
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import ray

from rft_cluster import trajectory_store
from rft_cluster.driver import Cluster, Trainer
from rft_cluster.storage import RunStorage
from rft_cluster.trajectory_store import TrajectoryStore
from rft_cluster.types import RolloutStatus, Trajectory

pytestmark = pytest.mark.slow

CUT = 500  # where the driver, the trajectory store and the tool proxy cut an error text


def _straddling(message: str, token: str, before: str = "") -> str:
    """`message`, padded so that `token` starts 10 characters before the cut of the error text it
    ends up in, where `before` precedes it."""
    return message + "." * (CUT - 10 - len(before) - len(message)) + token


def _break_building(worker: Any, token: str) -> None:
    """In a rollout worker's process: every other record it builds raises (but those of rollouts
    a tool call ended: they are the tool fault's evidence), and every other fallback record too,
    so that some exceptions escape the worker's `rollout` call."""
    import rft_cluster.rollout_worker as rw

    def every_other(real: Any, error: Exception, spare: Any = lambda *args: False) -> Any:
        calls = itertools.count()

        def flaky(*args: Any, **kwargs: Any) -> Any:
            if not spare(*args) and next(calls) % 2 == 0:
                raise error
            return real(*args, **kwargs)

        return flaky

    building = _straddling("injected: maximum recursion depth exceeded", token, "building the trajectory: RecursionError: ")
    rw.grader_sample = every_other(rw.grader_sample, RecursionError(building), spare=lambda _text, calls: any(c.fatal for c in calls))
    rw.lost_trajectory = every_other(rw.lost_trajectory, RuntimeError(_straddling("injected: the fallback failed too", token)))


def _break_grading(actor: Any, token: str) -> None:
    """In a grader actor's process: every third grade raises out of the actor's `grade`."""
    calls, real = itertools.count(), actor._grader.grade

    async def flaky(*args: Any) -> Any:
        if next(calls) % 3 == 0:
            raise RuntimeError(_straddling("injected grading fault", token))
        return await real(*args)

    actor._grader.grade = flaky


def _break_tools(proxy: Any, token: str) -> None:
    """In a tool proxy's process: every third call raises inside the proxy (as a `Retry-After: ²` did)."""
    calls, real = itertools.count(), proxy.post

    async def flaky(*args: Any) -> Any:
        if next(calls) % 3 == 0:
            raise RuntimeError(_straddling("injected tool fault", token, "the tool proxy failed on this call: RuntimeError: "))
        return await real(*args)

    proxy.post = flaky


class FaultyTrainer(Trainer):
    def __init__(self, *args: Any, token: str, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.token = token

    def start(self, learner: bool = True) -> Cluster:
        c = super().start(learner)
        ray.get([w.__ray_call__.remote(_break_building, self.token) for w in c.fleet.workers]
                + [g.__ray_call__.remote(_break_grading, self.token) for g in c.graders]
                + [p.__ray_call__.remote(_break_tools, self.token) for p in c.proxies])
        return c


def test_an_exception_at_any_stage_of_a_rollout_ends_that_rollout_not_the_run(
    ray_local, demo_job, ledger_env, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Two validation rows: the warm-up and the evaluations run, briefly.
    valid = tmp_path / "valid.jsonl"
    valid.write_text("".join(Path(demo_job.resolve_path(demo_job.validation_file)).read_text().splitlines(keepends=True)[:2]))
    demo_job.validation_file = str(valid)
    # Storing: the first record with tokens of each step cannot be converted (its stub has none).
    doomed: dict[int, str] = {}
    real_row = trajectory_store._row

    def flaky_row(t: Trajectory) -> dict[str, Any]:
        if t.token_ids and doomed.setdefault(t.step, t.trace_id) == t.trace_id:
            raise ValueError(_straddling("injected storing fault", ledger_env.token))
        return real_row(t)

    monkeypatch.setattr(trajectory_store, "_row", flaky_row)
    seen_before = ledger_env.trace_ids()
    out = tmp_path / "run"
    trainer = FaultyTrainer(demo_job, RunStorage(out), max_steps=2, token=ledger_env.token)
    try:
        result = trainer.run()
    finally:
        trainer.shutdown()
    assert result["steps"] == 2

    rows = TrajectoryStore(out).read().to_pylist()
    errors = Counter((r["status"], (r["error"] or r["grader_error"] or "").split(":")[0]) for r in rows)
    assert errors[("internal_error", "building the trajectory")] > 0, errors
    assert errors[("internal_error", "returning the rollout")] > 0, errors
    assert errors[("internal_error", "storing the rollout")] > 0, errors
    assert any(r["status"] == "grader_failed" and "grading raised RuntimeError: injected grading fault" in r["grader_error"] for r in rows)
    assert any(r["status"] == "tool_failed" and "internal_error: the tool proxy failed on this call: RuntimeError: injected tool fault"
               in r["error"] for r in rows), errors
    assert not any(status == "engine_failed" for status, _ in errors), errors
    # The token (the job's `${RFT_DEMO_TOKEN}`) straddled each cut: redacted first, the cut falls within its
    # redacted form, and no text shows any part of the token itself.
    texts = [text for r in rows for text in (r["error"], r["grader_error"], *(c["output"] for c in r["tool_calls"])) if text]
    assert not [text for text in texts if ledger_env.token[:6] in text]
    cut_within = {text.split(":")[0] for text in texts if text.endswith(".${RFT_DEMO…")}
    assert cut_within >= {"building the trajectory", "grading raised RuntimeError", "storing the rollout",
                          "the tool proxy failed on this call"}, cut_within
    # Every scheduled rollout is stored and counted by status in its step's metrics.
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    assert set(metrics) == {0, 1, 2}
    for step in (1, 2):
        stored = Counter(r["status"] for r in rows if r["step"] == step and r["kind"] == "train")
        assert sum(stored.values()) == 2 * 4
        assert {s.value: metrics[step][f"train_status/{s.value}"] for s in RolloutStatus} == {s.value: stored[s.value] for s in RolloutStatus}
    # The warm-up sampled without calling the tool server: every trace id it saw is a stored rollout's.
    assert metrics[0]["timing.warmup"] > 0
    assert ledger_env.trace_ids() - seen_before <= {r["trace_id"] for r in rows}
