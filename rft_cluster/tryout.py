"""`rft-cluster tool-run` and `grader-run`: one call to a user's endpoint, made exactly as
training makes it (same proxy/grader code, same body, a fresh trace_id, a dataset row as
`item`), with the request, the response and what the model or learner receives printed.
Everything printed passes through the job's redactor (`rft_cluster.redact`): header values, the
`${VAR}` values and URL credentials are never shown. Text from the endpoint is printed as it is,
never read as rich markup or emoji codes, its control characters shown as escapes
(`rft_cluster.untrusted.visible`)."""

from __future__ import annotations

import json
from typing import Any

from rich.console import Console
from rich.text import Text

from rft_cluster.config import JobSpec
from rft_cluster.dataset import load_rows, row_item
from rft_cluster.formats import ParsedCall, _checked
from rft_cluster.grader_actor import GraderActor
from rft_cluster.redact import Redactor
from rft_cluster.tool_proxy import ToolProxy, function_call_body
from rft_cluster.types import GradeResult, ToolCallStatus, ToolResult, grader_sample, new_trace_id
from rft_cluster.untrusted import visible


def _rule(console: Console, redact: Redactor, title: str) -> None:
    console.rule(Text(visible(redact.text(title))))


def _text(console: Console, redact: Redactor, text: str) -> None:
    """`text` exactly: no markup, no emoji codes, no highlighting, controls as escapes."""
    console.print(Text(visible(redact.text(text))), soft_wrap=True)


def _show(console: Console, redact: Redactor, title: str, obj: Any) -> None:
    _rule(console, redact, title)
    console.print_json(json.dumps(redact(obj), default=str))  # JSON escapes control characters itself


def _item(job: JobSpec, row: int) -> dict[str, Any]:
    rows = load_rows(job.resolve_path(job.training_file))
    if not 0 <= row < len(rows):  # the path may hold a `${VAR}`'s value
        raise SystemExit(job.redactor.text(f"--row {row}: {job.training_file} has rows 0..{len(rows) - 1}"))
    return row_item(rows[row])


async def tool_run(job: JobSpec, name: str, arguments: str, row: int, console: Console) -> ToolResult:
    redact = job.redactor
    proxy = ToolProxy(job.rl.tools, job.rl.tool_settings, redact)
    try:
        tool, call = proxy.tool(name), _checked(ParsedCall("call_tryout", name, arguments))
        if tool is None:
            result = proxy.unknown_tool(name, arguments, "call_tryout")
        elif call.error is not None:  # as a rollout marks the model's call: not sent
            result = ToolResult(call.id, name, arguments, f"Error: {call.error}", ToolCallStatus.MALFORMED)
        else:
            body = function_call_body(name, arguments, "call_tryout", new_trace_id(), _item(job, row))
            _show(console, redact, f"request: POST {tool.server_url}", {"headers": tool.headers, "body": body})
            outcome = await proxy.post(tool, body)
            _rule(console, redact, f"response: HTTP {outcome.status} after {outcome.attempts} attempt(s), {outcome.latency_s:.3f} s")
            _text(console, redact, outcome.text(4000) or f"(no response: {outcome.detail})")
            result = proxy.result(body, outcome)
    finally:
        await proxy.close()
    _rule(console, redact, f"the model receives (status {result.status.value}{', the rollout ends as tool_failed' if result.fatal else ''})")
    _text(console, redact, result.output)
    return result


async def grader_run(job: JobSpec, output_text: str, row: int, console: Console) -> GradeResult:
    sample, item, trace_id = grader_sample(output_text, []), _item(job, row), new_trace_id()
    grader, redact = job.rl.grader, job.redactor
    _show(console, redact, f"request: {grader.type} grader {grader.name!r}", {"sample": sample, "item": item, "trace_id": trace_id})
    actor = GraderActor(grader, job.rl.tool_settings, redact)
    try:
        result = await actor.grade(sample, item, trace_id)
    finally:
        await actor.close()
    if result.score is None:
        _rule(console, redact, f"grader failed after {result.latency_s:.3f} s: the rollout would end as grader_failed (no reward)")
        _text(console, redact, result.error or "")
    else:
        _rule(console, redact, f"the learner receives reward {result.score} ({result.latency_s:.3f} s)")
    return result
