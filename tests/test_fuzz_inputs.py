"""Property-based fuzzing (hypothesis) of what users and their endpoints send: job files, dataset
rows, tool replies and grader replies, through `validate`, `tool-run` and `grader-run` against
real loopback aiohttp servers. Whatever the input: no traceback, a defined exit code or status,
bounded time and output, and the planted secret (a `${VAR}`'s value, and the Basic-auth form of
URL credentials holding it) never appears in anything printed or returned. Example counts are
fixed and small so the whole file runs in about a minute on two cores."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import math
import os
import resource
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from rich.console import Console

from rft_cluster.cli import main
from rft_cluster.config import load_job
from rft_cluster.dataset import MAX_PROBLEMS_PER_FILE, check_dataset, check_job_and_data
from rft_cluster.http import RETRY_AFTER_MAX_S, retry_after_s
from rft_cluster.serving import ThreadedServer
from rft_cluster.tryout import grader_run, tool_run
from rft_cluster.types import ToolCallStatus

SECRET = "fz-Secret-7Q2w9E4r1T6y"
BASIC = base64.b64encode(f"bob:{SECRET}".encode()).decode()
LEAKS = (SECRET, SECRET.lower(), BASIC, SECRET[:10], BASIC[:16])
ROW = {"messages": [{"role": "user", "content": "hi"}], "answer": "1"}
FUZZ = settings(max_examples=60, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])


def no_leak(text: str) -> None:
    for leaked in LEAKS:
        assert leaked not in text, leaked


@pytest.fixture(autouse=True)
def secret_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_FUZZ_SECRET", SECRET)


# --- job files ------------------------------------------------------------------------------

# Values a hostile or careless job holds: text with variables and escapes, odd numbers, URLs.
_text = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
_scalars = st.one_of(
    _text, st.integers(min_value=-(2**70), max_value=2**70), st.floats(allow_nan=True, allow_infinity=True), st.booleans(), st.none(),
    st.sampled_from(["${RFT_FUZZ_SECRET}", "$${x}", "${", "$RFT_FUZZ_SECRET", "http://bob:${RFT_FUZZ_SECRET}@a..b/", "team/proj",
                     "nosuchscheme://x", "g0 / 0", "g0 * 1e999", "2", "http://h/\n", "data/${RFT_FUZZ_SECRET}/x.jsonl"]),
)
_values = st.recursive(_scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(_text, inner, max_size=4), max_leaves=20)
# Where a value is planted: each a key path into a valid job.
_PLACES = [("model",), ("training_file",), ("storage",), ("suffix",), ("wandb", "project"), ("metadata", "k"),
           ("method", "reinforcement", "response_format"), ("method", "reinforcement", "grader", "reference"),
           ("method", "reinforcement", "grader", "calculate_output"), ("method", "reinforcement", "grader", "pass_threshold"),
           ("method", "reinforcement", "tools", 0, "server_url"), ("method", "reinforcement", "tools", 0, "headers"),
           ("method", "reinforcement", "hyperparameters", "batch_size"), ("cluster", "engine", "max_model_len")]


def base_job() -> dict[str, Any]:
    return {"model": "m", "training_file": "train.jsonl", "method": {"type": "reinforcement", "reinforcement": {
        "tools": [{"name": "t", "server_url": "http://127.0.0.1:9/tool", "headers": {"Authorization": "Bearer ${RFT_FUZZ_SECRET}"}}],
        "grader": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}}}}


def plant(job: dict[str, Any], place: tuple, value: Any) -> dict[str, Any]:
    node = job
    for key in place[:-1]:
        node = node[key] if isinstance(node, list) else node.setdefault(key, {})
    node[place[-1]] = value
    return job


def assert_located(lines: list[str], directory: Path) -> None:
    for line in lines:
        assert line.startswith(str(directory)), line
        assert "Traceback" not in line and "object at 0x" not in line.replace("<ast.", ""), line
        no_leak(line)


@FUZZ
@given(st.lists(st.tuples(st.sampled_from(_PLACES), _values), min_size=1, max_size=3), st.booleans())
def test_a_fuzzed_job_file_is_refused_in_located_lines_or_valid(tmp_path: Path, planted: list, as_json: bool) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    job = base_job()
    for place, value in planted:
        plant(job, place, value)
    path = tmp_path / ("job.json" if as_json else "job.yaml")
    try:
        text = json.dumps(job, allow_nan=as_json)
    except ValueError:
        return
    path.write_text(text)  # JSON is YAML: the YAML reader gets the same document
    started = time.monotonic()
    problems, warnings = check_job_and_data(path)
    assert time.monotonic() - started < 20
    assert_located(problems + warnings, tmp_path)


@settings(max_examples=40, deadline=None, database=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.binary(max_size=2000) | st.text(max_size=2000).map(str.encode))
def test_fuzzed_job_file_bytes_never_raise(tmp_path: Path, raw: bytes) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    for name in ("job.yaml", "job.json"):
        (tmp_path / name).write_bytes(raw)
        problems, warnings = check_job_and_data(tmp_path / name)
        assert_located(problems + warnings, tmp_path)


def _limit_memory() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (3 * 2**30, 3 * 2**30))


def test_the_cli_bounds_memory_and_exits_1_on_expansion_bombs(tmp_path: Path) -> None:
    """The shapes that once took gigabytes, through the real CLI under a 3 GiB address-space cap."""
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    bombs = {
        "var-alias.yaml": 'a: &a "${RFT_FUZZ_BIG}"\nb: &b [' + ",".join(["*a"] * 300) + "]\nc: [" + ",".join(["*b"] * 300) + "]\n",
        "bare-alias.yaml": 'a: &a "' + "$x " * 1000 + '"\nb: &b [' + ",".join(["*a"] * 300) + "]\nc: [" + ",".join(["*b"] * 300) + "]\n",
        "values.json": '{"model": [' + ",".join(["[]"] * 900_000) + "]}",
        "row.yaml": json.dumps({**base_job(), "training_file": "big.jsonl"}),
    }
    with (tmp_path / "big.jsonl").open("wb") as f:
        f.write(b'{"messages": "' + b"x" * 2**27 + b'"}\n')
    env = {**os.environ, "RFT_FUZZ_SECRET": SECRET, "RFT_FUZZ_BIG": "y" * 100_000}
    for name, text in bombs.items():
        (tmp_path / name).write_text(text)
        started = time.monotonic()
        done = subprocess.run([sys.executable, "-m", "rft_cluster.cli", "validate", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=120, env=env, preexec_fn=_limit_memory, check=False)
        assert time.monotonic() - started < 60, name
        assert done.returncode == 1 and "Traceback" not in done.stderr, (name, done.stderr[-2000:])
        assert len(done.stderr.splitlines()) <= 5, (name, done.stderr[:2000])
        no_leak(done.stdout + done.stderr)


# --- dataset rows ----------------------------------------------------------------------------

_json = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
                     lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=10), inner, max_size=5), max_leaves=30)
_message = st.fixed_dictionaries({"role": st.sampled_from(["user", "assistant", "tool", "system", "bot", 7])},
                                 optional={"content": _json, "tool_calls": _json, "tool_call_id": _json, "name": _json})
_row = st.fixed_dictionaries({"messages": st.lists(_message, max_size=6) | _json}, optional={"tools": _json, "answer": _json})
_line = st.one_of(_row.map(json.dumps).map(str.encode), st.binary(max_size=200), _json.map(json.dumps).map(str.encode),
                  st.just(f'{{"messages": [{{"role": "user", "content": "{SECRET}"}}], "answer": "${{RFT_FUZZ_SECRET}}"}}'.encode()))


@FUZZ
@given(st.lists(_line, min_size=1, max_size=30), st.sampled_from([b"", b"\xef\xbb\xbf", b"\xff\xfe"]))
def test_fuzzed_dataset_rows_give_bounded_located_problems(tmp_path: Path, lines: list[bytes], prefix: bytes) -> None:
    path = tmp_path / "data.jsonl"
    path.write_bytes(prefix + b"\n".join(lines) + b"\n")
    problems = check_dataset(path)
    assert len(problems) <= MAX_PROBLEMS_PER_FILE + 2
    for problem in problems:
        assert problem.startswith((f"{path}:", f"{path} ")), problem
        assert SECRET not in problem  # a row's own text is never quoted back


# --- tool and grader replies from a real loopback server --------------------------------------


class Scripted:
    """Answers every POST with the current script; `{auth}` in a body becomes the request's
    Authorization header (an endpoint echoing what it got), `{secret}` the secret itself."""

    def __init__(self) -> None:
        self.status, self.body, self.headers = 200, b"{}", {}

    async def handle(self, request: web.Request) -> web.Response:
        body = self.body.replace(b"{auth}", request.headers.get("Authorization", "").encode()).replace(b"{secret}", SECRET.encode())
        return web.Response(status=self.status, body=body, headers=self.headers, content_type="application/json")


@pytest.fixture(scope="module")
def scripted() -> Iterator[tuple[Scripted, str]]:
    server = Scripted()
    app = web.Application()
    app.router.add_post("/{path:.*}", server.handle)
    with ThreadedServer(app) as threaded:
        yield server, threaded.url


_junk_header = st.text(alphabet=st.characters(codec="latin-1", exclude_characters="\r\n\x00"), max_size=30)
_body = st.one_of(
    _json.map(lambda v: json.dumps({"output": v, "score": v})),
    st.floats().map(lambda f: f'{{"score": {json.dumps(f)}, "output": "x"}}'),
    st.sampled_from(["[" * 5000, "9" * 5000, '{"output": "\\ud83d"}', '{"score": 1e999}', '{"score": NaN}', '{"output": "{auth}"}',
                     "e" * 990 + "{secret}" + "e" * 20, "e" * 995 + "{auth}", '{"score": "{auth}"}']),
    st.text(max_size=300),
)


def job_file(tmp_path: Path, url: str) -> Path:
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    job = {"model": "m", "training_file": "train.jsonl", "method": {"type": "reinforcement", "reinforcement": {
        "tools": [{"name": "t", "server_url": url.replace("http://", "http://bob:${RFT_FUZZ_SECRET}@") + "/tool"}],
        "grader": {"type": "endpoint", "url": url + "/grade", "headers": {"Authorization": "Bearer ${RFT_FUZZ_SECRET}"}},
        "tool_settings": {"timeout_s": 5, "max_retries": 0}}}}
    path = tmp_path / "job.json"
    path.write_text(json.dumps(job))
    return path


@FUZZ
@given(st.sampled_from([200, 201, 204, 301, 400, 401, 404, 413, 429, 500, 503]), _body, _junk_header,
       st.text(max_size=50) | st.just("not json") | st.just('{"a": 1}'))
def test_fuzzed_replies_through_tool_run_and_grader_run(tmp_path: Path, scripted: tuple[Scripted, str], status: int, body: str,
                                                        retry_after: str, arguments: str) -> None:
    server, url = scripted
    server.status, server.body, server.headers = status, body.encode("utf-8", "surrogatepass"), {"Retry-After": retry_after}
    job = load_job(job_file(tmp_path, url))
    out = io.StringIO()
    console = Console(file=out, width=200, color_system=None)
    started = time.monotonic()
    tool = asyncio.run(tool_run(job, "t", arguments, 0, console))
    grade = asyncio.run(grader_run(job, body[:200], 0, console))
    assert time.monotonic() - started < 30
    assert isinstance(tool.status, ToolCallStatus)
    assert grade.score is None or (math.isfinite(grade.score) and 0 <= grade.score <= 1)
    for text in (out.getvalue(), tool.output, grade.error or ""):
        no_leak(text)


@settings(max_examples=300, deadline=None, database=None)
@given(st.text(max_size=60) | st.integers(min_value=0).map(str))
def test_any_retry_after_is_a_bounded_wait_or_the_backoff(value: str) -> None:
    wait = retry_after_s(value)
    assert wait is None or 0 <= wait <= RETRY_AFTER_MAX_S


def test_the_cli_tool_run_exits_with_a_defined_code_on_malformed_arguments(tmp_path: Path, scripted: tuple[Scripted, str],
                                                                           capsys: pytest.CaptureFixture) -> None:
    server, url = scripted
    server.status, server.body, server.headers = 200, b'{"output": "fine"}', {}
    path = job_file(tmp_path, url)
    assert main(["tool-run", str(path), "--tool", "t", "--arguments", "{}"]) == 0
    assert main(["tool-run", str(path), "--tool", "t", "--arguments", "[1"]) == 1
    no_leak(capsys.readouterr().out)
