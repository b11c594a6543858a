"""The tool proxy (docs/architecture.md §1): forwards the model's tool calls to users' endpoints
in OpenAI's function_call protocol (§3 there) and turns every outcome into a `ToolResult`.

A plain class with async methods; the driver wraps it with `ray.remote` (an async actor).
Rollout workers reach it through `ProxyClient`, which carries many calls per actor call.

Every call ends by its deadline, `rollout_timeout_s` from when the proxy takes it (queueing,
attempts, backoffs and `Retry-After` waits all count), and what it sends is strict JSON.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from typing import Any

from rft_cluster.config import ToolSettings, ToolSpec
from rft_cluster.http import Failure, HttpOutcome, JsonPoster, clip
from rft_cluster.redact import Redactor, redact_logs
from rft_cluster.types import ToolCallStatus, ToolResult, strict_json

# What each failure of a call makes of it; the fatal ones end the rollout as `tool_failed` (a
# 429 too: waited out while retries last, then the rollout is discarded, never shown).
_FAILURE_STATUS = {
    Failure.REQUEST_TOO_LARGE: ToolCallStatus.MALFORMED,
    Failure.RESPONSE_TOO_LARGE: ToolCallStatus.CLIENT_ERROR,
    Failure.SERVER: ToolCallStatus.SERVER_ERROR,
    Failure.RATE_LIMITED: ToolCallStatus.SERVER_ERROR,
    Failure.CONNECTION: ToolCallStatus.CONNECTION_ERROR,
    Failure.TIMEOUT: ToolCallStatus.TIMEOUT,
}

# One tool call's arguments to `ToolProxy.call`: (name, arguments, call_id, trace_id, item).
ToolCall = tuple[str, str, str, str, dict[str, Any]]


def function_call_body(name: str, arguments: str, call_id: str, trace_id: str, item: dict[str, Any]) -> dict[str, Any]:
    """The request body of OpenAI's tool-endpoint protocol (docs/architecture.md §3); a
    non-finite number in the item is sent as null (strict JSON)."""
    return {
        "type": "function_call",
        "id": f"fc_{uuid.uuid4().hex}",
        "call_id": call_id,
        "name": name,
        "arguments": arguments,
        "trace_id": trace_id,
        "item": strict_json(item),
    }


class ToolProxy:
    """`redactor` (the job's) hides secrets in what the model sees and in this process's logs."""

    def __init__(self, tools: list[ToolSpec], settings: ToolSettings, redactor: Redactor | None = None):
        self._redact = redactor or Redactor()
        if redactor is not None:  # the job's: this process's log records go through it too
            redact_logs(redactor)
        self._tools = {t.name: t for t in tools}
        if len(self._tools) != len(tools):
            raise ValueError(f"duplicate tool names in {[t.name for t in tools]}")
        self._settings = settings
        self._poster = JsonPoster(settings)

    async def call(self, name: str, arguments: str, call_id: str, trace_id: str, item: dict[str, Any]) -> ToolResult:
        tool = self._tools.get(name)
        if tool is None:
            return self.unknown_tool(name, arguments, call_id)
        try:
            body = function_call_body(name, arguments, call_id, trace_id, item)
            return self.result(body, await self.post(tool, body))
        except Exception as e:  # noqa: BLE001 - this call fails (its rollout ends as tool_failed), never its batch
            why = self._redact.clip(f"the tool proxy failed on this call: {type(e).__name__}: {e}", 500)  # redacted, then cut
            return ToolResult(call_id, name, arguments, why, ToolCallStatus.INTERNAL_ERROR)

    async def call_batch(self, calls: list[ToolCall]) -> list[ToolResult]:
        """Many calls in one actor call (they run concurrently), results in the same order."""
        return list(await asyncio.gather(*(self.call(*c) for c in calls)))

    def unknown_tool(self, name: str, arguments: str, call_id: str) -> ToolResult:
        known = ", ".join(sorted(self._tools)) or "(none)"
        return ToolResult(call_id, name, arguments, f"unknown tool {name!r}; known tools: {known}", ToolCallStatus.MALFORMED)

    async def post(self, tool: ToolSpec, body: dict[str, Any]) -> HttpOutcome:
        """The call's outcome by its deadline (`rollout_timeout_s`: nothing waits on it longer)."""
        started, deadline = time.monotonic(), self._settings.rollout_timeout_s
        try:
            async with asyncio.timeout(deadline):
                return await self._poster.post(tool.server_url, body, tool.headers)
        except TimeoutError:
            # The attempts cut short are not counted here (JsonPoster keeps that count): 0 says unknown.
            detail = f"no result within the call's deadline of rollout_timeout_s={deadline:g} s (attempts, retries and waits)"
            return HttpOutcome(None, b"", Failure.TIMEOUT, detail, 0, time.monotonic() - started)

    def result(self, body: dict[str, Any], outcome: HttpOutcome) -> ToolResult:
        """The accounted result of the call `body`, from its HTTP outcome."""
        output, status = self._interpret(outcome)
        return ToolResult(
            call_id=body["call_id"],
            name=body["name"],
            arguments=body["arguments"],
            output=self._redact.text(output),
            status=status,
            http_status=outcome.status,
            latency_s=outcome.latency_s,
            attempts=outcome.attempts,
        )

    def tool(self, name: str) -> ToolSpec | None:
        return self._tools.get(name)

    def _interpret(self, outcome: HttpOutcome) -> tuple[str, ToolCallStatus]:
        """(text shown to the model, status) for one outcome. A fatal one's text still lands in
        the trajectory record."""
        error = outcome.error()
        if error is None:
            output = outcome.field("output")
            if isinstance(output, str):
                return output, ToolCallStatus.OK
            return outcome.missing("JSON body holding a string 'output'"), ToolCallStatus.BAD_RESPONSE
        if outcome.failure is not None:
            return error, _FAILURE_STATUS[outcome.failure]
        # An answer outside 2xx: a 4xx is the model's to see and act on, a 1xx/3xx the endpoint's fault.
        client = outcome.status is not None and 400 <= outcome.status < 500
        return error, ToolCallStatus.CLIENT_ERROR if client else ToolCallStatus.BAD_RESPONSE

    async def close(self) -> None:
        await self._poster.close()


class ProxyClient:
    """How an async Ray actor (a rollout worker) calls tool proxy actors. Calls issued in one
    event-loop tick travel together: one `call_batch` per proxy, the tick's calls spread over
    the proxies evenly. An actor call costs about a millisecond of Ray overhead, so one call per
    tool call would cap a caller near 1,000 calls/s; batching amortises it.

    A batch returns when its slowest call does. Its calls were issued in the same tick, so they
    started together; a proxy that dies mid-batch has the whole batch retried by Ray (see
    `actor_restarts.restartable`)."""

    def __init__(self, proxies: Sequence[Any]):
        self._proxies = list(proxies)
        self._next = 0  # the proxy that gets the next tick's first share
        self._pending: list[tuple[ToolCall, asyncio.Future[ToolResult]]] = []
        self._sending: set[asyncio.Task[None]] = set()  # strong references while in flight

    async def call(self, name: str, arguments: str, call_id: str, trace_id: str, item: dict[str, Any]) -> ToolResult:
        if not self._proxies:
            raise RuntimeError(f"tool {name!r} called, but this worker was given no tool proxy actors")
        loop = asyncio.get_running_loop()
        if not self._pending:
            loop.call_soon(self._flush)  # runs after every coroutine ready in this tick
        future: asyncio.Future[ToolResult] = loop.create_future()
        self._pending.append(((name, arguments, call_id, trace_id, item), future))
        return await future

    def _flush(self) -> None:
        pending, self._pending = self._pending, []
        n = len(self._proxies)
        for k in range(min(n, len(pending))):
            proxy = self._proxies[(self._next + k) % n]
            task = asyncio.ensure_future(self._send(proxy, pending[k::n]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)
        self._next = (self._next + len(pending)) % n

    @staticmethod
    async def _send(proxy: Any, share: list[tuple[ToolCall, asyncio.Future[ToolResult]]]) -> None:
        try:
            results = await proxy.call_batch.remote([c for c, _ in share])
        except Exception as e:  # noqa: BLE001 - each call of the batch fails, fatally: its rollout ends as tool_failed
            from ray.exceptions import RayActorError

            if isinstance(e, RayActorError):  # the proxy is gone for good (restarts exhausted)
                status, why = ToolCallStatus.PROXY_LOST, f"the tool proxy actor is gone, its restarts used up ({type(e).__name__})"
            else:  # the proxy (or Ray, sending the batch) raised: never an engine's fault
                cause = getattr(e, "cause", None)  # a RayTaskError wraps what the proxy raised
                cause = cause if isinstance(cause, BaseException) else e
                status, why = ToolCallStatus.INTERNAL_ERROR, clip(f"the tool proxy failed on this batch: {type(cause).__name__}: {cause}", 500)
            results = [ToolResult(call_id, name, arguments, why, status) for (name, arguments, call_id, _, _), _ in share]
        for (_, future), result in zip(share, results):
            if not future.done():  # a caller may have been cancelled (rollout timeout)
                future.set_result(result)
