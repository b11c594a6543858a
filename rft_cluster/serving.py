"""An aiohttp application served on 127.0.0.1 from a background thread with its own event
loop, so synchronous code (the driver, the CLI, tests) can run real HTTP endpoints beside it:

    with ThreadedServer(app) as server:
        server.url        # http://127.0.0.1:<free port>
        server.run(coro)  # run a coroutine on the server's loop (to read its state safely)
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

T = TypeVar("T")


class ThreadedServer:
    def __init__(self, app: web.Application, host: str = "127.0.0.1", port: int = 0):
        self._host, self._port = host, port
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="threaded-server", daemon=True)
        self._runner = web.AppRunner(app, access_log=None)
        self.url = ""

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=timeout)

    async def _start(self) -> str:
        await self._runner.setup()
        await web.TCPSite(self._runner, self._host, self._port).start()
        host, port = self._runner.addresses[0][:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> ThreadedServer:
        self._thread.start()
        try:
            self.url = self.run(self._start())
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self.run(self._runner.cleanup())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()
        self._loop.close()
