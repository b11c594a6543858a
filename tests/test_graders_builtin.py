"""Built-in graders that need no server: text_similarity, python, multi, and their configs."""

from __future__ import annotations

import asyncio
import socket
import time
from typing import Any

import pytest
import ray
import yaml
from pydantic import TypeAdapter, ValidationError

from rft_cluster.config import Grader
from rft_cluster.grader_actor import GraderActor
from tests.test_grader import FAST, ITEM, SAMPLE

GRADER = TypeAdapter(Grader)


async def grade(spec: dict[str, Any], sample: dict[str, Any] = SAMPLE, item: dict[str, Any] = ITEM):
    actor = GraderActor(GRADER.validate_python(spec), FAST)
    try:
        return await actor.grade(sample, item, "trace_1")
    finally:
        await actor.close()


# --- text_similarity -----------------------------------------------------------------------------


def similarity(metric: str, input: str = "{{sample.output_text}}", reference: str = "{{item.reference}}") -> dict[str, Any]:
    return {"type": "text_similarity", "input": input, "reference": reference, "evaluation_metric": metric}


METRICS = ["fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"]


@pytest.mark.parametrize("metric", METRICS)
async def test_text_similarity_identical_is_1_and_disjoint_is_0(metric: str) -> None:
    text = "the quarterly balance of the account was reported at noon"
    same = await grade(similarity(metric), {**SAMPLE, "output_text": text}, {"reference": text})
    other = await grade(similarity(metric), {**SAMPLE, "output_text": "1234567890"}, {"reference": text})
    assert same.error is None and 0.99 <= same.score <= 1.0  # METEOR keeps a tiny fragmentation penalty
    assert (other.score, other.error) == (0.0, None)


@pytest.mark.parametrize(
    ("metric", "hypothesis", "reference", "expected"),
    [
        ("fuzzy_match", "kitten", "sitting", 1 - 5 / 13),  # Indel distance 5 over 13 characters
        ("gleu", "the cat sat", "the cat ran", 0.5),  # 3 of 6 n-grams shared
        ("rouge_1", "the cat sat", "the cat ran", 2 / 3),
        ("rouge_2", "the cat sat", "the cat ran", 0.5),
        ("rouge_3", "the cat sat", "the cat ran", 0.0),
        ("rouge_l", "the cat sat on the mat", "the cat lay on the mat", 5 / 6),
    ],
)
async def test_text_similarity_values(metric: str, hypothesis: str, reference: str, expected: float) -> None:
    result = await grade(similarity(metric), {**SAMPLE, "output_text": hypothesis}, {"reference": reference})
    assert result.error is None and result.score == pytest.approx(expected)


async def test_meteor_matches_wordnet_synonyms() -> None:
    """car/auto share a WordNet synset, bus/auto do not: proof the shipped WordNet is read."""
    item = {"reference": "I drove the auto home"}
    synonym = await grade(similarity("meteor"), {**SAMPLE, "output_text": "I drove the car home"}, item)
    other = await grade(similarity("meteor"), {**SAMPLE, "output_text": "I drove the bus home"}, item)
    assert synonym.score > 0.95 and other.score < 0.8


async def test_text_similarity_missing_template_key_fails_naming_it() -> None:
    result = await grade({**similarity("bleu"), "name": "sim"}, SAMPLE, {"answer": 1})
    assert result.score is None and "grader 'sim'" in result.error and "'reference'" in result.error


# --- python --------------------------------------------------------------------------------------


def python(source: str, **extra: Any) -> dict[str, Any]:
    return {"type": "python", "name": "py", "source": source, **extra}


async def test_python_grades_sample_against_item() -> None:
    source = (
        "def grade(sample, item):\n"
        "    print('debugging output must not disturb the result')\n"
        "    return 1.0 if str(item['answer']) in sample['output_text'] else 0.25\n"
    )
    right = await grade(python(source))
    wrong = await grade(python(source), {**SAMPLE, "output_text": "no idea"})
    assert (right.score, right.error, wrong.score) == (1.0, None, 0.25)


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ("raise ValueError('item has no rubric')", "ValueError: item has no rubric"),
        ("import sys; sys.exit(0)", "SystemExit"),
        ("import os; os._exit(3)", "exited with code 3 without a result"),
        ("return '0.5'", "returned str '0.5', not a number"),
        ("return None", "returned NoneType None, not a number"),
        ("return float('nan')", "returned nan, not a finite number"),
    ],
    ids=["exception", "sys-exit", "hard-exit", "string", "none", "nan"],
)
async def test_python_failures_are_failures_not_zero(body: str, message: str) -> None:
    result = await grade(python(f"def grade(sample, item):\n    {body}\n"))
    assert result.score is None and message in result.error and result.error.startswith("grader 'py': ")


async def test_python_memory_limit() -> None:
    source = "def grade(sample, item):\n    block = bytearray(1024 ** 3)\n    return 1.0\n"
    result = await grade(python(source, memory_mb=256))
    assert result.score is None and "exceeded the memory limit of memory_mb=256" in result.error
    assert (await grade(python(source, memory_mb=2048, timeout_s=60))).score == 1.0  # the limit, not the machine (a loaded machine pages 1 GiB in slowly)


@pytest.mark.parametrize(
    "call",
    [
        "socket.create_connection(('127.0.0.1', PORT), timeout=2)",
        "socket.socket(socket.AF_INET, socket.SOCK_STREAM).connect(('127.0.0.1', PORT))",
        "urllib.request.urlopen(f'http://127.0.0.1:{PORT}/', timeout=2)",
        "socket.getaddrinfo('localhost', PORT)",
    ],
    ids=["create_connection", "socket", "urllib", "dns"],
)
async def test_python_network_is_blocked(call: str) -> None:
    with socket.create_server(("127.0.0.1", 0)) as listener:  # a reachable port: refusals are ours
        port = listener.getsockname()[1]
        source = f"import socket, urllib.request\nPORT = {port}\ndef grade(sample, item):\n    {call}\n    return 1.0\n"
        result = await grade(python(source))
    assert result.score is None and "network access is disabled in python graders" in result.error


async def test_python_child_does_not_inherit_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_PLANTED_SECRET", "s3cret")
    source = "import os\ndef grade(sample, item):\n    return float('RFT_PLANTED_SECRET' in os.environ)\n"
    assert (await grade(python(source))).score == 0.0


async def test_python_does_not_block_the_event_loop() -> None:
    source = "import time\ndef grade(sample, item):\n    time.sleep(1.0)\n    return 0.5\n"
    task = asyncio.create_task(grade(python(source)))
    ticks = 0
    while not task.done():
        await asyncio.sleep(0.05)
        ticks += 1
    assert task.result().score == 0.5 and ticks >= 15


@pytest.mark.parametrize(
    ("source", "message"),
    [("def grade(sample, item)\n    return 1", "source line 1"), ("def score(sample, item):\n    return 1\n", "`grade(sample, item)`")],
)
def test_python_source_is_checked_at_load(source: str, message: str) -> None:
    with pytest.raises(ValidationError, match="python.source") as e:
        GRADER.validate_python(python(source))
    assert message in str(e.value)


# --- multi ---------------------------------------------------------------------------------------

EXACT = {"type": "string_check", "input": "{{sample.output_text}}", "reference": "The balance is {{item.answer}}.", "operation": "eq"}
HALF = {"type": "python", "source": "def grade(sample, item):\n    return 0.5\n"}


def multi(formula: str, **graders: dict[str, Any]) -> dict[str, Any]:
    return {"type": "multi", "name": "combo", "graders": graders, "calculate_output": formula}


@pytest.mark.parametrize(
    ("formula", "expected"),
    [("0.5 * exact + 0.5 * half", 0.75), ("max(exact, half) - abs(-half) / 2", 0.75), ("min(exact, half) * 2 - 1", 0.0)],
)
async def test_multi_combines_sub_scores(formula: str, expected: float) -> None:
    # score_range [-1, 1]: what the last formula can give (validate samples it over the sub-scores).
    result = await grade({**multi(formula, exact=EXACT, half=HALF), "score_range": [-1, 1]})
    assert (result.score, result.error) == (pytest.approx(expected), None)
    assert result.details == {"exact": 1.0, "half": 0.5}


async def test_multi_runs_sub_graders_concurrently() -> None:
    """Each sub-grader scores its own start (seconds since the test's t0) and then holds for 3 s:
    run one after the other, the second would start >= 3 s after the first; run together, only
    process start-up apart (measured between the two starts, so slow start-ups do not add up)."""
    slow = {"type": "python", "score_range": [0, 3600],
            "source": "import time\ndef grade(sample, item):\n    t = time.time() - item['t0']\n    time.sleep(3.0)\n    return t\n"}
    result = await grade({**multi("abs(a - b)", a=slow, b=slow), "score_range": [0, 3600]}, item={**ITEM, "t0": time.time()})
    assert result.error is None and result.score < 3.0


async def test_multi_nests() -> None:
    inner = {**multi("2 * half", half=HALF), "score_range": [0, 2]}
    result = await grade({**multi("inner - exact", inner=inner, exact=EXACT), "score_range": [-1, 2]})
    assert (result.score, result.details) == (0.0, {"inner": 1.0, "exact": 1.0})


async def test_multi_fails_when_a_sub_grader_fails_naming_it() -> None:
    broken = {**EXACT, "reference": "{{item.missing}}"}
    result = await grade(multi("(ok + broken) / 2", ok=HALF, broken=broken))
    assert result.score is None
    assert result.error.startswith("grader 'combo': sub-grader 'broken' failed: ") and "'missing'" in result.error
    assert result.details == {"ok": 0.5}


async def test_multi_formula_failing_at_run_time_is_a_failure() -> None:
    """A score validate's samples of the sub-scores missed (0.3 exactly) divides by zero at run time."""
    third = {"type": "python", "source": "def grade(sample, item):\n    return 0.3\n"}
    result = await grade(multi("min(1, abs(0.1 / (third - 0.3)))", third=third))
    assert result.score is None and "ZeroDivisionError" in result.error and result.details == {"third": 0.3}


@pytest.mark.parametrize(
    ("formula", "message"),
    [
        ("__import__('os')", "'__import__' not defined"),
        ("__import__('os').system('true')", "Attribute is not available"),
        ("a.__class__", "Attribute is not available"),
        ("open('/etc/passwd')", "'open' not defined"),
        ("a ** 2", "`a ** 2`: the operator Pow is not available"),
        ("min(a, 1) + (not a)", "`not a`: the operator Not is not available"),
        ("max(a, 0.5 % a)", "`0.5 % a`: the operator Mod is not available"),
        ("a / (a - 1)", "ZeroDivisionError: float division by zero when the sub-graders score a=1"),
        ("2 * a", "gives 2 when the sub-graders score a=1, outside score_range [0, 1]"),
        ("a + 1 - a", "gives 1 whatever the sub-graders score"),
        ("a if a else 1", "IfExp is not available"),
        ("'text' * 2", "only numbers"),
        ("a + c", "'c' is not defined"),
        ("a; a", "not a valid expression"),
    ],
)
def test_multi_rejects_unsafe_or_unknown_formulas_at_load(formula: str, message: str) -> None:
    with pytest.raises(ValidationError, match="multi.calculate_output") as e:
        GRADER.validate_python(multi(formula, a=HALF))
    assert message in str(e.value) and "object at 0x" not in str(e.value)


def test_multi_sub_grader_names_must_be_identifiers() -> None:
    with pytest.raises(ValidationError, match="'exact-match'"):
        GRADER.validate_python(multi("1", **{"exact-match": EXACT}))


def test_multi_in_a_ray_actor(ray_local: None) -> None:
    """The python sub-grader's child process works from a Ray async actor's event loop."""
    spec = GRADER.validate_python({**multi("exact + half", exact=EXACT, half=HALF), "score_range": [0, 2]})
    actor = ray.remote(GraderActor).remote(spec, FAST)
    result = ray.get(actor.grade.remote(SAMPLE, ITEM, "trace_ray"))
    ray.get(actor.close.remote())
    ray.kill(actor)
    assert (result.score, result.details) == (1.5, {"exact": 1.0, "half": 0.5})


# --- config shapes -------------------------------------------------------------------------------

OPENAI_STYLE = """
type: multi
name: answer_quality
graders:
  exact:
    type: string_check
    name: exact
    input: "{{sample.output_text}}"
    reference: "{{item.answer}}"
    operation: ilike
  overlap:
    type: text_similarity
    name: overlap
    input: "{{sample.output_text}}"
    reference: "{{item.reference}}"
    evaluation_metric: rouge_l
    pass_threshold: 0.6
  code:
    type: python
    name: code
    source: "def grade(sample, item):\\n    return 1.0\\n"
    image_tag: "2025-05-08"
  judge:
    type: score_model
    name: judge
    model: qwen2.5-7b-instruct
    base_url: http://127.0.0.1:8000/v1
    input:
      - {type: message, role: system, content: "Score from 1 to 5."}
      - {type: message, role: user, content: "{{item.question}} / {{sample.output_text}}"}
    range: [1, 5]
    pass_threshold: 0.5  # compared with the judge's score mapped onto [0, 1]
    sampling_params: {temperature: 0, seed: 1, max_completions_tokens: 64, reasoning_effort: low}
calculate_output: "0.4 * exact + 0.2 * overlap + 0.1 * code + 0.3 * judge"
"""


def test_openai_style_grader_loads_unchanged() -> None:
    spec = GRADER.validate_python(yaml.safe_load(OPENAI_STYLE))
    assert list(spec.graders) == ["exact", "overlap", "code", "judge"]
    assert spec.graders["judge"].range == (1.0, 5.0) and spec.graders["overlap"].pass_threshold == 0.6
