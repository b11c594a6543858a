"""score_model: the judge's request, score parsing and range normalisation against a loopback
imitation of /chat/completions, and the whole path against a real vLLM OpenAI-compatible server
hosting the warm-started tiny model (a judge that scores, one whose reply holds no score, and an
unknown model)."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from rft_cluster.config import ScoreModelGrader
from rft_cluster.envs.ledger import SYSTEM_PROMPT
from rft_cluster.grader_actor import GraderActor
from rft_cluster.graders.score_model import parse_score
from tests.recording_server import RecordingServer
from tests.test_grader import FAST, ITEM, SAMPLE

PROMPT = [
    {"role": "system", "content": "You grade answers. Reply with only a number from 0 to 1."},
    {"role": "user", "content": "Reference: {{item.answer}}\nAnswer: {{sample.output_text}}"},
]
RENDERED = [
    {"role": "system", "content": "You grade answers. Reply with only a number from 0 to 1."},
    {"role": "user", "content": "Reference: 4521\nAnswer: The balance is 4521."},
]


def judge(base_url: str, **extra: Any) -> GraderActor:
    spec = ScoreModelGrader(type="score_model", name="judge", model="judge-model", input=PROMPT, base_url=base_url, **extra)
    return GraderActor(spec, FAST)


async def grade_once(actor: GraderActor):
    try:
        return await actor.grade(SAMPLE, ITEM, "trace_1")
    finally:
        await actor.close()


# --- parsing rules -------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("reply", "score"),
    [
        ("0.7", 0.7),
        ('{"score": 4}', 4.0),
        ('{"result": 0.9, "steps": [{"description": "matches"}]}', 0.9),
        ('Reasoning... ```json\n{"steps": [{"d": 1}], "result": 0.25}\n```', 0.25),
        ('first {"score": 1} then {"score": 3}', 3.0),
        ('{"score": "high"} but really 0.3', 0.3),
        ("Score: 7", 7.0),
        ("The answer is wrong.", None),
        ("", None),
        ("true", None),
        ('{"score": NaN}', None),
    ],
)
def test_parse_score(reply: str, score: float | None) -> None:
    assert parse_score(reply) == score


# --- loopback imitation of /chat/completions -----------------------------------------------------


class FakeJudge(RecordingServer):
    """Answers each POST with the next of `replies` (HTTP status, message content or a raw body),
    the last repeating."""

    def __init__(self) -> None:
        super().__init__()
        self.replies: list[tuple[int, str | None]] = []

    @property
    def base_url(self) -> str:
        return self.url("/v1")

    async def answer(self, request: web.Request, body: Any) -> web.Response:
        status, content = self.replies.pop(0) if len(self.replies) > 1 else self.replies[0]
        if status != 200:
            return web.Response(status=status, text=content or "")
        reply = {"object": "chat.completion", "choices": [{"index": 0, "message": {"role": "assistant", "content": content}}]}
        return web.json_response(reply)


@pytest_asyncio.fixture(loop_scope="function")
async def fake() -> AsyncIterator[FakeJudge]:
    async with FakeJudge().serving() as judge_server:
        yield judge_server


async def test_request_shape(fake: FakeJudge) -> None:
    fake.replies = [(200, "1")]
    params = {"temperature": 0.0, "seed": 7, "max_completions_tokens": 32}
    result = await grade_once(judge(fake.base_url + "/", sampling_params=params, headers={"Authorization": "Bearer j-secret"}))
    assert (result.score, result.error) == (1.0, None)
    [(path, headers, body)] = [(r.path, r.headers, r.body) for r in fake.requests]
    assert path == "/v1/chat/completions" and headers["Authorization"] == "Bearer j-secret"
    # OpenAI's `max_completions_tokens` goes out under its Chat Completions name; unset params stay out.
    assert body == {"model": "judge-model", "messages": RENDERED, "temperature": 0.0, "seed": 7, "max_completion_tokens": 32}


@pytest.mark.parametrize(
    ("content", "low", "high", "expected"),
    [
        ("7", 0, 10, 0.7),
        ('{"score": 2.5}', 0, 10, 0.25),
        ('Looks right. {"result": 10}', 0, 10, 1.0),
        ("I would give it a 4", 0, 10, 0.4),
        ("0", -1, 1, 0.5),
        ("1", 1, 5, 0.0),
    ],
)
async def test_score_is_normalised_by_range(fake: FakeJudge, content: str, low: float, high: float, expected: float) -> None:
    fake.replies = [(200, content)]
    result = await grade_once(judge(fake.base_url, range=(low, high)))
    assert (result.score, result.error) == (pytest.approx(expected), None)


@pytest.mark.parametrize(
    ("replies", "message"),
    [
        ([(200, "11")], "judge score 11 is outside range [0, 10]; the judge replied: '11'"),
        ([(200, "-0.5")], "judge score -0.5 is outside range [0, 10]"),
        ([(200, "Excellent answer!")], "no score in the judge's reply: 'Excellent answer!'"),
        ([(200, None)], "no choices[0].message.content text"),
        ([(400, "max_completion_tokens too large")], "judge: HTTP 400: max_completion_tokens too large"),
        ([(503, "overloaded")], "judge: HTTP 503 (after 3 attempts)"),
    ],
    ids=["above-range", "below-range", "no-number", "no-content", "4xx", "5xx-every-retry"],
)
async def test_bad_judgements_are_failures_naming_what_the_judge_said(
    fake: FakeJudge, replies: list[tuple[int, str | None]], message: str
) -> None:
    fake.replies = replies
    result = await grade_once(judge(fake.base_url, range=(0, 10)))
    assert result.score is None and result.error.startswith("grader 'judge': ") and message in result.error


async def test_5xx_is_retried(fake: FakeJudge) -> None:
    fake.replies = [(502, "bad gateway"), (200, "0.5")]
    result = await grade_once(judge(fake.base_url))
    assert (result.score, len(fake.requests)) == (0.5, 2)


def test_sampling_params_accept_both_spellings_and_range_must_be_an_interval() -> None:
    spec = ScoreModelGrader.model_validate(
        {"type": "score_model", "model": "m", "input": PROMPT, "base_url": "http://x/v1", "sampling_params": {"max_completion_tokens": 9}}
    )
    assert spec.sampling_params.max_completions_tokens == 9
    with pytest.raises(ValueError, match="range must be"):
        ScoreModelGrader(type="score_model", model="m", input=PROMPT, base_url="http://x/v1", range=(1, 1))


# --- a real vLLM OpenAI-compatible server --------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def vllm_server(warm_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """vLLM's OpenAI-compatible server on the warm-started tiny model, in its own process group so anything it
    spawns goes down with it. Eager mode (no compile) with the engine and its worker inside the
    server process: it starts about twice as fast on two cores as the multi-process default."""
    port = _free_port()
    log_path = tmp_path_factory.mktemp("vllm") / "server.log"
    cmd = [
        sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(warm_model_dir),
        "--served-model-name", "tiny-judge", "--host", "127.0.0.1", "--port", str(port),
        "--dtype", "float32", "--max-model-len", "2048", "--enforce-eager", "--distributed-executor-backend", "uni",
    ]  # fmt: skip
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_ENABLE_V1_MULTIPROCESSING": "0"}
    with open(log_path, "wb") as log:
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env)
    try:
        deadline = time.monotonic() + 300
        while True:
            if server.poll() is not None:
                pytest.fail(f"vLLM server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
            if time.monotonic() > deadline:
                pytest.fail(f"vLLM server not healthy after 300 s:\n{log_path.read_text()[-3000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                time.sleep(1)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        _signal_group(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            _signal_group(server.pid, signal.SIGKILL)
            server.wait()


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:  # the server already exited (and was reported)
        pass


GREEDY = {"temperature": 0.0, "seed": 0, "max_completions_tokens": 16}


async def judge_reply(vllm_server: str, messages: list[dict[str, str]]) -> str:
    """The judge's greedy reply, fetched without the grader (what its result must carry)."""
    async with aiohttp.ClientSession() as session:
        request = {"model": "tiny-judge", "messages": messages, "temperature": 0.0, "seed": 0, "max_completion_tokens": 16}
        async with session.post(vllm_server + "/chat/completions", json=request) as resp:
            assert resp.status == 200
            return (await resp.json())["choices"][0]["message"]["content"]


# The ledger conversation the warm start learned, up to the tool's answer: the judge's reply
# reads the balance back ("The balance of ACC-0137 is 4521."), a number the grader must find.
LEDGER_JUDGE = [
    {"role": "system", "content": SYSTEM_PROMPT},
    {"role": "user", "content": "What is the balance of account {{item.account}}? Use the lookup tool, then answer with the number."},
    {"role": "assistant", "content": '<tool_call>\n{"name": "lookup", "arguments": {"account": "{{item.account}}"}}\n</tool_call>'},
    {"role": "user", "content": "<tool_response>\n{{item.account}} balance: {{item.answer}}\n</tool_response>"},
]


@pytest.mark.slow
async def test_real_vllm_judge_score_is_parsed_and_normalised(vllm_server: str) -> None:
    """The success path end to end: the rendered prompt reaches vLLM, the warm model's reply
    carries the item's balance, and that number, normalised by `range`, is the score."""
    rendered = [{**m, "content": m["content"].replace("{{item.account}}", ITEM["account"]).replace("{{item.answer}}", str(ITEM["answer"]))} for m in LEDGER_JUDGE]
    reply = await judge_reply(vllm_server, rendered)
    assert parse_score(reply) == 4521, f"the warm model no longer reads the balance back ({reply!r}): pick another prompt"
    spec = ScoreModelGrader(type="score_model", name="judge", model="tiny-judge", input=LEDGER_JUDGE, base_url=vllm_server,
                            sampling_params=GREEDY, range=(0, 10_000))
    result = await grade_once(GraderActor(spec, FAST.model_copy(update={"timeout_s": 60.0})))
    assert (result.score, result.error) == (pytest.approx(0.4521), None)


@pytest.mark.slow
async def test_real_vllm_judge_reply_without_a_score_is_a_recorded_failure(vllm_server: str) -> None:
    """vLLM accepts the grader's request (a 200 with a completion), and the model's reply to a
    prompt unlike its warm start, which holds no score, becomes a failure quoting it exactly."""
    reply = await judge_reply(vllm_server, RENDERED)
    assert parse_score(reply) is None, f"the judge model now emits a number ({reply!r}): pick another prompt"
    spec = ScoreModelGrader(type="score_model", name="judge", model="tiny-judge", input=PROMPT, base_url=vllm_server, sampling_params=GREEDY)
    result = await grade_once(GraderActor(spec, FAST.model_copy(update={"timeout_s": 60.0})))
    assert result.score is None
    assert result.error == f"grader 'judge': no score in the judge's reply: {reply!r}"


@pytest.mark.slow
async def test_real_vllm_unknown_model_is_a_failure_naming_it(vllm_server: str) -> None:
    spec = ScoreModelGrader(type="score_model", name="judge", model="no-such-judge", input=PROMPT, base_url=vllm_server)
    result = await grade_once(GraderActor(spec, FAST))
    assert result.score is None and "judge: HTTP 404" in result.error and "no-such-judge" in result.error
