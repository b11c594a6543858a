"""What every embedded environment serves: a tool endpoint (OpenAI's function_call protocol), an
endpoint grader and per-trace_id logs of both, behind one bearer token — and `EnvServers`, which
runs them on 127.0.0.1 (a free port) from a background thread (`rft_cluster.serving`), so a
synchronous driver can use an environment as a context manager.

An environment supplies two plain functions: `call_tool(name, arguments) -> (status, output)`
(`tool_caller` makes one from a `call(name, arguments) -> output` that raises `ToolError`) and
`grade(output_text, answer) -> (score, number read or None)`, plus its tool names and grader name.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import secrets
from collections import defaultdict
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any, TypeVar

from aiohttp import web

from rft_cluster.config import EndpointGrader, ToolSpec
from rft_cluster.serving import ThreadedServer

CallTool = Callable[[Any, Any], tuple[int, str]]  # (name, arguments JSON string) → (HTTP status, text)
Grade = Callable[[str, float], tuple[float, float | None]]  # (output_text, item.answer) → (score, given)
_Servers = TypeVar("_Servers", bound="EnvServers")


class ToolError(Exception):
    """A call the tools refuse; the server answers `status` with the message as its body."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


def tool_caller(call: Callable[[Any, Any], str]) -> CallTool:
    """`call(name, arguments) -> output` as a CallTool: a ToolError is its status and message."""

    def call_tool(name: Any, arguments: Any) -> tuple[int, str]:
        try:
            return 200, call(name, arguments)
        except ToolError as e:
            return e.status, e.message

    return call_tool


class EnvApp:
    """The aiohttp application and its per-trace_id logs of tool calls and grades. Tool calls run
    in worker threads, so one that blocks (reading files, running a model) does not hold up the
    other rollouts' calls; the logs are only touched on the event loop. `tool_delay_s` holds every
    tool call that long before it runs, as a slow real tool (a web search, an API) would."""

    def __init__(self, token: str, call_tool: CallTool, grade: Grade, tool_delay_s: float = 0.0):
        if tool_delay_s < 0:
            raise ValueError(f"tool_delay_s must be >= 0, got {tool_delay_s}")
        self._token = token
        self._tool_delay_s = tool_delay_s
        self._call_tool = call_tool
        self._grade_output = grade
        self._calls: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)
        self._grades: defaultdict[str, list[dict[str, Any]]] = defaultdict(list)

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._auth])
        app.router.add_post("/tool", self._tool)
        app.router.add_post("/grade", self._grade)
        app.router.add_get("/calls/{trace_id}", self._trace_log)
        return app

    @web.middleware
    async def _auth(self, request: web.Request, handler: Any) -> web.StreamResponse:
        given = request.headers.get("Authorization", "")
        if not hmac.compare_digest(given.encode(), f"Bearer {self._token}".encode()):
            return web.Response(status=401, text="missing or wrong bearer token")
        return await handler(request)

    async def _tool(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        if body is None:
            return web.Response(status=400, text="body must be a JSON object (a function_call)")
        if self._tool_delay_s:  # on the loop, not in a worker thread: delayed calls wait side by side
            await asyncio.sleep(self._tool_delay_s)
        status, output = await asyncio.to_thread(self._call_tool, body.get("name"), body.get("arguments"))
        self._calls[str(body.get("trace_id"))].append(
            {"id": body.get("id"), "call_id": body.get("call_id"), "name": body.get("name"),
             "arguments": body.get("arguments"), "status": status}
        )
        if status != 200:
            return web.Response(status=status, text=output)
        return web.json_response(
            {"type": "function_call_output", "call_id": body.get("call_id"), "id": body.get("id"), "output": output}
        )

    async def _grade(self, request: web.Request) -> web.Response:
        body = await _json_object(request)
        sample = body.get("sample") if body else None
        item = body.get("item") if body else None
        answer = item.get("answer") if isinstance(item, dict) else None
        if not (isinstance(sample, dict) and isinstance(sample.get("output_text"), str)
                and isinstance(answer, (int, float)) and not isinstance(answer, bool)):
            return web.Response(status=400, text="need sample.output_text (string) and item.answer (number)")
        score, given = self._grade_output(sample["output_text"], answer)
        self._grades[str(body.get("trace_id"))].append({"score": score, "answer": answer, "given": given})
        return web.json_response({"score": score})

    def trace_log(self, trace_id: str) -> dict[str, Any]:
        """A copy of what the server saw for trace_id: its tool calls and its grades."""
        return json.loads(json.dumps({"tool_calls": self._calls.get(trace_id, []), "grades": self._grades.get(trace_id, [])}))

    def trace_ids(self) -> set[str]:
        return set(self._calls) | set(self._grades)

    async def _trace_log(self, request: web.Request) -> web.Response:
        return web.json_response(self.trace_log(request.match_info["trace_id"]))


async def _json_object(request: web.Request) -> dict[str, Any] | None:
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


class EnvServers:
    """An EnvApp served from a background thread: `with SomeEnv(...) as env: ...`, with the
    job's `tool_specs()` (every tool on the one URL: the server dispatches on the call's name)
    and `grader_spec()`."""

    def __init__(
        self,
        call_tool: CallTool,
        grade: Grade,
        tool_names: Sequence[str],
        grader_name: str,
        token: str | None = None,
        tool_delay_s: float = 0.0,
    ):
        self.tool_names = tuple(tool_names)
        self.grader_name = grader_name
        self.token = token or secrets.token_urlsafe(16)
        self._app = EnvApp(self.token, call_tool, grade, tool_delay_s)
        self._server = ThreadedServer(self._app.app())

    @property
    def base_url(self) -> str:
        return self._server.url

    @property
    def tool_url(self) -> str:
        return f"{self.base_url}/tool"

    @property
    def grader_url(self) -> str:
        return f"{self.base_url}/grade"

    @property
    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.token}"}

    def tool_specs(self) -> list[ToolSpec]:
        return [ToolSpec(name=name, server_url=self.tool_url, headers=self.headers) for name in self.tool_names]

    def grader_spec(self) -> EndpointGrader:
        return EndpointGrader(type="endpoint", name=self.grader_name, url=self.grader_url, headers=self.headers)

    def calls(self, trace_id: str) -> list[dict[str, Any]]:
        """Tool calls the server saw for trace_id (id, call_id, name, arguments, HTTP status)."""
        return self._trace_log(trace_id)["tool_calls"]

    def grades(self, trace_id: str) -> list[dict[str, Any]]:
        """Grades the server gave for trace_id (score, answer, number read from the output)."""
        return self._trace_log(trace_id)["grades"]

    def trace_ids(self) -> set[str]:
        """Every trace_id the servers saw (on a tool call or a grade)."""

        async def read() -> set[str]:
            return self._app.trace_ids()

        return self._server.run(read(), timeout=10)

    def _trace_log(self, trace_id: str) -> dict[str, Any]:
        async def read() -> dict[str, Any]:  # on the server's loop: no cross-thread access to the logs
            return self._app.trace_log(trace_id)

        return self._server.run(read(), timeout=10)

    def __enter__(self: _Servers) -> _Servers:
        self._server.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None) -> None:
        self._server.__exit__(exc_type, exc, tb)
