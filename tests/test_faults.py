"""Failure accounting under load: a training run whose tool endpoint fails about a third of its
requests transiently still finishes every step, and every rollout and every HTTP attempt is
accounted for (metrics = Parquet rows = rollouts scheduled)."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from rft_cluster.config import ToolSpec
from rft_cluster.driver import train
from rft_cluster.serving import ThreadedServer
from rft_cluster.store import TrajectoryStore

pytestmark = pytest.mark.slow


class FlakyFront:
    """Forwards tool calls to the ledger, but answers every 3rd request with a 503 and drops the
    connection of every 7th: transient faults the proxy must retry through."""

    def __init__(self, upstream: str):
        self.upstream = upstream
        self.requests = 0
        self.injected = 0

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        body = await request.read()
        if self.requests % 3 == 0:
            self.injected += 1
            return web.Response(status=503, text="overloaded, try again")
        if self.requests % 7 == 0:
            self.injected += 1
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

    # Every HTTP request the front saw is an attempt recorded on some stored tool call.
    calls = [c for r in rows for c in r["tool_calls"] if c["status"] != "malformed"]
    assert sum(c["attempts"] for c in calls) == front.requests
    assert front.injected >= front.requests // 3 and any(c["attempts"] > 1 for c in calls)
    # Calls that exhausted their retries ended their rollout as tool_failed, never silently.
    for r in rows:
        fatal = [c for c in r["tool_calls"] if c["status"] in ("server_error", "connection_error", "timeout")]
        assert (r["status"] == "tool_failed") == bool(fatal)
        if r["status"] == "tool_failed":
            assert r["reward"] is None and r["error"]
