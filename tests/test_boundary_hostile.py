"""What tools, graders and judges send cannot end a run: hostile replies from real loopback
aiohttp servers (lone surrogates, out-of-range scores, 429s, terminal escapes, long error
bodies) and hostile paths and files for the FinQA tools."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from email.utils import formatdate
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pydantic import TypeAdapter, ValidationError

from rft_cluster.config import Grader, ToolSettings, ToolSpec
from rft_cluster.envs.finqa.corpus import generate_reports, write_corpus
from rft_cluster.envs.finqa.server import FinQAServers
from rft_cluster.envs.finqa.tools import FinQATools, ToolError
from rft_cluster.grader_actor import GraderActor
from rft_cluster.grpo import group_advantages
from rft_cluster.http import RETRY_AFTER_MAX_S, retry_after_s
from rft_cluster.serving import ThreadedServer
from rft_cluster.trajectory_store import TrajectoryStore
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.types import ToolCallStatus, ToolResult, Trajectory

FAST = ToolSettings(timeout_s=5.0, max_retries=2, backoff_s=0.01)
GRADER = TypeAdapter(Grader)
SAMPLE = {"output_text": "42", "output_json": 42, "output_tools": [], "choices": []}
ITEM = {"answer": 42}
# What a server emits when it cuts a string between the two halves of an emoji: valid JSON.
CUT_EMOJI = '"cut \\ud83d here"'
ESCAPES = ":x: [bold]b[/bold] \x1b[31mred\x1b[0m \u202eevil"
LONG = "e" * 5000


class Hostile:
    """A loopback server whose path picks the hostile reply; counts requests per path."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        self.url = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/{kind:.+}", self.handle)
        return app

    async def handle(self, request: web.Request) -> web.Response:
        kind = request.match_info["kind"]
        self.hits[kind] += 1
        raw = {
            "surrogate-tool": '{"output": ' + CUT_EMOJI + "}",
            "escape-tool": json.dumps({"output": ESCAPES}),
            "score-huge": '{"score": 1e308}',
            "score-two": '{"score": 2}',
            "deep-tool": "[" * 5000 + "]" * 5000,  # deeper than the JSON parser recurses
        }
        if kind in raw:
            return web.Response(text=raw[kind], content_type="application/json")
        if kind in ("long-404", "long-404/chat/completions"):
            return web.Response(status=404, text=LONG)
        if kind == "escape-400":
            return web.Response(status=400, text=ESCAPES)
        if kind == "429-seconds" and self.hits[kind] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        if kind == "429-date" and self.hits[kind] == 1:
            return web.Response(status=429, headers={"Retry-After": formatdate(time.time() + 2, usegmt=True)}, text="slow down")
        if kind == "429-grader" and self.hits[kind] == 1:
            return web.Response(status=429, headers={"Retry-After": "1"}, text="slow down")
        if kind == "429-always":
            return web.Response(status=429, headers={"Retry-After": "0"}, text="slow down")
        if kind == "429-grader":
            return web.json_response({"score": 1.0})
        return web.json_response({"output": "fine"})

    def at(self, kind: str) -> str:
        return f"{self.url}/{kind}"


@pytest.fixture(scope="module")
def hostile() -> Iterator[Hostile]:
    server = Hostile()
    with ThreadedServer(server.app()) as threaded:
        server.url = threaded.url
        yield server


async def call_tool(url: str, settings: ToolSettings = FAST) -> ToolResult:
    proxy = ToolProxy([ToolSpec(name="t", server_url=url)], settings)
    try:
        return await proxy.call("t", "{}", "call_1", "trace_1", ITEM)
    finally:
        await proxy.close()


async def grade(spec: dict[str, Any], settings: ToolSettings = FAST) -> Any:
    actor = GraderActor(GRADER.validate_python(spec), settings)
    try:
        return await actor.grade(SAMPLE, ITEM, "trace_1")
    finally:
        await actor.close()


def trajectory(tool_calls: list[ToolResult], grader_error: str | None = None) -> Trajectory:
    return Trajectory("trace_1", "p0", "g0", 1, [1, 2], [0, 1], [0.0, -0.5], [-1, 0], 1, "42", tool_calls, grader_error=grader_error)


# --- lone surrogates: replaced by U+FFFD where JSON from outside is decoded --------------------


async def test_lone_surrogate_from_a_tool_becomes_a_replacement_char_and_is_stored(hostile: Hostile, tmp_path: Path) -> None:
    result = await call_tool(hostile.at("surrogate-tool"))
    assert (result.status, result.output) == (ToolCallStatus.OK, "cut \ufffd here")
    store = TrajectoryStore(tmp_path)
    store.append([trajectory([result])])  # pyarrow refuses a lone surrogate outright
    assert store.read().column("tool_calls").to_pylist()[0][0]["output"] == "cut \ufffd here"


async def test_grader_error_holding_a_lone_surrogate_is_stored(tmp_path: Path) -> None:
    result = await grade({"type": "python", "name": "py", "source": "def grade(sample, item):\n    raise ValueError('cut \\ud83d')\n"})
    assert result.score is None and "cut \ufffd" in result.error
    TrajectoryStore(tmp_path).append([trajectory([], grader_error=result.error)])


async def test_json_too_deep_to_parse_is_a_bad_response_not_a_crash(hostile: Hostile) -> None:
    result = await call_tool(hostile.at("deep-tool"))  # before, RecursionError escaped the proxy's batch
    assert result.status is ToolCallStatus.BAD_RESPONSE and "string 'output'" in result.output


# --- scores: finite and inside score_range, or grader_failed ---------------------------------


@pytest.mark.parametrize("kind", ["score-huge", "score-two"])
async def test_endpoint_score_outside_score_range_is_a_grader_failure(hostile: Hostile, kind: str) -> None:
    result = await grade({"type": "endpoint", "name": "ep", "url": hostile.at(kind)})
    assert result.score is None and "outside score_range [0, 1]" in result.error


async def test_declared_score_range_admits_its_scores(hostile: Hostile) -> None:
    result = await grade({"type": "endpoint", "name": "ep", "url": hostile.at("score-two"), "score_range": [0, 2]})
    assert (result.score, result.error) == (2.0, None)


async def test_python_grader_score_outside_score_range_is_a_grader_failure() -> None:
    result = await grade({"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 1e308\n"})
    assert result.score is None and "1e+308" in result.error and "score_range" in result.error


async def test_multi_sub_grader_is_held_to_its_own_score_range(hostile: Hostile) -> None:
    spec = {"type": "multi", "name": "m", "calculate_output": "a / 1000",
            "graders": {"a": {"type": "endpoint", "name": "a", "url": hostile.at("score-two")}}}
    result = await grade(spec)
    assert result.score is None and "sub-grader 'a' failed" in result.error and "score_range" in result.error


@pytest.mark.parametrize("bounds", [[0, float("inf")], [1, 0], [0, 1e308]])
def test_score_range_must_be_a_finite_bounded_interval(bounds: list[float]) -> None:
    assert GRADER.validate_python({"type": "endpoint", "url": "http://127.0.0.1:9/", "score_range": [-1, 2]}).score_range == (-1, 2)
    with pytest.raises(ValidationError, match="score_range"):
        GRADER.validate_python({"type": "endpoint", "url": "http://127.0.0.1:9/", "score_range": bounds})


def test_advantages_refuse_a_non_finite_reward() -> None:
    # Before, a NaN reward silently made its whole group's advantages NaN.
    with pytest.raises(ValueError, match="rewards must be finite"):
        group_advantages([float("nan"), 1.0], ["g", "g"])


# --- one HTTP outcome wording and error cap for tools, endpoint graders and judges ---------------


async def test_http_failures_read_alike_for_tools_graders_and_judges(hostile: Hostile) -> None:
    quoted = "HTTP 404: " + "e" * 1000 + "…"
    tool = await call_tool(hostile.at("long-404"))
    assert (tool.status, tool.output) == (ToolCallStatus.CLIENT_ERROR, quoted)
    endpoint = await grade({"type": "endpoint", "name": "ep", "url": hostile.at("long-404")})
    assert endpoint.error == f"grader 'ep': {quoted}"
    judge = await grade({"type": "score_model", "name": "j", "model": "m", "base_url": hostile.at("long-404"),
                         "input": [{"role": "user", "content": "score it"}]})
    assert judge.error == f"grader 'j': judge: {quoted}"


# --- 429: waited out after Retry-After, never shown to the model ---------------------------------


@pytest.mark.parametrize("kind", ["429-seconds", "429-date"])
async def test_429_is_retried_after_retry_after_not_shown(hostile: Hostile, kind: str) -> None:
    result = await call_tool(hostile.at(kind))
    assert (result.status, result.output, result.attempts) == (ToolCallStatus.OK, "fine", 2)
    assert result.latency_s >= 0.9  # the server's wait, not backoff_s=0.01 (a floor: load only adds)


async def test_429_on_every_attempt_ends_the_rollout(hostile: Hostile) -> None:
    result = await call_tool(hostile.at("429-always"))
    assert result.status is ToolCallStatus.SERVER_ERROR and result.fatal
    assert result.output == "HTTP 429 (after 3 attempts)" and "slow down" not in result.output


async def test_429_from_a_grader_endpoint_is_retried(hostile: Hostile) -> None:
    result = await grade({"type": "endpoint", "name": "ep", "url": hostile.at("429-grader")})
    assert (result.score, result.error) == (1.0, None) and result.latency_s >= 0.9


def test_retry_after_forms_and_cap() -> None:
    assert retry_after_s("3") == 3.0
    assert retry_after_s(formatdate(time.time() - 100, usegmt=True)) == 0.0  # a date passed: no wait
    assert retry_after_s("86400") == retry_after_s(formatdate(time.time() + 86400, usegmt=True)) == RETRY_AFTER_MAX_S
    assert retry_after_s("soon") is retry_after_s("-1") is retry_after_s(None) is None  # the backoff applies


# --- tool-run and grader-run print what the model receives, as text --------------------------


def cli(tmp_path: Path, *args: str, tool_url: str = "http://127.0.0.1:9/", grader: dict[str, Any] | None = None) -> subprocess.CompletedProcess[str]:
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": 1}) + "\n")
    job = {"model": "some/model", "training_file": "train.jsonl", "method": {"type": "reinforcement", "reinforcement": {
        "tools": [{"name": "t", "server_url": tool_url}],
        "grader": grader or {"type": "string_check", "input": "{{sample.output_text}}", "reference": "1", "operation": "eq"}}}}
    (tmp_path / "job.json").write_text(json.dumps(job))
    # stdout is a pipe: strict UTF-8, like a terminal (rich would write a lone surrogate and fail).
    env = {**os.environ, "COLUMNS": "200", "PYTHONIOENCODING": "utf-8:strict", "TERM": "dumb"}
    return subprocess.run([sys.executable, "-m", "rft_cluster.cli", *args[:1], str(tmp_path / "job.json"), *args[1:]],
                          capture_output=True, text=True, env=env, timeout=120)


def test_tool_run_prints_a_lone_surrogate_reply(hostile: Hostile, tmp_path: Path) -> None:
    done = cli(tmp_path, "tool-run", "--tool", "t", "--arguments", "{}", tool_url=hostile.at("surrogate-tool"))
    assert done.returncode == 0, done.stderr
    assert "cut \ufffd here" in done.stdout and "Traceback" not in done.stderr


def test_tool_run_prints_escapes_and_markup_as_text(hostile: Hostile, tmp_path: Path) -> None:
    done = cli(tmp_path, "tool-run", "--tool", "t", "--arguments", "{}", tool_url=hostile.at("escape-tool"))
    assert done.returncode == 0, done.stderr
    shown = ":x: [bold]b[/bold] \\x1b[31mred\\x1b[0m \\u202eevil"
    assert shown in done.stdout and "\x1b" not in done.stdout and "\u202e" not in done.stdout and "❌" not in done.stdout


def test_grader_run_prints_an_error_body_as_text(hostile: Hostile, tmp_path: Path) -> None:
    done = cli(tmp_path, "grader-run", "--output-text", "1", grader={"type": "endpoint", "name": "ep", "url": hostile.at("escape-400")})
    assert "grader_failed" in done.stdout, done.stderr
    assert "HTTP 400: :x: [bold]b[/bold] \\x1b[31mred" in done.stdout and "\x1b" not in done.stdout and "❌" not in done.stdout


# --- the FinQA tools: a path the OS cannot take is a 4xx, odd corpus files are skipped -----------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = write_corpus(tmp_path_factory.mktemp("corpus"), generate_reports(0, n_companies=2, years=(2020,)))
    (root / "loop.txt").symlink_to("loop.txt")
    return root


@pytest.mark.parametrize("path", ["acme\x00.txt", "x" * 5000, "x/" * 3000, "loop.txt", None])
async def test_finqa_tools_answer_unusable_paths_with_4xx(corpus: Path, path: str | None) -> None:
    # None: arguments nested deeper than the JSON parser goes, as a model could write them.
    arguments = "[" * 5000 if path is None else json.dumps({"path": path})
    with FinQAServers(corpus, backend="bm25") as env:
        for name in ("cat", "list"):
            proxy = ToolProxy(env.tool_specs(), FAST)
            try:
                result = await proxy.call(name, arguments, "call_1", "trace_1", ITEM)
            finally:
                await proxy.close()
            assert result.status is ToolCallStatus.CLIENT_ERROR and result.http_status == 400, (name, result.output[:200])


def test_finqa_corpus_with_a_fifo_and_a_binary_file_serves_the_rest(corpus: Path, tmp_path: Path) -> None:
    root = write_corpus(tmp_path / "odd", generate_reports(0, n_companies=1, years=(2020,)))
    os.mkfifo(root / "pipe.txt")
    (root / "binary.txt").write_bytes(b"\xff\xfe\x00garbage")
    built: list[FinQATools] = []
    start = threading.Thread(target=lambda: built.append(FinQATools(root, backend="bm25")), daemon=True)
    start.start()
    start.join(timeout=60)  # before, opening the FIFO blocked here forever
    assert built, "FinQATools did not start within 60 s"
    tools = built[0]
    assert "pipe.txt" not in tools.paths and "binary.txt" not in tools.paths and len(tools.paths) == 4
    assert "no such report" in _tool_error(tools, "pipe.txt") and "not a text report" in _tool_error(tools, "binary.txt")


def _tool_error(tools: FinQATools, path: str) -> str:
    with pytest.raises(ToolError) as e:
        tools.cat(path)
    assert 400 <= e.value.status < 500
    return e.value.message
