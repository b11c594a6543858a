"""Failure accounting under load: a training run whose tool endpoint fails about a third of its
requests transiently still finishes every step, and every rollout and every HTTP attempt is
accounted for (metrics = Parquet rows = rollouts scheduled). And a run outlives its actors: a
rollout worker or a tool proxy SIGKILLed mid-step."""

from __future__ import annotations

import json
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from rft_cluster.config import ToolSpec
import ray

from rft_cluster.driver import Cluster, Trainer, train
from rft_cluster.serving import ThreadedServer
from rft_cluster.storage import RunStorage
from rft_cluster.trajectory_store import TrajectoryStore
from tests.conftest import DelayedTool

pytestmark = pytest.mark.slow


class FlakyFront:
    """Forwards tool calls to the ledger, but answers every 3rd request with a 503 and drops the
    connection of every 7th: transient faults the proxy must retry through."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.seen = 0
        self.requests: Counter[str] = Counter()  # trace_id -> requests
        self.injected: Counter[str] = Counter()  # trace_id -> faults injected

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.seen += 1
        body = await request.read()
        trace_id = json.loads(body)["trace_id"]
        self.requests[trace_id] += 1
        if self.seen % 3 == 0:
            self.injected[trace_id] += 1
            return web.Response(status=503, text="overloaded, try again")
        if self.seen % 7 == 0:
            self.injected[trace_id] += 1
            assert request.transport is not None
            request.transport.abort()
            raise ConnectionResetError
        async with aiohttp.ClientSession() as session:
            async with session.post(self.upstream, data=body, headers={"Authorization": request.headers["Authorization"]}) as up:
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)


@pytest.fixture
def flaky_front(ledger_env) -> Iterator[tuple[FlakyFront, str]]:
    front = FlakyFront(ledger_env.tool_url)
    app = web.Application()
    app.router.add_post("/tool", front.handle)
    with ThreadedServer(app) as server:
        yield front, f"{server.url}/tool"


def test_a_third_of_tool_requests_failing_transiently_loses_no_rollout(ray_local, demo_job, flaky_front, ledger_env, tmp_path: Path) -> None:
    front, url = flaky_front
    demo_job.rl.tools = [ToolSpec(name="lookup", server_url=url, headers=ledger_env.headers)]
    demo_job.rl.tool_settings.backoff_s = 0.05
    out = tmp_path / "run"
    train(demo_job, out, max_steps=2)

    rows = TrajectoryStore(out).read().to_pylist()
    metrics = {m["step"]: m for m in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}
    scheduled = {"train": 2 * 4, "valid": 16}  # per step: batch 2 x group 4; every validation row once
    for step, m in metrics.items():
        for prefix, kind in (("train", "train"), ("valid", "eval")):
            if f"{prefix}_rollouts" not in m:
                continue
            stored = [r for r in rows if r["step"] == step and r["kind"] == kind]
            by_status = sum(m[k] for k in m if k.startswith(f"{prefix}_status/"))
            assert m[f"{prefix}_rollouts"] == by_status == len(stored) == scheduled[prefix]
    assert set(metrics) == {0, 1, 2}

    # Every HTTP request the front saw is an attempt recorded on one of a stored rollout's
    # tool calls; there are no others (the warm-up calls no tool).
    stored = {r["trace_id"] for r in rows}
    assert set(front.requests) <= stored
    calls = [c for r in rows for c in r["tool_calls"] if c["status"] != "malformed"]
    assert sum(c["attempts"] for c in calls) == sum(front.requests[t] for t in stored)
    # Every injected fault shows on its call: as a retry, or as the failure that ended it once
    # retries ran out (a call that gave up early, retried a success or lost count would not add up).
    exhausted = [c for c in calls if c["status"] in ("server_error", "connection_error")]
    assert sum(front.injected[t] for t in stored) == sum(c["attempts"] - 1 for c in calls) + len(exhausted)
    assert any(c["attempts"] > 1 and c["status"] == "ok" for c in calls), "some call recovered by retrying"
    assert all(c["http_status"] == 503 for c in exhausted if c["status"] == "server_error")
    # Calls that exhausted their retries ended their rollout as tool_failed, never silently.
    for r in rows:
        fatal = [c for c in r["tool_calls"] if c["status"] in ("server_error", "connection_error", "timeout")]
        assert (r["status"] == "tool_failed") == bool(fatal)
        if r["status"] == "tool_failed":
            assert r["reward"] is None and r["error"]


# --------------------------------------------------------------------------- dead actors


@pytest.fixture
def slow_tools(demo_job, ledger_env) -> Iterator[None]:
    """The demo job's tool behind a 1 s delay, and no validation (the kills happen in step 1)."""
    app = web.Application()
    app.router.add_post("/tool", DelayedTool(ledger_env.tool_url, 1.0).handle)
    with ThreadedServer(app) as server:
        demo_job.rl.tools = [ToolSpec(name="lookup", server_url=f"{server.url}/tool", headers=ledger_env.headers)]
        demo_job.validation_file = None
        yield


def _pid(_actor: Any) -> int:
    return os.getpid()


def run_killing(trainer: Trainer, victim: Callable[[Cluster], Any], step: int) -> tuple[dict[str, Any], int]:
    """Runs `trainer`, SIGKILLing the process of actor `victim(cluster)` 0.5 s into `step` (its
    rollouts are then waiting on their first 1 s tool calls). Returns (run result, the killed pid)."""
    killed: list[int] = []

    def watch() -> None:
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:
            batch = trainer._batches.get(step)
            if batch is not None and batch.ended < batch.expected and time.perf_counter() - batch.submitted_at > 0.5:
                pid = ray.get(victim(trainer.cluster).__ray_call__.remote(_pid))
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
                return
            time.sleep(0.02)

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = trainer.run()
    finally:
        trainer.shutdown()
    watcher.join(timeout=5)
    assert killed, f"the watcher never saw step {step} in flight"
    return result, killed[0]


def _gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_a_rollout_worker_killed_mid_step_loses_no_rollout(ray_local, demo_job, slow_tools, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result, pid = run_killing(Trainer(demo_job, RunStorage(out), max_steps=2), lambda c: c.fleet.workers[0], step=2)
    assert result["steps"] == 2 and result["fleet"]["losses"] == 1 and _gone(pid)
    # The replacement started in the dead worker's slot.
    [join] = result["fleet"]["joins"]
    assert join["slot"] == 0

    rows = TrajectoryStore(out).read("train").to_pylist()
    assert len({r["trace_id"] for r in rows}) == len(rows), "a rollout stored twice"
    lost = [r for r in rows if r["status"] == "worker_lost"]
    assert lost and all(r["step"] == 2 and r["reward"] is None and r["token_ids"] == [] and "died" in r["error"] for r in lost)
    # Every group still has its 4 rollouts that ended (the lost ones re-run with new trace ids).
    ended = Counter(r["group_id"] for r in rows if r["status"] != "worker_lost")
    assert len(ended) == 4 and set(ended.values()) == {4}
    assert len(rows) == 2 * 2 * 4 + len(lost)
    # Step 2 was sampled on step 1's weights (version 1), its re-runs too: the replacement loaded
    # them before its first rollout (the model on its disk is version 0).
    assert {v for r in rows if r["step"] == 2 for v in r["weight_versions"] if v >= 0} == {1}
    metrics = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [1, 2]
    assert metrics[1]["train_status/worker_lost"] == len(lost) and metrics[1]["pipeline/worker_losses"] == 1
    assert metrics[1]["train/trained_samples"] > 0, "the re-runs were trained on"


def test_a_tool_proxy_killed_mid_step_is_restarted_and_its_calls_retried(ray_local, demo_job, slow_tools, tmp_path: Path) -> None:
    out = tmp_path / "run"
    result, pid = run_killing(Trainer(demo_job, RunStorage(out), max_steps=2), lambda c: c.proxies[0], step=1)
    assert result["steps"] == 2 and result["fleet"]["losses"] == 0 and _gone(pid)
    rows = TrajectoryStore(out).read("train").to_pylist()
    assert len(rows) == 2 * 2 * 4
    # No rollout ended on the dead proxy: its in-flight calls were retried on the restarted one.
    assert {r["status"] for r in rows} <= {"ok", "budget_exhausted"}, Counter(r["status"] for r in rows)
    assert all(c["status"] in ("ok", "client_error", "malformed") for r in rows for c in r["tool_calls"])
    assert any(c["status"] == "ok" for r in rows if r["step"] == 2 for c in r["tool_calls"]), "the restarted proxy serves step 2"
