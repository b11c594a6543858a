"""Tool calls/s as training makes them, against a plain aiohttp client, side by side.

    PYTHONPATH=$PWD .venv/bin/python benchmarks/bench_tool_proxy.py [--concurrency 1 16 64 256 1000] [--seconds 3]

A local endpoint answers every call after 50 ms, in a process of its own. At each concurrency C:
- plain client: this process, one aiohttp session, C coroutines calling in a closed loop;
- as training makes them: C coroutines in a Ray actor calling through `ProxyClient` (the rollout
  worker's client) and real `ToolProxy` actors, in a closed loop.
Each side is measured for `seconds` after a warm-up, one after the other. Writes
benchmarks/results/tool-proxy.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import socket
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import ray
from aiohttp import web

from rft_cluster.config import ToolSettings, ToolSpec
from rft_cluster.tool_proxy import ProxyClient, ToolProxy, function_call_body
from rft_cluster.types import ToolCallStatus

from common import RESULTS, write_result  # benchmarks/common.py, beside this script

CONCURRENCY = (1, 16, 64, 256, 1000)
TOOL_DELAY_S = 0.05
WARMUP_S = 1.0


def _serve(port: int, delay_s: float) -> None:
    """The tool endpoint: answers each call in the protocol's shape after `delay_s`."""

    async def handle(request: web.Request) -> web.Response:
        body = await request.json()
        await asyncio.sleep(delay_s)
        return web.json_response({"type": "function_call_output", "call_id": body["call_id"], "output": "ok"})

    async def main() -> None:
        app = web.Application()
        app.router.add_post("/tool", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=4096).start()
        await asyncio.Event().wait()

    asyncio.run(main())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_listening(port: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            if time.monotonic() > deadline:
                raise RuntimeError(f"tool endpoint did not listen on port {port} within {timeout_s}s") from None
            time.sleep(0.1)


async def closed_loop(call: Callable[[int, int], Awaitable[None]], concurrency: int, seconds: float) -> float:
    """Calls/s completed by `concurrency` coroutines each calling `call(coroutine, n)` back to
    back, counted over `seconds` after a warm-up."""
    loop = asyncio.get_running_loop()
    start = loop.time() + WARMUP_S
    end = start + seconds
    done = 0

    async def one(i: int) -> None:
        nonlocal done
        n = 0
        while loop.time() < end:
            await call(i, n)
            n += 1
            if start <= loop.time() < end:
                done += 1

    await asyncio.gather(*(one(i) for i in range(concurrency)))
    return done / seconds


async def plain_client(url: str, concurrency: int, seconds: float) -> float:
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:

        async def call(i: int, n: int) -> None:
            body = function_call_body("echo", json.dumps({"n": n}), f"call_{i}_{n}", f"plain-{i}", {})
            async with session.post(url, json=body) as resp:
                assert resp.status == 200 and (await resp.json())["output"] == "ok"

        return await closed_loop(call, concurrency, seconds)


class Caller:
    """Ray actor: tool calls the way a rollout worker makes them (`ProxyClient`)."""

    def __init__(self, proxies: list[Any]):
        self.tools = ProxyClient(proxies)

    async def run(self, concurrency: int, seconds: float) -> float:
        async def call(i: int, n: int) -> None:
            result = await self.tools.call("echo", json.dumps({"n": n}), f"call_{i}_{n}", f"bench-{i}", {})
            assert result.status is ToolCallStatus.OK, result.output

        return await closed_loop(call, concurrency, seconds)


def run(concurrency: tuple[int, ...] = CONCURRENCY, seconds: float = 3.0, proxies: int = 1) -> dict[str, Any]:
    """{"tool_proxy": [{"concurrency", "calls_per_s", "plain_client_calls_per_s"}]}."""
    port = _free_port()
    url = f"http://127.0.0.1:{port}/tool"
    server = multiprocessing.get_context("spawn").Process(target=_serve, args=(port, TOOL_DELAY_S), daemon=True)
    server.start()
    own_ray = not ray.is_initialized()
    if own_ray:
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
        ray.init(num_cpus=4, include_dashboard=False)
    # This module may be imported under a name Ray's workers cannot import (benchmarks/).
    ray.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    try:
        _wait_listening(port)
        # The default cap per endpoint host, raised where it would be what is measured.
        settings = ToolSettings(max_concurrency=max(ToolSettings().max_concurrency, *concurrency))
        actors = [
            ray.remote(ToolProxy).options(num_cpus=0).remote([ToolSpec(name="echo", server_url=url)], settings)
            for _ in range(proxies)
        ]
        caller = ray.remote(Caller).options(num_cpus=0).remote(actors)
        rows = []
        for c in concurrency:
            plain = asyncio.run(plain_client(url, c, seconds))
            proxied = ray.get(caller.run.remote(c, seconds))
            rows.append({"concurrency": c, "calls_per_s": round(proxied, 1), "plain_client_calls_per_s": round(plain, 1)})
            print(f"[bench] C={c}: proxy {proxied:.0f}/s, plain {plain:.0f}/s, ratio {proxied / plain:.2f}", flush=True)
        for a in [caller, *actors]:
            ray.kill(a)
    finally:
        if own_ray:
            ray.shutdown()
        server.kill()
        server.join()
    return {"tool_proxy": rows}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--seconds", type=float, default=3.0, help="measured per side and concurrency")
    parser.add_argument("--proxies", type=int, default=1, help="tool proxy actors (cluster.tool_proxies)")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    write_result(args.results, "tool-proxy.json", run(tuple(args.concurrency), args.seconds, args.proxies))
    return 0


if __name__ == "__main__":
    sys.exit(main())
