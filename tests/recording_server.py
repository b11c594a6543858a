"""The tests' loopback HTTP endpoint (tool, grader, judge stand-ins): it records every POST and
answers with what a subclass scripts. Used inside the test's event loop: `async with
Server().serving() as server`."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Self

from aiohttp import web
from aiohttp.test_utils import TestServer


@dataclass(frozen=True)
class Recorded:
    path: str
    headers: dict[str, str]
    body: Any  # the parsed JSON body


class RecordingServer:
    """Records each request before `answer` sees it, and the most requests it held at once
    (`peak_in_flight`: what a concurrency limit is checked against, not wall-clock time)."""

    def __init__(self) -> None:
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.peak_in_flight = 0
        self.release = asyncio.Event()  # set at teardown: lets handlers that wait on it end
        self.base = ""

    def url(self, path: str) -> str:
        return self.base + path

    def hits(self, path: str) -> int:
        return sum(r.path == path for r in self.requests)

    async def answer(self, request: web.Request, body: Any) -> web.StreamResponse:
        raise NotImplementedError

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.json()
        self.requests.append(Recorded(request.path, dict(request.headers), body))
        self.in_flight += 1
        self.peak_in_flight = max(self.peak_in_flight, self.in_flight)
        try:
            return await self.answer(request, body)
        finally:
            self.in_flight -= 1

    @asynccontextmanager
    async def serving(self) -> AsyncIterator[Self]:
        app = web.Application()
        app.router.add_post("/{path:.*}", self._handle)
        async with TestServer(app, host="127.0.0.1") as srv:
            self.base = str(srv.make_url("")).rstrip("/")
            try:
                yield self
            finally:
                self.release.set()
