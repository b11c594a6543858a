"""ToolProxy against real loopback aiohttp servers (and once as a real Ray actor)."""

from __future__ import annotations

import asyncio
import json
import logging
import re
import socket
import time
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import ray
from aiohttp import web
from aiohttp.test_utils import TestServer

from rft_cluster.config import ToolSettings, ToolSpec
from rft_cluster.envs.ledger import LedgerServers
from rft_cluster.redact import Redactor, redact_logs
from rft_cluster.tool_proxy import ProxyClient, ToolProxy
from rft_cluster.types import ToolCallStatus
from tests.recording_server import RecordingServer

SECRET = "Bearer s3cret-value"
FAST = ToolSettings(timeout_s=1.0, max_retries=2, backoff_s=0.01, max_response_bytes=1000, max_request_bytes=1000)


class ToolServer(RecordingServer):
    """The path picks the behaviour."""

    async def answer(self, request: web.Request, body: Any) -> web.StreamResponse:
        kind = request.match_info["path"]
        if kind == "notfound":
            return web.Response(status=404, text="no such city: Atlantis")
        if kind == "unavailable":
            return web.Response(status=503, text="try later")
        if kind == "hang":
            await self.release.wait()
        if kind == "big":
            return web.json_response({"output": "x" * 5000})
        if kind == "garbage":
            return web.Response(text="<html>not json</html>")
        if kind == "slow":
            await asyncio.sleep(1.0)  # long enough that calls sent together overlap, even under load
        if kind == "reset":  # drop the connection without an answer
            assert request.transport is not None
            request.transport.abort()
            raise asyncio.CancelledError
        output = f"{body['name']}({body['arguments']})"
        return web.json_response({"type": "function_call_output", "call_id": body["call_id"], "id": body["id"], "output": output})


@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[ToolServer]:
    async with ToolServer().serving() as tools:
        yield tools


def proxy_for(server: ToolServer, kind: str, settings: ToolSettings = FAST, name: str = "search") -> ToolProxy:
    return ToolProxy([ToolSpec(name=name, server_url=server.url(f"/{kind}"), headers={"Authorization": SECRET})], settings)


async def test_sends_protocol_body_and_forwards_headers(server: ToolServer) -> None:
    tool = ToolSpec(name="search", server_url=server.url("/echo"), headers={"Authorization": SECRET, "X-Org": "acme"})
    proxy = ToolProxy([tool], FAST)
    item = {"answer": 42, "nested": {"k": [1, 2]}}
    result = await proxy.call("search", '{"q": "revenue"}', "call_1", "trace_abc", item)
    await proxy.close()

    assert result.status is ToolCallStatus.OK and not result.fatal
    assert result.output == 'search({"q": "revenue"})'
    assert (result.http_status, result.attempts, result.call_id) == (200, 1, "call_1")
    assert result.latency_s > 0
    [(_, headers, body)] = [(r.path, r.headers, r.body) for r in server.requests]
    assert set(body) == {"type", "id", "call_id", "name", "arguments", "trace_id", "item"}
    assert re.fullmatch(r"fc_[0-9a-f]+", body["id"])
    assert body == {
        "type": "function_call",
        "id": body["id"],
        "call_id": "call_1",
        "name": "search",
        "arguments": '{"q": "revenue"}',
        "trace_id": "trace_abc",
        "item": item,
    }
    assert headers["Authorization"] == SECRET and headers["X-Org"] == "acme"
    assert headers["Content-Type"] == "application/json"


async def test_tools_sharing_one_url_dispatch_by_name(server: ToolServer) -> None:
    url = server.url("/echo")
    proxy = ToolProxy([ToolSpec(name="search", server_url=url), ToolSpec(name="cat", server_url=url)], FAST)
    a, b = await asyncio.gather(proxy.call("search", "{}", "c1", "t", {}), proxy.call("cat", '{"p": 1}', "c2", "t", {}))
    await proxy.close()
    assert (a.output, b.output) == ("search({})", 'cat({"p": 1})')
    assert sorted(r.body["name"] for r in server.requests) == ["cat", "search"]


async def test_4xx_is_shown_to_the_model_without_retry(server: ToolServer) -> None:
    proxy = proxy_for(server, "notfound")
    result = await proxy.call("search", "{}", "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.CLIENT_ERROR and not result.fatal
    assert result.output == "HTTP 404: no such city: Atlantis"
    assert (result.http_status, result.attempts, server.hits("/notfound")) == (404, 1, 1)


async def test_5xx_is_retried_with_backoff_then_server_error(server: ToolServer, caplog: pytest.LogCaptureFixture) -> None:
    settings = FAST.model_copy(update={"max_retries": 2, "backoff_s": 0.05})
    proxy = proxy_for(server, "unavailable", settings)
    with caplog.at_level(logging.DEBUG):
        result = await proxy.call("search", "{}", "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.SERVER_ERROR and result.fatal
    assert server.hits("/unavailable") == 3 == result.attempts  # first try + max_retries
    assert result.http_status == 503
    assert result.latency_s >= 0.05 + 0.10  # backoff_s * 2**attempt between tries
    assert "s3cret" not in caplog.text  # header values are secrets


async def test_hanging_endpoint_times_out(server: ToolServer) -> None:
    proxy = proxy_for(server, "hang", FAST.model_copy(update={"timeout_s": 0.3, "max_retries": 1}))
    started = time.monotonic()
    result = await proxy.call("search", "{}", "c", "t", {})
    elapsed = time.monotonic() - started
    await proxy.close()
    assert result.status is ToolCallStatus.TIMEOUT and result.fatal
    assert server.hits("/hang") == 2
    # Two attempts, each cut at timeout_s (the endpoint never answers); the upper bound only
    # needs to tell "cut" from "waited on the hang", with room for a loaded machine.
    assert 0.6 <= elapsed < 10.0


async def test_oversized_response_becomes_a_413_for_the_model(server: ToolServer) -> None:
    proxy = proxy_for(server, "big")
    result = await proxy.call("search", "{}", "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.CLIENT_ERROR and not result.fatal
    assert result.output == "HTTP 413: response exceeds 1000 bytes"
    assert server.hits("/big") == 1


async def test_oversized_request_is_not_sent(server: ToolServer) -> None:
    proxy = proxy_for(server, "echo")
    result = await proxy.call("search", json.dumps({"q": "y" * 2000}), "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.MALFORMED
    assert "over the limit of 1000 bytes" in result.output
    assert (result.attempts, server.hits("/echo")) == (0, 0)


async def test_unreadable_2xx_body_is_a_bad_response(server: ToolServer) -> None:
    proxy = proxy_for(server, "garbage")
    result = await proxy.call("search", "{}", "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.BAD_RESPONSE and not result.fatal
    assert "string 'output'" in result.output and "not json" in result.output


async def test_connection_refused_is_retried_then_connection_error() -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proxy = ToolProxy([ToolSpec(name="search", server_url=f"http://127.0.0.1:{port}/")], FAST)
    result = await proxy.call("search", "{}", "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.CONNECTION_ERROR and result.fatal
    assert (result.attempts, result.http_status) == (3, None)


async def test_connection_reset_is_retried_then_connection_error(server: ToolServer) -> None:
    result = await proxy_for(server, "reset").call("search", "{}", "call_1", "trace_r", {})
    assert result.status == ToolCallStatus.CONNECTION_ERROR and result.fatal
    assert result.attempts == server.hits("/reset") == FAST.max_retries + 1


async def test_unknown_tool_is_malformed_and_lists_known_tools(server: ToolServer) -> None:
    proxy = proxy_for(server, "echo")
    result = await proxy.call("serach", "{}", "c", "t", {})
    await proxy.close()
    assert result.status is ToolCallStatus.MALFORMED
    assert "'serach'" in result.output and "search" in result.output.split("known tools:")[1]
    assert server.hits("/echo") == 0


@pytest.mark.parametrize(("max_concurrency", "peak"), [(64, 8), (2, 2)])
async def test_calls_overlap_up_to_max_concurrency(server: ToolServer, max_concurrency: int, peak: int) -> None:
    """Counted at the endpoint, not timed: 8 calls of 1 s are all in flight at once, or never
    more than the limit."""
    proxy = proxy_for(server, "slow", FAST.model_copy(update={"max_concurrency": max_concurrency, "timeout_s": 10.0}))
    results = await asyncio.gather(*(proxy.call("search", str(i), f"c{i}", "t", {}) for i in range(8)))
    await proxy.close()
    assert all(r.status is ToolCallStatus.OK for r in results)
    assert server.hits("/slow") == 8 and server.peak_in_flight == peak


def test_proxy_as_ray_actor_against_ledger(ray_local: None) -> None:
    with LedgerServers(seed=5) as env:
        actor = ray.remote(ToolProxy).remote(env.tool_specs(), ToolSettings(timeout_s=5.0))
        accounts = list(env.ledger)[:4] + ["ACC-XXXX"]
        refs = [
            actor.call.remote("lookup", json.dumps({"account": a}), f"call_{i}", "trace_ray", {"account": a})
            for i, a in enumerate(accounts)
        ]
        results = ray.get(refs)
        ray.get(actor.close.remote())
        ray.kill(actor)
        calls = env.calls("trace_ray")

    for account, result in zip(accounts[:4], results):
        assert result.status is ToolCallStatus.OK
        assert result.output == f"{account} balance: {env.ledger[account]}"
    assert results[-1].status is ToolCallStatus.CLIENT_ERROR and results[-1].http_status == 404
    assert sorted(c["call_id"] for c in calls) == [f"call_{i}" for i in range(5)]


async def test_concurrency_is_capped_per_endpoint_host(server: ToolServer) -> None:
    """Two hosts (one server reached as 127.0.0.1 and as localhost): each gets at most
    max_concurrency requests at once, and both at the same time."""
    inflight: Counter[str] = Counter()
    peak: Counter[str] = Counter()
    release = asyncio.Event()

    async def slow(request: web.Request) -> web.Response:
        host = request.headers["Host"].split(":")[0]
        inflight[host] += 1
        peak[host] = max(peak[host], inflight[host])
        if sum(inflight.values()) == 4:  # both hosts at their cap: let everything finish
            release.set()
        await asyncio.wait_for(release.wait(), timeout=5)
        inflight[host] -= 1
        body = await request.json()
        return web.json_response({"output": body["arguments"]})

    app = web.Application()
    app.router.add_post("/slow", slow)
    async with TestServer(app, host="127.0.0.1") as srv:
        port = srv.port
        tools = [ToolSpec(name="a", server_url=f"http://127.0.0.1:{port}/slow"), ToolSpec(name="b", server_url=f"http://localhost:{port}/slow")]
        proxy = ToolProxy(tools, FAST.model_copy(update={"max_concurrency": 2, "timeout_s": 10.0}))
        calls = [(name, str(i), f"c{name}{i}", "t", {}) for name in "ab" for i in range(5)]
        results = await proxy.call_batch(calls)
        await proxy.close()
    assert [r.output for r in results] == [c[1] for c in calls] and all(r.status is ToolCallStatus.OK for r in results)
    assert peak == {"127.0.0.1": 2, "localhost": 2}


class CountingProxy(ToolProxy):
    """A ToolProxy that records the size of every batch it is sent."""

    def __init__(self, *args: Any) -> None:
        super().__init__(*args)
        self.batches: list[int] = []

    async def call_batch(self, calls: list[Any]) -> list[Any]:
        self.batches.append(len(calls))
        return await super().call_batch(calls)

    def batch_sizes(self) -> list[int]:
        return self.batches


def test_proxy_client_sends_one_tick_of_calls_as_one_batch_per_proxy(ray_local: None) -> None:
    with LedgerServers(seed=5) as env:
        proxies = [ray.remote(CountingProxy).remote(env.tool_specs(), ToolSettings(timeout_s=5.0)) for _ in range(2)]
        accounts = list(env.ledger)[:7]

        async def calls() -> tuple[list[Any], Any]:
            client = ProxyClient(proxies)
            tick = await asyncio.gather(
                *(client.call("lookup", json.dumps({"account": a}), f"call_{i}", "trace_tick", {}) for i, a in enumerate(accounts))
            )
            alone = await client.call("lookup", json.dumps({"account": accounts[0]}), "call_alone", "trace_tick", {})
            return tick, alone

        tick, alone = asyncio.run(calls())
        sizes = [ray.get(p.batch_sizes.remote()) for p in proxies]
        ray.get([p.close.remote() for p in proxies])  # an unclosed session warns at exit, into a later test's output
        for p in proxies:
            ray.kill(p)

    assert [r.call_id for r in tick] == [f"call_{i}" for i in range(7)]
    assert [r.output for r in tick] == [f"{a} balance: {env.ledger[a]}" for a in accounts]
    assert alone.output == f"{accounts[0]} balance: {env.ledger[accounts[0]]}"
    # 7 calls of one tick: 4 to the first proxy, 3 to the second; the next call goes on round-robin.
    assert sizes == [[4], [3, 1]]


async def test_proxy_client_without_proxies_names_the_tool() -> None:
    with pytest.raises(RuntimeError, match="'lookup'.*no tool proxy"):
        await ProxyClient([]).call("lookup", "{}", "c", "t", {})


PLANTED = "tok-" + "7" * 20


class FaultyProxy(ToolProxy):
    """A proxy whose own code raises: in `post` for the tool `broken`, with a secret straddling
    the 500-character cut of its error; in `call_batch` for a batch holding the tool `explode`."""

    async def post(self, tool: ToolSpec, body: dict[str, Any]) -> Any:
        if tool.name == "broken":
            raise ValueError("x" * 440 + PLANTED)
        return await super().post(tool, body)

    async def call_batch(self, calls: list[Any]) -> list[Any]:
        if any(name == "explode" for name, *_ in calls):
            raise RuntimeError("injected batch fault")
        return await super().call_batch(calls)


async def test_a_call_the_proxy_raises_on_fails_alone_and_fatally(server: ToolServer) -> None:
    """Fatal: its rollout ends as tool_failed (never engine_failed); the batch's other calls go on."""
    tools = [ToolSpec(name="search", server_url=server.url("/echo")), ToolSpec(name="broken", server_url=server.url("/echo"))]
    proxy = FaultyProxy(tools, FAST, Redactor({"TOKEN": PLANTED}))
    try:
        ok, broken = await proxy.call_batch([("search", "{}", "c1", "t", {}), ("broken", "{}", "c2", "t", {})])
    finally:
        await proxy.close()
        redact_logs(Redactor())  # the process's log redactor, set by the proxy: back to the default
    assert ok.status is ToolCallStatus.OK and not ok.fatal
    assert (broken.call_id, broken.status, broken.fatal) == ("c2", ToolCallStatus.INTERNAL_ERROR, True)
    assert broken.output.startswith("the tool proxy failed on this call: ValueError: xxx")
    assert "${TOKEN}" in broken.output and "7777" not in broken.output  # redacted whole, then cut


def test_a_batch_the_proxy_raises_on_fails_each_call_fatally_naming_the_fault(ray_local: None) -> None:
    with LedgerServers(seed=5) as env:
        proxy = ray.remote(FaultyProxy).remote(env.tool_specs(), ToolSettings(timeout_s=5.0))

        async def calls() -> list[Any]:
            client = ProxyClient([proxy])
            return await asyncio.gather(client.call("explode", "{}", "call_1", "t", {}), client.call("lookup", "{}", "call_2", "t", {}))

        results = asyncio.run(calls())
        ray.get(proxy.close.remote())
        ray.kill(proxy)
    assert [(r.call_id, r.status, r.fatal) for r in results] == [("call_1", ToolCallStatus.INTERNAL_ERROR, True),
                                                                  ("call_2", ToolCallStatus.INTERNAL_ERROR, True)]
    assert all(r.output == "the tool proxy failed on this batch: RuntimeError: injected batch fault" for r in results)
