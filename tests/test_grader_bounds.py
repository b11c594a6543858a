"""Issue 24, run-time classes 1, 2 and 4 without a cluster: degenerate answers are not JSON (and
never raise), everything sent to an endpoint is strict JSON, scores at score_range's ends are
judged up to float rounding, numpy scalars are scores, hostile text is scored in bounded time, and
every tool call and grade ends by its deadline (rollout_timeout_s), Retry-After included."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from aiohttp import web
from pydantic import TypeAdapter

from rft_cluster.config import Grader, Reinforcement, ToolSettings, ToolSpec, request_schedule_s
from rft_cluster.grader_actor import GraderActor, deadlines
from rft_cluster.graders.base import finite_number, in_range
from rft_cluster.graders.score_model import parse_score
from rft_cluster.graders.text_similarity import METRICS
from rft_cluster.metrics import StepPrinter, grader_warning, rollout_metrics
from rft_cluster.precheck import summarize, verdict
from rft_cluster.serving import ThreadedServer
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.trajectory_store import TrajectoryStore
from rft_cluster.types import RolloutStatus, ToolCallStatus, Trajectory, grader_sample

GRADER = TypeAdapter(Grader)
FAST = ToolSettings(timeout_s=5, max_retries=0)
DEGENERATE = ["[" * 5000, "1" * 5000, "-" + "9" * 4301, "NaN", "1e999", "-Infinity", '{"a": NaN}', "[" * 101 + "]" * 101]


def _reject(name: str) -> Any:
    raise AssertionError(f"{name} is not JSON")


def strict_loads(body: bytes) -> Any:
    return json.loads(body, parse_constant=_reject)


@pytest.mark.parametrize("answer", DEGENERATE, ids=range(len(DEGENERATE)))
def test_a_degenerate_answer_is_text_not_json(answer: str) -> None:
    sample = grader_sample(answer, [])
    assert sample["output_json"] is None and sample["output_text"] == answer
    assert grader_sample('{"a": [1, 2.5]}', [])["output_json"] == {"a": [1, 2.5]}


class Recorder:
    """An endpoint on 127.0.0.1 that keeps every body it was sent and answers `reply`."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []
        self.reply: web.Response | None = None

    async def handle(self, request: web.Request) -> web.Response:
        self.bodies.append(await request.read())
        return self.reply or web.json_response({"score": 1.0, "output": "fine"})


@pytest.fixture
def recorder() -> Iterator[tuple[Recorder, str]]:
    rec = Recorder()
    app = web.Application()
    app.router.add_post("/{path}", rec.handle)
    with ThreadedServer(app) as server:
        yield rec, server.url


def test_endpoint_grader_and_tool_bodies_are_strict_json(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    item = {"x": float("nan"), "y": [float("inf"), 1.5], "z": "ok"}

    async def go() -> None:
        actor = GraderActor(GRADER.validate_python({"type": "endpoint", "url": f"{url}/grade"}), FAST)
        proxy = ToolProxy([ToolSpec(name="t", server_url=f"{url}/tool")], FAST)
        try:
            for answer in ("NaN", "1e999", "[" * 5000):
                assert (await actor.grade(grader_sample(answer, []), item, "trace_1")).score == 1.0
            assert (await proxy.call("t", "{}", "call_1", "trace_1", item)).status == ToolCallStatus.OK
        finally:
            await actor.close()
            await proxy.close()

    asyncio.run(go())
    assert len(rec.bodies) == 4
    for body in rec.bodies:
        sent = strict_loads(body)
        assert sent["item"] == {"x": None, "y": [None, 1.5], "z": "ok"}  # non-finite numbers go as null
    assert [strict_loads(b)["sample"]["output_json"] for b in rec.bodies[:3]] == [None, None, None]


async def _grade(spec: dict[str, Any], sample: dict[str, Any] | None = None) -> Any:
    actor = GraderActor(GRADER.validate_python(spec), FAST)
    try:
        return await actor.grade(sample or grader_sample("yes", []), {}, "trace_1")
    finally:
        await actor.close()


def _check(name: str) -> dict[str, Any]:
    return {"type": "string_check", "name": name, "input": "{{sample.output_text}}", "reference": "yes", "operation": "eq"}


def test_weights_summing_to_one_give_a_perfect_rollout_a_perfect_score() -> None:
    spec = {"type": "multi", "graders": {f"g{i}": _check(f"g{i}") for i in range(4)}, "calculate_output": "0.4*g0+0.2*g1+0.3*g2+0.1*g3"}
    assert 0.4 + 0.2 + 0.3 + 0.1 > 1.0  # the float rounding this is about
    result = asyncio.run(_grade(spec))
    assert result.error is None and result.score == 1.0


def test_an_endpoints_score_a_rounding_step_past_the_range_is_clamped(recorder: tuple[Recorder, str]) -> None:
    rec, url = recorder
    spec = {"type": "endpoint", "url": f"{url}/grade"}
    rec.reply = web.Response(text='{"score": 1.0000000000000002}', content_type="application/json")
    assert asyncio.run(_grade(spec)).score == 1.0
    rec.reply = web.Response(text='{"score": 1.000001}', content_type="application/json")  # beyond rounding: a wrong score
    result = asyncio.run(_grade(spec))
    assert result.score is None and "outside score_range" in result.error


@pytest.mark.parametrize(("value", "expected"), [
    (np.float32(0.5), 0.5), (np.float64(0.25), 0.25), (np.int64(1), 1.0), (np.bool_(True), None), (True, None),
    (np.float32("nan"), None), (10**400, None), ("0.5", None),
])
def test_numpy_scalars_are_numbers(value: Any, expected: float | None) -> None:
    assert finite_number(value) == expected


def test_a_python_grader_may_return_a_numpy_scalar_or_a_huge_int() -> None:
    source = ("import numpy as np\ndef grade(sample, item):\n"
              "    return {'yes': np.float32(0.5), 'int': np.int64(1), 'huge': 10**5000, 'in a list': [10**5000]}[sample['output_text']]\n")
    spec = {"type": "python", "source": source, "timeout_s": 30}
    assert asyncio.run(_grade(spec)).score == 0.5
    assert asyncio.run(_grade(spec, grader_sample("int", []))).score == 1.0
    huge = asyncio.run(_grade(spec, grader_sample("huge", [])))
    assert huge.score is None and "grade() returned int" in huge.error and "not a finite number" in huge.error
    listed = asyncio.run(_grade(spec, grader_sample("in a list", [])))  # its repr raises: the child must still answer
    assert listed.score is None and "grade() returned list" in listed.error and "not a number" in listed.error


def test_the_rounding_tolerance_is_a_few_ulps_of_the_ranges_larger_end() -> None:
    """At an end of 0 too: ulps of 0 itself (5e-324) would refuse `0.3 - 0.1 * 3`, 5.6e-17 below it."""
    below_zero = 0.3 - 0.1 * 3
    assert below_zero < 0 and in_range(below_zero, (0.0, 1.0)) == 0.0 and in_range(-1e-12, (0.0, 1.0)) is None
    assert in_range(-1.0 - 2e-16, (-1.0, 0.0)) == -1.0 and in_range(2e-16, (-1.0, 0.0)) == 0.0
    assert in_range(1e6 + math.ulp(1e6), (1e6 - 1, 1e6)) == 1e6  # a span-relative epsilon (1e-12) is under this ulp
    assert in_range(1e6 + 1e-6, (1e6 - 1, 1e6)) is None and in_range(0.5, (0.0, 1.0)) == 0.5
    source = "def grade(sample, item):\n    return 0.3 - 0.1 * 3\n"
    result = asyncio.run(_grade({"type": "python", "source": source, "timeout_s": 30}))
    assert (result.score, result.error) == (0.0, None)


def test_hostile_judge_replies_and_long_texts_are_scored_in_bounded_time() -> None:
    started = time.perf_counter()
    assert parse_score("{" * 400_000) is None and parse_score("[" * 400_000) is None
    assert parse_score("x" * 1_000_000 + ' so {"score": 3}') == 3.0
    assert time.perf_counter() - started < 2  # was 73 s for the 400k `{` alone (quadratic)
    rng = random.Random(0)
    words = [f"w{i}" for i in range(500)]
    a, b = (" ".join(rng.choice(words) for _ in range(3000)) for _ in range(2))
    started = time.perf_counter()
    score = METRICS["rouge_l"](a, b)
    assert 0 < score < 1 and time.perf_counter() - started < 1  # was 9 s (rouge-score's quadratic LCS)


def test_rouge_l_is_rouge_scores_value() -> None:
    from rouge_score import rouge_scorer

    rng = random.Random(1)
    words = "The cat, sat! on a mat and dog ran over 42 hills".split()
    for _ in range(100):
        a, b = (" ".join(rng.choice(words) for _ in range(rng.randint(0, 25))) for _ in range(2))
        assert METRICS["rouge_l"](a, b) == pytest.approx(rouge_scorer.RougeScorer(["rougeL"]).score(b, a)["rougeL"].fmeasure, abs=1e-12)


class RetryAfter:
    """Always 429 with `Retry-After: 99999` (honoured up to 60 s per wait)."""

    def __init__(self) -> None:
        self.requests = 0

    async def handle(self, request: web.Request) -> web.Response:
        self.requests += 1
        return web.Response(status=429, headers={"Retry-After": "99999"})


def test_a_grade_and_a_tool_call_end_by_their_deadline_whatever_retry_after_says() -> None:
    server = RetryAfter()
    app = web.Application()
    app.router.add_post("/{path}", server.handle)
    # Validate refuses a request schedule (135 s here) longer than the deadline; the run enforces it all the same.
    settings = ToolSettings(timeout_s=5, max_retries=2, backoff_s=0.1).model_copy(update={"rollout_timeout_s": 1.5})
    with ThreadedServer(app) as http:
        async def go() -> tuple[Any, Any]:
            actor = GraderActor(GRADER.validate_python({"type": "endpoint", "url": f"{http.url}/grade"}), settings)
            proxy = ToolProxy([ToolSpec(name="t", server_url=f"{http.url}/tool")], settings)
            try:
                return await asyncio.gather(actor.grade(grader_sample("a", []), {}, "trace_1"), proxy.call("t", "{}", "c", "trace_1", {}))
            finally:
                await actor.close()
                await proxy.close()

        started = time.perf_counter()
        grade, call = asyncio.run(go())
    assert time.perf_counter() - started < 5  # without the deadline: 2 waits of 60 s each
    assert grade.score is None and "deadline of rollout_timeout_s=1.5 s" in grade.error
    assert call.status == ToolCallStatus.TIMEOUT and call.fatal and "deadline of rollout_timeout_s=1.5 s" in call.output
    assert server.requests == 2  # one attempt each, then the Retry-After wait the deadline cut


def test_deadlines_state_each_tools_and_graders_worst_case() -> None:
    settings = ToolSettings(timeout_s=30, max_retries=3, backoff_s=0.5, rollout_timeout_s=900)
    assert request_schedule_s(settings) == 4 * 30 + 3 * 60  # every attempt timed out, every wait the longest Retry-After
    rl = Reinforcement(
        tools=[ToolSpec(name="lookup", server_url="http://127.0.0.1:1/t")], tool_settings=settings,
        grader=GRADER.validate_python({"type": "multi", "name": "m", "calculate_output": "(a + b) / 2", "graders": {
            "a": {"type": "python", "source": "def grade(s, i):\n    return 0\n", "timeout_s": 20},
            "b": _check("b")}}),
    )
    table = {d.what: (d.worst_case_s, d.enforced_s, d.fits) for d in deadlines(rl)}
    assert table == {"tool 'lookup'": (300.0, 900.0, True), "grader 'm' (multi)": (30.0, 900.0, True),
                     "grader 'm.a' (python)": (30.0, 900.0, True), "grader 'm.b' (string_check)": (None, 900.0, True)}
    assert deadlines(rl)[0].line() == "tool 'lookup': ends within 900 s (rollout_timeout_s); its own worst case 300 s"


def _traj(i: int, status: RolloutStatus, score: float | None = None, text: str = "a") -> Trajectory:
    return Trajectory(f"trace_{i}", "p", f"g{i % 2}", 1, [1, 2], [0, 1], [0.0, -0.5], [-1, 0], 1, text, status=status,
                      score=score, reward=score)


def test_a_grader_failing_on_a_share_of_a_step_is_shouted(capsys: pytest.CaptureFixture[str]) -> None:
    trajs = [_traj(i, RolloutStatus.OK, 0.5) for i in range(6)] + [_traj(i, RolloutStatus.GRADER_FAILED) for i in range(6, 8)]
    trajs.append(_traj(9, RolloutStatus.TOOL_FAILED))  # never graded: not in the share
    metrics = rollout_metrics(trajs)
    assert metrics["train_grader_failed_frac"] == 0.25
    assert "grader failed on 25% of this step's graded rollouts" in grader_warning(metrics)
    StepPrinter().print_step(1, metrics)
    assert "GRADER 2 (25%)" in capsys.readouterr().out
    assert grader_warning(rollout_metrics(trajs[:7])) is None  # 1 of 7: under the share
    v = verdict(summarize(trajs), group_size=4, tool_call_parser="hermes")
    assert not v.ok and "the grader failed on 25% of the rollouts it graded" in v.reason


def test_a_record_that_cannot_be_stored_costs_only_its_rollout(tmp_path: Any) -> None:
    store = TrajectoryStore(tmp_path)
    trajs = [_traj(0, RolloutStatus.OK, 0.5), _traj(1, RolloutStatus.OK, 0.7, text="lone \ud800 surrogate")]
    rel = store.append(trajs)
    rows = pq.read_table(tmp_path / rel).to_pylist()
    assert [r["status"] for r in rows] == ["ok", "internal_error"] and rows[0]["token_ids"] == [1, 2]
    assert rows[1]["error"].startswith("storing the rollout: UnicodeEncodeError") and rows[1]["token_ids"] == []
    assert trajs[1].status == RolloutStatus.INTERNAL_ERROR  # counted as such in the step's metrics
    assert rollout_metrics(trajs)["train_status/internal_error"] == 1
