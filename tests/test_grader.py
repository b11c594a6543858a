"""GraderActor: endpoint graders against a real loopback server, string_check, templates."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
import ray
from aiohttp import web

from rft_cluster.config import EndpointGrader, StringCheckGrader, ToolSettings
from rft_cluster.envs.ledger import LedgerServers
from rft_cluster.grader_actor import GraderActor, TemplateError, render_template
from tests.recording_server import RecordingServer

FAST = ToolSettings(timeout_s=1.0, max_retries=2, backoff_s=0.01)
SAMPLE = {
    "output_text": "The balance is 4521.",
    "output_json": None,
    "output_tools": [{"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}],
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "The balance is 4521."}}],
}
ITEM = {"account": "ACC-0137", "answer": 4521, "meta": {"unit": "USD", "tags": ["a", "b"]}}


class GraderServer(RecordingServer):
    """Answers with `replies` (HTTP status, body text) in order, the last one repeating."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[tuple[int, str]] = []

    async def answer(self, request: web.Request, body: Any) -> web.Response:
        status, text = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if status == 0:  # hang well past the client's timeout
            await asyncio.sleep(float(text))
        return web.Response(status=status, text=text, content_type="application/json")


@pytest_asyncio.fixture(loop_scope="function")
async def server() -> AsyncIterator[GraderServer]:
    async with GraderServer().serving() as grader:
        yield grader


def endpoint(server: GraderServer, **extra: Any) -> GraderActor:
    spec = EndpointGrader(type="endpoint", url=server.url("/grade"), headers={"Authorization": "Bearer g-secret"}, **extra)
    return GraderActor(spec, FAST)


async def test_endpoint_gets_sample_item_trace_id_and_headers(server: GraderServer) -> None:
    server.replies = [(200, '{"score": 0.75}')]
    grader = endpoint(server)
    result = await grader.grade(SAMPLE, ITEM, "trace_42")
    await grader.close()
    assert (result.score, result.error) == (0.75, None)
    assert result.latency_s > 0
    [(_, headers, body)] = [(r.path, r.headers, r.body) for r in server.requests]
    assert body == {"sample": SAMPLE, "item": ITEM, "trace_id": "trace_42"}
    assert headers["Authorization"] == "Bearer g-secret"


async def test_endpoint_retries_a_5xx(server: GraderServer) -> None:
    server.replies = [(500, "boom"), (200, '{"score": 1}')]
    grader = endpoint(server)
    result = await grader.grade(SAMPLE, ITEM, "t")
    await grader.close()
    assert (result.score, result.error) == (1.0, None)
    assert len(server.requests) == 2


async def test_endpoint_failing_every_retry_is_a_failure_not_zero(server: GraderServer) -> None:
    server.replies = [(502, "bad gateway")]
    grader = endpoint(server)
    result = await grader.grade(SAMPLE, ITEM, "t")
    await grader.close()
    assert result.score is None
    assert "HTTP 502" in result.error and "3 attempts" in result.error
    assert len(server.requests) == 3


async def test_endpoint_that_hangs_times_out_as_a_failure_not_a_hang(server: GraderServer) -> None:
    server.replies = [(0, "30")]
    grader = endpoint(server)
    started = time.monotonic()
    result = await grader.grade(SAMPLE, ITEM, "t")
    await grader.close()
    assert result.score is None and "no complete response within 1.0s" in result.error
    assert len(server.requests) == FAST.max_retries + 1
    # Each attempt is cut at timeout_s: far sooner than the 30 s the endpoint would hang (the
    # margin is for a loaded machine, not a measure of overhead).
    assert time.monotonic() - started < 15


async def test_endpoint_4xx_is_a_failure_without_retry(server: GraderServer) -> None:
    server.replies = [(422, "sample has no output")]
    grader = endpoint(server)
    result = await grader.grade(SAMPLE, ITEM, "t")
    await grader.close()
    assert result.score is None and "HTTP 422: sample has no output" in result.error
    assert len(server.requests) == 1


@pytest.mark.parametrize(
    "reply",
    ['{"score": "high"}', '{"score": true}', '{"grade": 1.0}', "[1.0]", '{"score": NaN}', "1.0", "<html>oops</html>"],
    ids=["string", "bool", "no-score", "list", "nan", "bare-number", "html"],
)
async def test_endpoint_garbage_score_is_a_failure(server: GraderServer, reply: str) -> None:
    server.replies = [(200, reply)]
    grader = endpoint(server)
    result = await grader.grade(SAMPLE, ITEM, "t")
    await grader.close()
    assert result.score is None and "'score'" in result.error


async def test_endpoint_rate_limit_spaces_requests(server: GraderServer) -> None:
    server.replies = [(200, '{"score": 0.0}')]
    grader = endpoint(server, rate_limit=600)  # one request per 0.1 s
    started = time.monotonic()
    results = await asyncio.gather(*(grader.grade(SAMPLE, ITEM, f"t{i}") for i in range(4)))
    elapsed = time.monotonic() - started
    await grader.close()
    assert [r.score for r in results] == [0.0] * 4
    assert elapsed >= 0.3  # 4 requests at most one per 0.1 s: 3 gaps (load only lengthens them)


@pytest.mark.parametrize(
    ("operation", "output_text", "expected"),
    [
        ("eq", "4521", 1.0),
        ("eq", "4521 ", 0.0),
        ("ne", "4521", 0.0),
        ("ne", "4520", 1.0),
        ("like", "The balance is 4521.", 1.0),
        ("like", "The balance is 4,521.", 0.0),
        ("ilike", "PARIS is the capital", 1.0),
        ("like", "PARIS is the capital", 0.0),
    ],
)
async def test_string_check_operations(operation: str, output_text: str, expected: float) -> None:
    reference = "paris" if "PARIS" in output_text else "{{item.answer}}"
    spec = StringCheckGrader(type="string_check", input="{{sample.output_text}}", reference=reference, operation=operation)
    result = await GraderActor(spec, FAST).grade({**SAMPLE, "output_text": output_text}, ITEM, "t")
    assert (result.score, result.error) == (expected, None)


async def test_string_check_with_missing_key_fails_naming_it() -> None:
    spec = StringCheckGrader(type="string_check", input="{{sample.output_text}}", reference="{{item.expected}}")
    result = await GraderActor(spec, FAST).grade(SAMPLE, ITEM, "t")
    assert result.score is None and "expected" in result.error


def test_render_template() -> None:
    assert render_template("{{item.account}}: {{ item.answer }}", SAMPLE, ITEM) == "ACC-0137: 4521"
    assert render_template("{{item.meta.unit}}/{{item.meta.tags.1}}", SAMPLE, ITEM) == "USD/b"
    assert render_template("{{item.meta.tags}}", SAMPLE, ITEM) == '["a", "b"]'
    assert render_template("{{sample.choices.0.message.content}}", SAMPLE, ITEM) == "The balance is 4521."
    assert render_template("no placeholders", SAMPLE, ITEM) == "no placeholders"


@pytest.mark.parametrize(
    ("template", "named"),
    [("{{item.meta.currency}}", "'currency'"), ("{{item.meta.tags.5}}", "'5'"), ("{{answer}}", "'answer'")],
)
def test_render_template_errors_name_the_missing_key(template: str, named: str) -> None:
    with pytest.raises(TemplateError, match=named):
        render_template(template, SAMPLE, ITEM)


def test_grader_as_ray_actor_against_ledger(ray_local: None) -> None:
    with LedgerServers(seed=3) as env:
        account, balance = next(iter(env.ledger.items()))
        item = {"account": account, "answer": balance}
        actor = ray.remote(GraderActor).remote(env.grader_spec(), FAST)
        right, wrong = ray.get(
            [
                actor.grade.remote({**SAMPLE, "output_text": f"It is {balance}."}, item, "trace_right"),
                actor.grade.remote({**SAMPLE, "output_text": f"{balance}? No: {balance + 1}"}, item, "trace_wrong"),
            ]
        )
        ray.get(actor.close.remote())
        ray.kill(actor)
        seen = env.grades("trace_right")
    assert (right.score, wrong.score) == (1.0, 0.0)
    assert [g["score"] for g in seen] == [1.0]
