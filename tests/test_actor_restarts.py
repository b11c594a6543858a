"""A tool proxy or grader whose process is SIGKILLed mid-call is restarted by Ray
(`restartable` options), and the calls that were in flight return normal results: retried on
the new process, so the endpoint sees them twice (at-least-once), with the same ids."""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest
import ray
from aiohttp import web

from rft_cluster.actor_restarts import restartable
from rft_cluster.config import EndpointGrader, ToolSettings, ToolSpec
from rft_cluster.grader_actor import GraderActor
from rft_cluster.serving import ThreadedServer
from rft_cluster.tool_proxy import ProxyClient, ToolProxy
from rft_cluster.types import ToolCallStatus, ToolResult

HOLD_S = 1.0  # the endpoint answers this late, so a kill lands while calls are in flight


class SlowEndpoint:
    """A tool endpoint (/tool) and a grader endpoint (/grade) that answer after HOLD_S and
    record every request body (on the server's thread)."""

    def __init__(self) -> None:
        self.bodies: dict[str, list[dict[str, Any]]] = {"tool": [], "grade": []}

    async def handle(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        body = await request.json()
        self.bodies[kind].append(body)
        await asyncio.sleep(HOLD_S)
        if kind == "tool":
            return web.json_response({"output": f"done {body['call_id']}"})
        return web.json_response({"score": len(body["sample"]["output_text"]) / 10})


@pytest.fixture
def endpoint() -> Iterator[tuple[SlowEndpoint, str]]:
    slow = SlowEndpoint()
    app = web.Application()
    app.router.add_post("/{kind}", slow.handle)
    with ThreadedServer(app) as server:
        yield slow, server.url


def pid_of(actor: Any) -> int:
    return ray.get(actor.__ray_call__.remote(lambda self: os.getpid()), timeout=60)


def kill_when(actor: Any, arrived: Any, timeout_s: float = 60.0) -> int:
    """SIGKILLs the actor's process once `arrived()` holds; returns the killed PID."""
    pid = pid_of(actor)
    deadline = time.monotonic() + timeout_s
    while not arrived():
        assert time.monotonic() < deadline, "calls never reached the endpoint"
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    return pid


def test_restartable_options() -> None:
    assert restartable(3) == {"max_restarts": 3, "max_task_retries": -1}
    assert restartable(0) == {"max_restarts": 0, "max_task_retries": 0}
    with pytest.raises(ValueError, match="actor_max_restarts"):
        restartable(-1)


def test_killed_tool_proxy_restarts_and_in_flight_calls_return_normally(ray_local: None, endpoint: tuple[SlowEndpoint, str]) -> None:
    slow, url = endpoint
    spec = ToolSpec(name="slow", server_url=f"{url}/tool")
    proxy = ray.remote(ToolProxy).options(num_cpus=0, **restartable(1)).remote([spec], ToolSettings(timeout_s=10.0))
    call_ids = [f"call_{i}" for i in range(6)]

    async def calls() -> list[Any]:
        client = ProxyClient([proxy])
        return await asyncio.gather(*(client.call("slow", "{}", c, f"trace_{c}", {"i": c}) for c in call_ids))

    async def scenario() -> tuple[int, list[Any]]:
        pending = asyncio.ensure_future(calls())
        killed = await asyncio.to_thread(kill_when, proxy, lambda: len(slow.bodies["tool"]) == len(call_ids))
        return killed, await asyncio.wait_for(pending, timeout=120)

    killed, results = asyncio.run(scenario())
    try:
        assert pid_of(proxy) != killed  # a new process answered
        assert [r.call_id for r in results] == call_ids
        for r in results:
            assert r.status is ToolCallStatus.OK and r.output == f"done {r.call_id}" and r.attempts == 1
        # At-least-once: every in-flight call reached the endpoint again, with its call_id and
        # trace_id (a fresh request id).
        sent = slow.bodies["tool"]
        assert sorted(b["call_id"] for b in sent) == sorted(call_ids * 2)
        for c in call_ids:
            first, again = (b for b in sent if b["call_id"] == c)
            assert first["trace_id"] == again["trace_id"] == f"trace_{c}" and first["id"] != again["id"]
    finally:
        ray.kill(proxy)


def test_killed_grader_restarts_and_in_flight_grades_return_normally(ray_local: None, endpoint: tuple[SlowEndpoint, str]) -> None:
    slow, url = endpoint
    spec = EndpointGrader(type="endpoint", name="slow", url=f"{url}/grade")
    grader = ray.remote(GraderActor).options(num_cpus=0, **restartable(1)).remote(spec, ToolSettings(timeout_s=10.0))
    texts = ["a" * n for n in range(1, 5)]
    refs = [grader.grade.remote({"output_text": t}, {}, f"trace_{len(t)}") for t in texts]
    killed = kill_when(grader, lambda: len(slow.bodies["grade"]) == len(texts))
    results = ray.get(refs, timeout=120)
    try:
        assert pid_of(grader) != killed
        assert [r.score for r in results] == [len(t) / 10 for t in texts] and all(r.error is None for r in results)
        assert sorted(b["trace_id"] for b in slow.bodies["grade"]) == sorted(f"trace_{len(t)}" for t in texts * 2)
    finally:
        ray.kill(grader)


def test_without_restarts_the_caller_sees_the_death(ray_local: None, endpoint: tuple[SlowEndpoint, str]) -> None:
    """A proxy out of restarts fails its calls as `proxy_lost` (fatal: the rollout ends
    `tool_failed` naming it), not as an exception the rollout would blame on its engine."""
    slow, url = endpoint
    proxy = ray.remote(ToolProxy).options(num_cpus=0, **restartable(0)).remote([ToolSpec(name="slow", server_url=f"{url}/tool")], ToolSettings())

    async def scenario() -> ToolResult:
        pending = asyncio.ensure_future(ProxyClient([proxy]).call("slow", "{}", "call_x", "trace_x", {}))
        await asyncio.to_thread(kill_when, proxy, lambda: len(slow.bodies["tool"]) == 1)
        return await asyncio.wait_for(pending, timeout=60)

    result = asyncio.run(scenario())
    assert (result.call_id, result.status, result.fatal) == ("call_x", ToolCallStatus.PROXY_LOST, True)
    assert "ActorDiedError" in result.output
