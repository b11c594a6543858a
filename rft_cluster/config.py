"""The job spec: OpenAI Agent RFT's shape (docs/architecture.md §3) plus our explicit extensions.

OpenAI fields keep OpenAI's names and `"auto"` defaults. Our additions sit beside them under
their own names (`hyperparameters.group_size`, `tool_settings`, `cluster`, ...). Every model
forbids unknown keys so a typo is reported with its path instead of silently ignored, and every
number has the range it can run with: integers and floats are strict (`true` is not 1, `1.5` is
not an integer), floats are finite, and a value that would only fail (or hang) once the run has
started is refused here.
"""

from __future__ import annotations

import ast as _ast
import keyword as _keyword
import math
import os
import random as _random
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import unquote, urlsplit

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic import Strict as _StrictType

from rft_cluster.formats import REASONING_PARSERS, TOOL_CALL_PARSERS, known_parser
from rft_cluster.formula import FUNCTIONS as _FORMULA_FUNCTIONS
from rft_cluster.formula import Formula, FormulaError
from rft_cluster.jobfile import CONTROL, ENV_REF, Document, EnvFindings, KeyPath, SpecError, expand_env, read_document
from rft_cluster.redact import Redactor, strings_in, url_credentials

Auto = Literal["auto"]


def _int64(value: int) -> int:
    if not -(2**63) <= value < 2**63:
        raise ValueError("must fit in 64 bits")
    return value


# Every integer fits an int64 (Parquet, torch); strict: a bool or 2.0 is refused. (A validator,
# not Field bounds: those would override the bounds a field sets.)
Int = Annotated[int, _StrictType(), AfterValidator(_int64)]
PositiveInt = Annotated[Int, Field(gt=0)]
Float = Annotated[float, _StrictType()]  # finite: see Strict.model_config
PositiveFloat = Annotated[Float, Field(gt=0)]
# A tool name as Chat Completions allows it (the rows' tool schemas are checked against it too).
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
# RFC 9110 token: what a header name may be.
_HEADER_NAME = re.compile(r"^[!#$%&'*+\-.^_`|~0-9A-Za-z]+$")


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


def _not_blank(value: str) -> str:
    if not value.strip():
        raise ValueError("must not be empty")
    return value


# Stands for a `${VAR}` still unset (set on the cluster) when a URL's form is checked: valid as
# a host, a port, credentials or a path.
_UNSET_PLACEHOLDER = "1"


def _http_url(value: str) -> str:
    """An http(s) URL with a host the resolver can encode (IDNA: no empty label, none over 63
    characters) and credentials aiohttp can send (Latin-1). A `${VAR}` still in it is unset
    here: the form around it is checked with a placeholder, unless the URL starts with it (it
    holds the scheme). Errors name the scheme, never the URL (it may hold a secret)."""
    if CONTROL.search(value) or " " in value:
        raise ValueError("URL holds a space, line break or control character")
    if ENV_REF.match(value):
        return value
    try:
        parts = urlsplit(ENV_REF.sub(_UNSET_PLACEHOLDER, value))
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"must be an http:// or https:// URL with a host, got {got}")
    try:
        parts.hostname.encode("idna")  # what the resolver does with it
    except UnicodeError:
        raise ValueError("the host is not a valid DNS name: a label is empty or over 63 characters") from None
    try:
        f"{unquote(parts.username or '')}:{unquote(parts.password or '')}".encode("latin-1")
    except UnicodeEncodeError:
        raise ValueError("the URL's credentials hold a character outside Latin-1: Basic auth cannot send it") from None
    return value


def _headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.fullmatch(name):  # `match` with `$` would let a final newline through
            raise ValueError(f"header name {name!r} is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)")
        if CONTROL.search(value):  # CR/LF would start a new header: request smuggling
            raise ValueError(f"header {name!r}: the value holds a line break or control character")
    return headers


NonEmptyStr = Annotated[str, AfterValidator(_not_blank)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
Headers = Annotated[dict[str, str], AfterValidator(_headers)]


class ToolSpec(Strict):
    """A user's tool endpoint. Several tools may share one URL (the server dispatches on name)."""

    name: str = Field(
        pattern=TOOL_NAME.pattern,
        description="The tool's name, as the model calls it and the rows' `tools` schemas declare it: 1 to 64 letters, "
                    "digits, `_` or `-`, unique within `tools`.",
    )
    server_url: HttpUrl = Field(
        description="The http(s) URL each call of this tool is POSTed to; several tools may share one URL (the server "
                    "dispatches on the tool's name).",
    )
    headers: Headers = Field(
        default_factory=dict,
        description="HTTP headers sent with every call of this tool, e.g. an `Authorization` taken from a `${VAR}`; "
                    "their values are redacted wherever the run writes or prints.",
    )


# --- graders ---------------------------------------------------------------------------------


def _finite_interval(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be [min, max] with finite min < max, got {list(value)}")
    return value


# Every grader's `pass_threshold`: read from the job's top-level grader only (driver.py).
_PASS_THRESHOLD = (
    "A score at or above it counts as a pass in the `train_pass_rate` and `valid_pass_rate` metrics (the job's "
    "top-level grader only); the reward is unchanged; none: no pass rate."
)

# The widest score_range: rewards far beyond it would overflow a group's statistics (1e308 + 1e308).
MAX_SCORE_MAGNITUDE = 1e6
# A score this many ulps past an end of score_range counts as at that end: float sums of weights
# that add up to 1 land a rounding step above it (0.4 + 0.2 + 0.3 + 0.1).
SCORE_RANGE_ULPS = 4


def score_tolerance(score_range: tuple[float, float]) -> float:
    """How far float rounding may carry a score past either end of `score_range`: SCORE_RANGE_ULPS
    ulps of the end of larger magnitude, at both ends. Rounding errors scale with the magnitudes
    a score is computed from, not with the end it lands at: an end of 0 has ulps of 5e-324, yet
    `0.3 - 0.1 * 3` lands 5.6e-17 below it; and a span-relative epsilon would be under one ulp for
    a narrow range far from 0 ([1e6 - 1, 1e6])."""
    return SCORE_RANGE_ULPS * math.ulp(max(abs(score_range[0]), abs(score_range[1])))


def in_score_range(score: float, score_range: tuple[float, float]) -> bool:
    """Whether `score` lies within `score_range` up to float rounding (`score_tolerance`): one
    rule for validate's formula check and the run's check of every grade (graders/base.py)."""
    low, high = score_range
    tolerance = score_tolerance(score_range)
    return low - tolerance <= score <= high + tolerance


class GraderCommon(Strict):
    """What every grader accepts. `score_range` (ours) declares the scores it may give, bounds
    included: any other score, like a non-finite one, fails the grade (`grader_failed`)."""

    score_range: tuple[float, float] = Field(
        default=(0.0, 1.0),
        description="The `[min, max]` scores this grader may give, bounds included, within ±1e6: any other "
                    "score, like a non-finite one, fails the grade as `grader_failed`.",
    )

    # The scores the grader's type gives before score_range applies (string_check: 0 or 1);
    # none: any number.
    NATIVE_SCORES: ClassVar[tuple[float, float] | None] = None

    @field_validator("score_range")
    @classmethod
    def _score_range_is_an_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if max(abs(v) for v in _finite_interval("score_range", value)) > MAX_SCORE_MAGNITUDE:
            raise ValueError(f"score_range bounds must lie within ±{MAX_SCORE_MAGNITUDE:g}, got {list(value)}")
        return value

    @field_validator("pass_threshold", check_fields=False)
    @classmethod
    def _threshold_splits_the_scores(cls, threshold: float | None, info: ValidationInfo) -> float | None:
        if threshold is None or "score_range" not in info.data:
            return threshold
        low, high = _reachable(cls.NATIVE_SCORES, info.data["score_range"])
        if not low < threshold <= high:
            pass_rate = "every score passes" if threshold <= low else "no score can pass"
            raise ValueError(f"{threshold:g} is outside ({low:g}, {high:g}], the scores this grader gives: {pass_rate}, the pass rate is constant")
        return threshold

    def reachable(self) -> tuple[float, float]:
        """The lowest and highest score this grader can give."""
        return _reachable(self.NATIVE_SCORES, self.score_range)


def _reachable(native: tuple[float, float] | None, score_range: tuple[float, float]) -> tuple[float, float]:
    if native is None:
        return score_range
    return max(native[0], score_range[0]), min(native[1], score_range[1])


class StringCheckGrader(GraderCommon):
    NATIVE_SCORES: ClassVar[tuple[float, float] | None] = (0.0, 1.0)
    type: Literal["string_check"] = Field(
        description="`string_check`: scores 1.0 when `input` compared with `reference` by `operation` holds, else 0.0.",
    )
    name: str = Field(default="string_check", description="The grader's name in its error messages and logs.")
    input: str = Field(description="Template of the text to check, e.g. `{{sample.output_text}}`.")
    reference: str = Field(description="Template of the text to compare with, e.g. `{{item.answer}}`.")
    operation: Literal["eq", "ne", "like", "ilike"] = Field(
        default="eq",
        description="`eq`: the texts are equal; `ne`: they differ; `like`: `reference` occurs in `input`; `ilike`: "
                    "the same, ignoring case.",
    )


class TextSimilarityGrader(GraderCommon):
    """Similarity of two rendered templates in [0, 1] (metrics: rft_cluster/graders/text_similarity.py)."""

    NATIVE_SCORES: ClassVar[tuple[float, float] | None] = (0.0, 1.0)

    type: Literal["text_similarity"] = Field(
        description="`text_similarity`: scores how similar `input` is to `reference`, in [0, 1], by `evaluation_metric`.",
    )
    name: str = Field(default="text_similarity", description="The grader's name in its error messages and logs.")
    input: str = Field(description="Template of the text to score, e.g. `{{sample.output_text}}`.")
    reference: str = Field(description="Template of the reference text, e.g. `{{item.reference}}`.")
    evaluation_metric: Literal[
        "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
    ] = Field(
        description="The similarity measure: `fuzzy_match` (rapidfuzz), `bleu` (sacrebleu), `gleu` and `meteor` "
                    "(NLTK), `rouge_1` to `rouge_5` or `rouge_l` (rouge-score).",
    )
    pass_threshold: Float | None = Field(default=None, description=_PASS_THRESHOLD)


class EndpointGrader(GraderCommon):
    type: Literal["endpoint"] = Field(
        description="`endpoint`: POSTs `{sample, item, trace_id}` to `url` and takes the `score` of its JSON reply.",
    )
    name: str = Field(default="endpoint", description="The grader's name in its error messages and logs.")
    url: HttpUrl = Field(
        description="The http(s) URL each grading request is POSTed to; timeouts, retries and size caps follow "
                    "`tool_settings`.",
    )
    headers: Headers = Field(
        default_factory=dict,
        description="HTTP headers sent with every grading request; their values are redacted wherever the run writes "
                    "or prints.",
    )
    rate_limit: Int | None = Field(
        default=None, gt=0,
        description="Requests per minute to `url`, spaced evenly, per grader actor; none: no limit.",
    )
    pass_threshold: Float | None = Field(default=None, description=_PASS_THRESHOLD)


class JudgeMessage(Strict):
    """One chat message of a score_model prompt; `content` is a template."""

    role: Literal["system", "developer", "user", "assistant"] = Field(description="The message's chat role.")
    content: str = Field(description="The message's text, a template, e.g. `Answer: {{sample.output_text}}`.")
    type: Literal["message"] | None = Field(
        default=None,
        description="Accepted because OpenAI's input messages may carry it; it is not sent to the judge.",
    )


class JudgeSamplingParams(Strict):
    """OpenAI's score_model sampling_params; only the fields that are set are sent."""

    temperature: Float | None = Field(default=None, ge=0, description="The judge's sampling temperature; none: not sent.")
    top_p: Float | None = Field(default=None, gt=0, le=1, description="The judge's nucleus-sampling mass; none: not sent.")
    seed: Int | None = Field(default=None, description="The judge's sampling seed; none: not sent.")
    # OpenAI spells it `max_completions_tokens` here (and `max_completion_tokens` elsewhere).
    max_completions_tokens: Int | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("max_completions_tokens", "max_completion_tokens"),
        description="Tokens the judge may generate, sent as Chat Completions' `max_completion_tokens` (either "
                    "spelling is accepted here); none: not sent.",
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = Field(
        default=None, description="The judge's reasoning effort; none: not sent.",
    )


class ScoreModelGrader(GraderCommon):
    """An LLM judge on any OpenAI-compatible chat endpoint (`base_url`, `headers` are ours)."""

    NATIVE_SCORES: ClassVar[tuple[float, float] | None] = (0.0, 1.0)  # the judge's score mapped from `range`

    type: Literal["score_model"] = Field(
        description="`score_model`: an LLM judge on an OpenAI-compatible chat endpoint; the score read from its "
                    "reply is mapped from `range` onto [0, 1].",
    )
    name: str = Field(default="score_model", description="The grader's name in its error messages and logs.")
    model: str = Field(description="The model name sent to the judge's endpoint.")
    input: list[JudgeMessage] = Field(
        min_length=1, description="The chat messages sent to the judge (at least one), each `content` rendered as a template.",
    )
    range: tuple[Float, Float] = Field(
        default=(0.0, 1.0),
        description="`[min, max]` of the judge's scores: a score inside is mapped linearly onto [0, 1]; one outside "
                    "fails the grade (never clamped).",
    )
    pass_threshold: Float | None = Field(
        default=None, description=_PASS_THRESHOLD + " It is compared with the score mapped onto [0, 1].",
    )
    sampling_params: JudgeSamplingParams = Field(
        default_factory=JudgeSamplingParams,
        description="OpenAI's sampling parameters for the judge; only those that are set are sent.",
    )
    base_url: HttpUrl = Field(
        description="The judge's OpenAI-compatible base URL, e.g. `http://127.0.0.1:8000/v1`; each request goes "
                    "to `{base_url}/chat/completions`, with timeouts and retries from `tool_settings`.",
    )
    headers: Headers = Field(
        default_factory=dict,
        description="HTTP headers sent to the judge, e.g. an `Authorization` from a `${VAR}`; their values are "
                    "redacted wherever the run writes or prints.",
    )

    @field_validator("range")
    @classmethod
    def _range_is_an_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _finite_interval("range", value)


class PythonGrader(GraderCommon):
    """`grade(sample, item) -> float` from `source`, run in a sandbox (graders/python.py, graders/sandbox.py)."""

    type: Literal["python"] = Field(
        description="`python`: calls `grade(sample, item)` from `source` in a fresh sandbox for each grade; the float "
                    "it returns is the score.",
    )
    name: str = Field(default="python", description="The grader's name in its error messages and logs.")
    source: str = Field(
        description="Python source defining a top-level `grade(sample, item)` (a plain `def`, not `async`) that returns "
                    "the score.",
    )
    image_tag: str | None = Field(
        default=None,
        description="Accepted for OpenAI compatibility and ignored: the grader runs in this machine's Python, not in an image.",
    )

    NOT_ACTED_ON: ClassVar[dict[str, str]] = {"image_tag": "the grader runs in this machine's Python, not in an image"}
    pass_threshold: Float | None = Field(default=None, description=_PASS_THRESHOLD)
    timeout_s: Float = Field(
        default=5.0, gt=0, le=3600,
        description="Wall time of one grade, in seconds: past it the grade is killed and fails. The grade's CPU time "
                    "is capped at `ceil(timeout_s) + 1` seconds.",
    )
    # An interpreter needs ~64 MB of address space to start; 1 TiB is beyond any grader's need.
    memory_mb: Int = Field(
        default=512, ge=64, le=2**20, description="Address-space limit of each process the grade runs, in MB.",
    )

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, source: str) -> str:
        try:
            module = _ast.parse(source)
        except SyntaxError as e:  # a NUL byte has no line
            raise ValueError(f"source line {e.lineno}: {e.msg}" if e.lineno else e.msg) from None
        except (RecursionError, MemoryError):  # CPython's parser reports a deep expression as either
            raise ValueError("source is nested too deeply to compile") from None
        grades = [node for node in module.body if _binds_grade(node)]
        if not grades:
            raise ValueError("source must define a top-level function `grade(sample, item)`")
        last = grades[-1]  # the last definition is the one that runs
        fn = last.value if isinstance(last, (_ast.Assign, _ast.AnnAssign)) else last
        # `grade = make_grader()` can only be checked by calling it: it is, at run time.
        if isinstance(fn, (_ast.FunctionDef, _ast.AsyncFunctionDef, _ast.Lambda)) and (problem := _grade_signature_problem(fn)):
            raise ValueError(f"source line {last.lineno}: {problem}")
        return source


def _binds_grade(node: _ast.stmt) -> bool:
    """Whether a top-level statement defines `grade`: `def`, or an assignment (`grade = lambda ...`)."""
    if isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef)):
        return node.name == "grade"
    targets = node.targets if isinstance(node, _ast.Assign) else [node.target] if isinstance(node, _ast.AnnAssign) and node.value else []
    return any(isinstance(t, _ast.Name) and t.id == "grade" for t in targets)


def _grade_signature_problem(grade: _ast.FunctionDef | _ast.AsyncFunctionDef | _ast.Lambda) -> str | None:
    """Why `grade` cannot be called as `grade(sample, item)` and return a number, or None."""
    if isinstance(grade, _ast.AsyncFunctionDef):
        return "`async def grade` returns a coroutine, not a number: define it with plain `def`"
    args = grade.args
    positional = len(args.posonlyargs) + len(args.args)
    required = positional - len(args.defaults)
    kw_required = [a.arg for a, default in zip(args.kwonlyargs, args.kw_defaults) if default is None]
    if required > 2 or (positional < 2 and args.vararg is None) or kw_required:
        return "`grade` must take two positional arguments, `grade(sample, item)`"
    return None


class MultiGrader(GraderCommon):
    """Sub-graders run concurrently, combined by `calculate_output` over their names."""

    type: Literal["multi"] = Field(
        description="`multi`: runs the sub-graders in `graders` concurrently and combines their scores with "
                    "`calculate_output`; it fails if any of them fails.",
    )
    name: str = Field(default="multi", description="The grader's name in its error messages and logs.")
    graders: dict[str, Grader] = Field(
        min_length=1,
        description="Sub-graders by name (at least one), each of any grader type above and held to its own "
                    "`score_range`; a name must be an identifier usable in `calculate_output`.",
    )
    calculate_output: str = Field(
        description="The formula giving the score from the sub-graders' scores: numbers, their names, `+ - * /`, "
                    "`min`, `max`, `abs`; checked when the job loads.",
    )

    @field_validator("graders")
    @classmethod
    def _names_are_identifiers(cls, graders: dict[str, Any]) -> dict[str, Any]:
        for key in graders:
            if not key.isidentifier() or _keyword.iskeyword(key) or key in _FORMULA_FUNCTIONS:
                raise ValueError(f"sub-grader name {key!r} must be an identifier usable in calculate_output")
        return graders

    @field_validator("calculate_output")
    @classmethod
    def _formula_is_safe(cls, expression: str, info: ValidationInfo) -> str:
        if "graders" in info.data and "score_range" in info.data:  # else they failed and were reported
            try:
                formula = Formula(expression, info.data["graders"])
            except FormulaError as e:
                raise ValueError(str(e)) from None
            if problem := _formula_problem(formula, info.data["graders"], info.data["score_range"]):
                raise ValueError(problem)
        return expression


# Sub-graders up to which every corner of their scores is tried (2^8 evaluations).
_ALL_CORNERS_UP_TO = 8


def _score_samples(graders: dict[str, GraderCommon]) -> list[dict[str, float]]:
    """Sub-score combinations a step can produce: the corners of their reachable ranges (all of
    them for a few sub-graders, else each one high alone and low alone), their middle, and seeded
    points inside (string_check gives only its ends)."""
    bounds = {name: sub.reachable() for name, sub in graders.items()}
    names = list(bounds)
    if len(names) <= _ALL_CORNERS_UP_TO:
        corners = [{n: bounds[n][(mask >> i) & 1] for i, n in enumerate(names)} for mask in range(2 ** len(names))]
    else:
        corners = [{n: bounds[n][int(n == m) ^ flip] for n in names} for m in names for flip in (0, 1)]
    rng = _random.Random(0)
    inside = [{n: low + (high - low) * f for n, (low, high) in bounds.items()} for f in (0.5, *(rng.random() for _ in range(8)))]
    continuous = [n for n, sub in graders.items() if not isinstance(sub, StringCheckGrader)]
    return corners + [{**corners[0], **{n: point[n] for n in continuous}} for point in inside]


def _formula_problem(formula: Formula, graders: dict[str, GraderCommon], score_range: tuple[float, float]) -> str | None:
    """Why the formula fails a step's grades (an error, a non-finite value or one outside
    score_range for sub-scores the sub-graders can give), or gives every rollout one reward."""
    values = set()
    for scores in _score_samples(graders):
        at = ", ".join(f"{n}={v:g}" for n, v in scores.items())
        try:
            value = formula.evaluate(scores)
        except FormulaError as e:
            return f"{e} when the sub-graders score {at}: those rollouts would fail as grader_failed"
        if not in_score_range(value, score_range):
            return (f"gives {value:g} when the sub-graders score {at}, outside score_range [{score_range[0]:g}, {score_range[1]:g}]: "
                    "those rollouts would fail as grader_failed")
        values.add(value)
    if max(values) - min(values) <= score_tolerance(score_range):  # `a + 1 - a` differs from 1 by rounding only
        return f"gives {values.pop():g} whatever the sub-graders score: a constant reward teaches nothing"
    return None


Grader = Annotated[
    Union[StringCheckGrader, TextSimilarityGrader, ScoreModelGrader, PythonGrader, MultiGrader, EndpointGrader],
    Field(discriminator="type"),
]
MultiGrader.model_rebuild()  # `graders` refers to `Grader`, defined just above


class Hyperparameters(Strict):
    """OpenAI's hyperparameters (each `"auto"` by default) and our explicit extensions."""

    batch_size: PositiveInt | Auto = Field(
        default="auto", description="Prompts per training step, at most the training rows; auto: `min(8, training rows)`.",
    )
    # The bound keeps an auto group_size within its own (4 × 256 = 1024).
    compute_multiplier: Annotated[PositiveFloat, Field(le=256)] | Auto = Field(
        default="auto",
        description="Scales the rollouts per prompt when `group_size` is auto: `max(2, round(4 × compute_multiplier))`; "
                    "auto: 1.0.",
    )
    n_epochs: PositiveInt | Auto = Field(
        default="auto",
        description="Passes over the training rows: steps = `n_epochs × ceil(rows / batch_size)`, at most `max_steps`; "
                    "auto: 1.",
    )
    learning_rate_multiplier: PositiveFloat | Auto = Field(
        default="auto", description="The learning rate is `base_learning_rate × learning_rate_multiplier`; auto: 1.0.",
    )
    eval_interval: PositiveInt | Auto = Field(
        default="auto",
        description="Steps between validations and checkpoints (validation also runs before step 1 and after the "
                    "last step); auto: a quarter of the steps, at least 1.",
    )
    eval_samples: Annotated[PositiveInt, Field(le=1024)] | Auto = Field(
        default="auto", description="Rollouts per validation row; auto: 1.",
    )
    reasoning_effort: Literal["default", "low", "medium", "high"] = Field(
        default="default",
        description="Passed to the model's chat template as its `reasoning_effort` variable (a warning says so when "
                    "the template has none); `default`: not passed, the template's own default applies.",
    )
    # --- rft-cluster extensions ---
    # A group of one has no advantage; over 1024 is one prompt's batch beyond any engine.
    group_size: Annotated[Int, Field(ge=2, le=1024)] | Auto = Field(
        default="auto",
        description="Rollouts per prompt (the GRPO group); auto: `max(2, round(4 × compute_multiplier))`.",
    )
    max_steps: Int | None = Field(
        default=None, gt=0, description="Stop after this many steps even if `n_epochs` are not done; none: no limit.",
    )
    base_learning_rate: Float = Field(default=1e-5, gt=0, description="AdamW's learning rate before `learning_rate_multiplier`.")
    warmup_steps: Int = Field(
        default=0, ge=0,
        description="Steps over which the learning rate ramps linearly up to its value (step `k` of `N` uses "
                    "`k/(N+1)` of it); 0: no warm-up.",
    )
    clip_epsilon: Float = Field(
        default=0.2, gt=0,
        description="The PPO/GRPO clip: the policy's probability ratio is clipped to `[1 − clip_epsilon, 1 + clip_epsilon]`.",
    )
    kl_coef: Float = Field(
        default=0.0, ge=0,
        description="Weight of the per-token KL to the starting policy in the loss (GRPO's beta); above 0 the learner "
                    "keeps a frozen copy of the starting model, one more forward pass per step.",
    )
    old_logprobs: Literal["learner", "engine"] = Field(
        default="learner",
        description="The old policy of the PPO ratio. `learner` (as veRL does): the learner's own logprobs of the "
                    "sampled tokens under its weights before the update (a step is one update, so those of its training "
                    "forward, without gradient: no extra pass), so the ratio starts at 1 and the clip bounds the update alone; the "
                    "engine/learner gap is then measured (`train/mismatch_mean|max`) and corrected by `tis_cap`. "
                    "`engine`: the engine's sampling logprobs, whose gap from the learner's (bf16 weights and "
                    "kernels, batch shapes) is in every ratio before any update, biasing it and clipping tokens the "
                    "update never moved.",
    )
    tis_cap: Annotated[Float, Field(ge=1)] | None = Field(
        default=2.0, validate_default=True,
        description="Truncated importance sampling (TIS): each token's clipped surrogate is multiplied by "
                    "`min(exp(learner logprob − engine logprob), tis_cap)` (old weights, no gradient), correcting for "
                    "the engine sampling from a slightly different policy than the learner computes, and with "
                    "`max_staleness` > 0 an older one (the only staleness correction with `old_logprobs: learner`); "
                    "2.0 as in the TIS paper; null: no weight. Needs `old_logprobs: learner`.",
    )
    temperature: Float = Field(default=1.0, gt=0, description="Sampling temperature of the rollouts.")
    max_tokens_per_turn: Int = Field(
        default=256, gt=0,
        description="Tokens the model may generate per turn; must be below `cluster.engine.max_model_len`.",
    )
    # Reward shaping: `grpo.shaped_reward`.
    tool_call_penalty: Float = Field(
        default=0.0, ge=0,
        description="Charged per tool call: subtracted from the reward, or with `tool_call_penalty_mode: scale` the "
                    "share of the score each call costs; 0: none.",
    )
    tool_call_penalty_mode: Literal["subtract", "scale"] = Field(
        default="subtract",
        description="`subtract`: reward = score − penalty × calls; `scale`: score × max(0, 1 − penalty × calls), so "
                    "only rollouts that earned credit pay it.",
    )
    reasoning_token_penalty: Float = Field(
        default=0.0, ge=0,
        description="Subtracted from the reward per reasoning token, as the model's reasoning parser counts them; 0: none.",
    )
    scale_advantages: bool = Field(
        default=True,
        description="Divide `reward − group mean` by the group's reward std (GRPO); false keeps the reward gap (Dr. GRPO).",
    )
    max_staleness: Int = Field(
        default=0, ge=0,
        description="Learner updates a trained-on token may lag the policy being updated: 0 samples each step on the "
                    "newest weights (synchronous); k > 0 lets sampling run up to k steps ahead of training.",
    )

    @field_validator("tis_cap")
    @classmethod
    def _tis_needs_learner_logprobs(cls, cap: float | None, info: ValidationInfo) -> float | None:
        # The weight is the learner's old logprob over the engine's: with engine logprobs as the
        # old policy there is no learner logprob to weigh (the default cap must be turned off too).
        if cap is not None and info.data.get("old_logprobs") == "engine":
            raise ValueError(f"{cap:g} needs old_logprobs: learner (the weight is the learner's old logprob over the "
                             "engine's); with old_logprobs: engine set tis_cap: null")
        return cap

    def resolved(self, n_train_rows: int) -> "ResolvedHyperparameters":
        """Turns every "auto" into a number (documented in docs/jobs.md: How "auto" resolves); raises
        ValueError for values that cannot run with this many training rows."""
        cm = 1.0 if self.compute_multiplier == "auto" else float(self.compute_multiplier)
        if self.batch_size != "auto" and self.batch_size > n_train_rows:
            # The driver would wait forever for a full batch.
            raise ValueError(f"batch_size {self.batch_size} is larger than the {n_train_rows} training rows: a step could never fill its batch")
        batch = min(8, n_train_rows) if self.batch_size == "auto" else self.batch_size
        group = max(2, round(4 * cm)) if self.group_size == "auto" else self.group_size
        epochs = 1 if self.n_epochs == "auto" else self.n_epochs
        lrm = 1.0 if self.learning_rate_multiplier == "auto" else self.learning_rate_multiplier
        steps = epochs * math.ceil(n_train_rows / batch)
        if self.max_steps is not None:
            steps = min(steps, self.max_steps)
        return ResolvedHyperparameters(
            batch_size=batch,
            group_size=group,
            n_epochs=epochs,
            learning_rate=self.base_learning_rate * lrm,
            warmup_steps=self.warmup_steps,
            total_steps=steps,
            eval_interval=max(1, steps // 4) if self.eval_interval == "auto" else self.eval_interval,
            eval_samples=1 if self.eval_samples == "auto" else self.eval_samples,
            clip_epsilon=self.clip_epsilon,
            kl_coef=self.kl_coef,
            old_logprobs=self.old_logprobs,
            tis_cap=self.tis_cap,
            temperature=self.temperature,
            max_tokens_per_turn=self.max_tokens_per_turn,
            tool_call_penalty=self.tool_call_penalty,
            tool_call_penalty_mode=self.tool_call_penalty_mode,
            reasoning_token_penalty=self.reasoning_token_penalty,
            scale_advantages=self.scale_advantages,
            max_staleness=self.max_staleness,
        )


class ResolvedHyperparameters(Strict):
    batch_size: Int
    group_size: Int
    n_epochs: Int
    learning_rate: Float
    warmup_steps: Int
    total_steps: Int
    eval_interval: Int
    eval_samples: Int
    clip_epsilon: Float
    kl_coef: Float
    old_logprobs: Literal["learner", "engine"]
    tis_cap: Float | None
    temperature: Float
    max_tokens_per_turn: Int
    tool_call_penalty: Float
    tool_call_penalty_mode: Literal["subtract", "scale"]
    reasoning_token_penalty: Float
    scale_advantages: bool
    max_staleness: Int


class ToolSettings(Strict):
    """How the tool proxy treats endpoints. Defaults follow OpenAI's stated behaviour."""

    timeout_s: Float = Field(
        default=30.0, gt=0, le=3600,
        description="Seconds one attempt of a tool call, endpoint-grader or judge request may take.",
    )
    max_retries: Int = Field(
        default=3, ge=0, le=10,
        description="Retries of a request after a 429, a 5xx, a connection error or a timeout; then the tool call or "
                    "grade fails.",
    )
    backoff_s: Float = Field(
        default=0.5, ge=0, le=60,
        description="Seconds before the first retry; retry `n` (from 0) waits `backoff_s × 2^n`, or the `Retry-After` "
                    "a 429 or 5xx sent (at most 60 s). A request's whole schedule must fit in `rollout_timeout_s`: every "
                    "attempt at `timeout_s`, every wait at the longer of its backoff and 60 s.",
    )
    max_concurrency: Int = Field(
        default=1024, gt=0,
        description="Requests in flight to one endpoint host (scheme, host, port), per tool proxy or grader actor; "
                    "lower it to protect a service.",
    )
    max_request_bytes: Int = Field(
        default=1_000_000, gt=0,
        description="Largest request body sent, in bytes: a larger tool call is not sent (the model sees it as "
                    "malformed) and a larger grading request fails the grade.",
    )
    max_response_bytes: Int = Field(
        default=1_000_000, gt=0,
        description="Largest response body read, in bytes: a larger tool response reaches the model as an HTTP 413 "
                    "message, a larger grader response fails the grade.",
    )
    rollout_timeout_s: Float = Field(
        default=900.0, gt=0, le=86400,
        description="Wall time of one whole rollout, in seconds; past it the rollout ends as `timeout`. Also the "
                    "deadline of each tool call and each grade (`validate` states every one).",
    )

    @model_validator(mode="after")
    def _retries_end(self) -> "ToolSettings":
        # Every request is cut at rollout_timeout_s: one whose own schedule is longer would be
        # cut mid-retry (and `tool-run` has no such deadline: its retries must end on their own).
        schedule = request_schedule_s(self)
        if schedule > self.rollout_timeout_s:
            raise ValueError(
                f"one request may take {schedule:g} s by these settings ({self.max_retries + 1} attempts of timeout_s "
                f"{self.timeout_s:g}, each of {self.max_retries} retries after the longer of backoff_s {self.backoff_s:g} × 2^n "
                f"and a Retry-After of up to {RETRY_AFTER_MAX_S:g} s), longer than rollout_timeout_s {self.rollout_timeout_s:g}"
            )
        return self


# The longest wait a `Retry-After` may ask for (http.py honours it up to this): a rollout (and its
# group) waits on it.
RETRY_AFTER_MAX_S = 60.0


def request_schedule_s(settings: ToolSettings) -> float:
    """The longest one request to an endpoint (a tool call, an endpoint grade, a judge's reply) can
    take by its own schedule: every attempt at its full `timeout_s`, and each wait before a retry at
    the longer of its backoff and the longest `Retry-After` honoured (RETRY_AFTER_MAX_S)."""
    waits = sum(max(settings.backoff_s * 2**n, RETRY_AFTER_MAX_S) for n in range(settings.max_retries))
    return (settings.max_retries + 1) * settings.timeout_s + waits


class Reinforcement(Strict):
    grader: Grader = Field(description="How each rollout is scored: one grader, whose `type` picks its fields.")
    tools: list[ToolSpec] = Field(default_factory=list, description="The tool endpoints the model may call.")
    max_episode_steps: Int = Field(
        default=10, gt=0,
        description="Tool calls one rollout may make (its budget); a turn asking for more ends the rollout as "
                    "`budget_exhausted`.",
    )
    response_format: dict[str, Any] | None = Field(
        default=None,
        description="Accepted for OpenAI compatibility and ignored: the final answer is not constrained to it; a "
                    "grader sees the text as written.",
    )

    NOT_ACTED_ON: ClassVar[dict[str, str]] = {
        "response_format": "the final answer is not constrained to it; a grader sees the text as written",
    }
    hyperparameters: Hyperparameters = Field(
        default_factory=Hyperparameters, description="Training hyperparameters: OpenAI's (auto by default) and ours.",
    )
    tool_settings: ToolSettings = Field(
        default_factory=ToolSettings,
        description="How tool calls, endpoint graders and judges are sent: timeouts, retries, concurrency and size caps.",
    )

    @field_validator("tools")
    @classmethod
    def _unique_names(cls, tools: list[ToolSpec]) -> list[ToolSpec]:
        seen: dict[str, int] = {}
        for i, tool in enumerate(tools):
            if tool.name in seen:
                raise ValueError(f"tools[{i}] and tools[{seen[tool.name]}] are both named {tool.name!r}: a call could not say which it means")
            seen[tool.name] = i
        return tools


class Method(Strict):
    type: Literal["reinforcement"] = Field(description="The fine-tuning method: `reinforcement`, the only one.")
    reinforcement: Reinforcement = Field(description="The reinforcement settings: grader, tools and hyperparameters.")


class EngineSpec(Strict):
    """vLLM engine settings for each rollout worker."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="The engine's weight and activation dtype (vLLM's `dtype`); auto: vLLM's choice.",
    )
    max_model_len: Int = Field(
        default=4096, gt=0,
        description="Context length of a rollout, in tokens (prompt, tool results and turns together); a rollout that "
                    "runs out ends as `budget_exhausted`.",
    )
    gpu_memory_utilization: Float = Field(
        default=0.85, gt=0, le=1,
        description="Share of each GPU's memory the engine may take for weights and KV cache (vLLM's "
                    "`gpu_memory_utilization`).",
    )
    cpu_kv_cache_gb: Float = Field(
        default=1.0, gt=0,
        description="KV-cache space of a CPU engine, in GB, rounded to a whole GB (at least 1); sets "
                    "`VLLM_CPU_KVCACHE_SPACE` unless the environment already does.",
    )
    max_num_seqs: Int = Field(default=64, gt=0, description="Sequences one engine runs at once (vLLM's `max_num_seqs`).")
    enforce_eager: bool = Field(
        default=True, description="Run the engine without CUDA graphs (vLLM's `enforce_eager`): a faster start, slower decoding.",
    )
    tensor_parallel_size: Int = Field(
        default=1, gt=0,
        description="GPUs one engine spans (vLLM tensor parallelism); at most `resources.rollout_worker.gpus` when "
                    "that is set.",
    )
    tool_call_parser: Annotated[str, AfterValidator(lambda v: known_parser(v, "tool_call_parser", TOOL_CALL_PARSERS))] = Field(
        default="auto",
        description="The vLLM tool-call parser that reads the model's calls (as `vllm serve --tool-call-parser`), e.g. "
                    "hermes, llama3_json, mistral, qwen3_coder, openai; auto: chosen from the chat template.",
    )
    reasoning_parser: Annotated[str, AfterValidator(lambda v: known_parser(v, "reasoning_parser", REASONING_PARSERS, ("auto", "none")))] = Field(
        default="auto",
        description="The vLLM reasoning parser that separates and counts the model's reasoning (as `vllm serve "
                    "--reasoning-parser`), e.g. qwen3, deepseek_r1, mistral, openai_gptoss; none: the model does not reason; "
                    "auto: chosen from the chat template.",
    )
    weight_transfer: Literal["auto", "rft_shm", "nccl", "ipc"] = Field(
        default="auto",
        description="How new weights reach the engines (vLLM's weight-transfer backends): nccl, learner and engines "
                    "on different GPUs; ipc, the learner sharing the engines' GPU (CUDA IPC); rft_shm, CPU shared memory "
                    "(Ray's object store to other nodes). auto: rft_shm for CPU engines, nccl for GPU engines.",
    )


class LearnerSpec(Strict):
    # An Int, not Literal[0..3]: that would take `true` as 1.
    zero_stage: Annotated[Int, Field(ge=0, le=3)] = Field(
        default=2, description="DeepSpeed ZeRO stage; `ranks` above 1 needs 1, 2 or 3.",
    )
    dtype: Literal["float32", "bfloat16"] = Field(
        default="float32", description="Training dtype; bfloat16 applies on a GPU only (a CPU learner trains in float32).",
    )
    ranks: Int = Field(
        default=1, gt=0,
        description="Processes of the learner's DeepSpeed world (data parallel), one Ray actor each.",
    )
    micro_batch_size: Int = Field(
        default=4, gt=0,
        description="Sequences per forward and backward pass of a rank (DeepSpeed's `train_micro_batch_size_per_gpu`).",
    )
    weight_bucket_mb: Int = Field(
        default=64, gt=0, le=2**20, description="Size of each bucket the new weights are sent to the engines in, in MB.",
    )
    gradient_checkpointing: bool = Field(
        default=False, description="Recompute activations during the backward pass: less memory, slower steps.",
    )
    cpu_threads: Int | None = Field(
        default=None, gt=0,
        description="Torch threads of a CPU learner rank; none: Ray's OMP_NUM_THREADS, i.e. `resources.learner.cpus`.",
    )

    @model_validator(mode="after")
    def _data_parallel_stage(self) -> LearnerSpec:
        # Stage 0 steps the bare torch optimizer, whose gradient norm the learner takes before
        # DeepSpeed reduces the ranks' gradients.
        if self.ranks > 1 and self.zero_stage == 0:
            raise ValueError("ranks > 1 needs zero_stage 1, 2 or 3")
        return self


class RoleResources(Strict):
    """What one actor of a role needs from the node it is placed on (a placement-group bundle)."""

    cpus: Float = Field(default=1, ge=0, description="CPUs reserved per actor (Ray's `CPU`).")
    gpus: Float = Field(default=0, ge=0, description="GPUs reserved per actor (Ray's `GPU`); may be a fraction.")
    memory_gb: Float | None = Field(
        default=None, gt=0, description="Ray memory reserved per actor, in GB; none: none reserved.",
    )
    resources: dict[str, Float] = Field(
        default_factory=dict,
        description="Custom Ray resources reserved per actor, name to a positive amount (not CPU, GPU or memory: use "
                    "`cpus`, `gpus`, `memory_gb`).",
    )
    node_labels: dict[str, str] = Field(
        default_factory=dict, description="Ray node labels (name to value) the actor's node must carry.",
    )

    @field_validator("resources")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        bad = [k for k, v in value.items() if not (math.isfinite(v) and v > 0) or k in ("CPU", "GPU", "memory")]
        if bad:
            raise ValueError(f"custom resources must be positive and not CPU/GPU/memory (use cpus, gpus, memory_gb): {bad}")
        return value


def _network_role() -> RoleResources:
    # Tool proxies and graders wait on the network: by default they reserve no CPU.
    return RoleResources(cpus=0)


class ClusterResources(Strict):
    """Per-actor needs of each role; a learner's entry is per rank."""

    rollout_worker: RoleResources = Field(
        default_factory=RoleResources, description="What each rollout worker (one vLLM engine) reserves.",
    )
    learner: RoleResources = Field(default_factory=RoleResources, description="What each learner rank reserves.")
    tool_proxy: RoleResources = Field(
        default_factory=_network_role, description="What each tool proxy actor reserves; by default no CPU.",
    )
    grader: RoleResources = Field(
        default_factory=_network_role, description="What each grader actor reserves; by default no CPU.",
    )


class FleetSize(Strict):
    """An elastic rollout fleet: sampling starts once `min` workers are up; up to `max` are asked
    for, and those that come up later (e.g. on nodes the autoscaler adds) join the run."""

    min: Int = Field(
        gt=0, description="Rollout workers that must be up (within `placement_timeout_s`) before sampling starts.",
    )
    max: Int = Field(gt=0, description="Rollout workers asked for, at least `min`; those that come up later join the run.")

    @model_validator(mode="after")
    def _ordered(self) -> "FleetSize":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class ClusterSpec(Strict):
    ray_address: str | None = Field(
        default=None,
        description="The Ray cluster to connect to; none: `RAY_ADDRESS` if set (e.g. inside a Ray job), else a fresh "
                    "local cluster.",
    )
    rollout_workers: Int | FleetSize = Field(
        default=1,
        description="Rollout workers, one vLLM engine each: a number, or `{min, max}` for an elastic fleet.",
    )
    tool_proxies: Int = Field(
        default=1, gt=0,
        description="Tool proxy actors; an endpoint host may see up to `tool_proxies × tool_settings.max_concurrency` "
                    "requests at once.",
    )
    graders: Int = Field(default=1, gt=0, description="Grader actors.")
    resources: ClusterResources = Field(
        default_factory=ClusterResources, description="What each role's actors reserve on the node they are placed on.",
    )
    placement_timeout_s: Float = Field(
        default=120.0, gt=0, le=86400,
        description="Seconds start-up waits for every role (and `min` rollout workers) to be placed before failing "
                    "with what is missing.",
    )
    actor_max_restarts: Int = Field(
        default=5, ge=0,
        description="Restarts of a tool proxy or grader actor whose process died; its calls in flight are retried on "
                    "the restarted actor.",
    )
    engine: EngineSpec = Field(default_factory=EngineSpec, description="vLLM settings of each rollout worker's engine.")
    learner: LearnerSpec = Field(default_factory=LearnerSpec, description="DeepSpeed settings of the learner.")

    @field_validator("rollout_workers")
    @classmethod
    def _positive_fleet(cls, value: int | FleetSize) -> int | FleetSize:
        if isinstance(value, int) and value <= 0:
            raise ValueError("must be > 0")
        return value

    @property
    def fleet(self) -> FleetSize:
        """The rollout fleet's size; a plain number N means min = max = N."""
        n = self.rollout_workers
        return n if isinstance(n, FleetSize) else FleetSize(min=n, max=n)

    @model_validator(mode="after")
    def _engine_fits_its_gpus(self) -> "ClusterSpec":
        gpus = self.resources.rollout_worker.gpus
        if gpus and self.engine.tensor_parallel_size > gpus:
            raise ValueError(
                f"engine.tensor_parallel_size {self.engine.tensor_parallel_size} needs that many GPUs per rollout worker; "
                f"resources.rollout_worker.gpus is {gpus:g}"
            )
        return self


class WandbSpec(Strict):
    project: str = Field(
        default="rft-cluster",
        description="The W&B project the run logs to; unless set here, an OpenAI `wandb` integration's project.",
    )
    mode: Literal["offline", "online", "disabled"] = Field(
        default="offline",
        description="`offline` writes the W&B run into the run's output, `online` also uploads it, `disabled` logs "
                    "nothing to W&B.",
    )


class WandbIntegrationSettings(Strict):
    project: str = Field(description="Names the run's W&B project, unless `wandb.project` is set.")
    name: str | None = Field(
        default=None, description="Accepted for OpenAI compatibility and ignored: the W&B run is named from `suffix`.",
    )
    entity: str | None = Field(
        default=None,
        description="Accepted for OpenAI compatibility and ignored: the W&B run goes to the logged-in default entity.",
    )
    tags: list[str] = Field(
        default_factory=list, description="Accepted for OpenAI compatibility and ignored: the W&B run is not tagged.",
    )

    NOT_ACTED_ON: ClassVar[dict[str, str]] = {
        "name": "the W&B run is named from `suffix`",
        "entity": "the W&B run goes to the logged-in default entity",
        "tags": "the W&B run is not tagged",
    }


class WandbIntegration(Strict):
    """OpenAI's `integrations: [{type: wandb, wandb: {...}}]`; its project names our W&B run."""

    type: Literal["wandb"] = Field(description="The integration: `wandb`, the only one.")
    wandb: WandbIntegrationSettings = Field(description="The W&B integration's settings.")


class JobSpec(Strict):
    model: NonEmptyStr = Field(
        description="The model to train: a Hugging Face hub name or a local HF directory (relative to the job file).",
    )
    training_file: NonEmptyStr = Field(
        description="JSONL of training rows (`messages`, `tools` and reference data), relative to the job file.",
    )
    validation_file: NonEmptyStr | None = Field(
        default=None, description="JSONL of validation rows, in the training file's format; none: no validation.",
    )
    # numpy's seed range.
    seed: Annotated[Int, Field(ge=0, lt=2**32)] = Field(
        default=42, description="Seed of the run's batch order, sampling and learner.",
    )
    suffix: str | None = Field(default=None, description="Names the run, in W&B too; none: `rft`.")
    metadata: dict[str, str] = Field(
        default_factory=dict, description="OpenAI's string labels of the job; kept with the run's config.",
    )
    integrations: list[WandbIntegration] = Field(
        default_factory=list,
        description="OpenAI's integrations; the first `wandb` entry's project names the run's W&B project.",
    )
    method: Method = Field(description="The fine-tuning method and its settings.")
    cluster: ClusterSpec = Field(
        default_factory=ClusterSpec,
        description="Where and how the run executes: actor counts, resources, the vLLM engines and the learner.",
    )
    # Written by whichever actor holds the data.
    storage: NonEmptyStr | None = Field(
        default=None,
        description="Where a run writes everything: a local path (relative to the job file) or a `pyarrow.fs` URI "
                    "(s3://, gs://, hdfs://, file://); `--output` overrides it; none: `runs/train`.",
    )
    wandb: WandbSpec = Field(default_factory=WandbSpec, description="Weights & Biases logging.")
    # Set by load_job (private: a job file cannot set them): where the file lives (relative paths
    # in it resolve against its directory), its key lines, and its warnings ("file:line: ...").
    _source_path: Path | None = PrivateAttr(default=None)
    _document: Document = PrivateAttr(default_factory=lambda: Document(None, {}))
    _warnings: list[str] = PrivateAttr(default_factory=list)
    # Hides the values of the `${VAR}`s the job file expanded, wherever the run writes or prints.
    _redactor: Redactor = PrivateAttr(default_factory=Redactor)

    @property
    def source_path(self) -> Path | None:
        return self._source_path

    @property
    def warnings(self) -> list[str]:
        return self._warnings

    def locate(self, *key_path: str) -> str:
        """`file:line: dotted.path` of a field, for a problem found after loading."""
        return f"{self.source_path}:{self._document.line(key_path)}: {'.'.join(key_path)}"

    @model_validator(mode="after")
    def _integrations_name_the_wandb_project(self) -> "JobSpec":
        """An OpenAI job's wandb integration sets our W&B project unless `wandb` says otherwise."""
        if self.integrations and "project" not in self.wandb.model_fields_set:
            self.wandb.project = self.integrations[0].wandb.project
        return self

    @property
    def redactor(self) -> Redactor:
        return self._redactor

    @property
    def rl(self) -> Reinforcement:
        return self.method.reinforcement

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and self.source_path is not None:
            path = self.source_path.parent / path
        return path


def _file_path(loc: tuple[int | str, ...], data: Any) -> KeyPath:
    """The key path of a pydantic error location, following the document's own keys (the last
    part is kept when missing: it is the missing field)."""
    node, keys = data, []
    for i, part in enumerate(loc):
        if isinstance(node, dict) and str(part) in node:
            node = node[str(part)]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif not isinstance(node, dict) or i < len(loc) - 1:
            continue  # a union member's or a discriminator's tag
        keys.append(str(part))
    return tuple(keys)


def _cross_field_problems(job: JobSpec) -> list[tuple[KeyPath, str]]:
    """Values each fine alone that cannot run together, located at the field to change."""
    problems = []
    max_tokens, context = job.rl.hyperparameters.max_tokens_per_turn, job.cluster.engine.max_model_len
    if max_tokens >= context:
        where = ("method", "reinforcement", "hyperparameters", "max_tokens_per_turn")
        problems.append((where, f"{max_tokens} leaves no room for the prompt in cluster.engine.max_model_len ({context})"))
    return problems


def _ignored_fields(model: Any, path: KeyPath = ()) -> list[tuple[KeyPath, str]]:
    """(path, why) of each OpenAI field the job sets that this project accepts but does not act on."""
    found = []
    if isinstance(model, BaseModel):
        ignored = getattr(type(model), "NOT_ACTED_ON", {})
        for name in model.model_fields_set:
            if name in ignored:
                found.append((path + (name,), f"accepted for OpenAI compatibility and ignored: {ignored[name]}"))
            found += _ignored_fields(getattr(model, name), path + (name,))
    elif isinstance(model, dict):
        for key, value in model.items():
            found += _ignored_fields(value, path + (str(key),))
    elif isinstance(model, list):
        for i, value in enumerate(model):
            found += _ignored_fields(value, path + (str(i),))
    return found


def load_job(path: str | Path, unset_env_ok: bool = False, environ: Mapping[str, str] | None = None) -> JobSpec:
    """Parses and validates a job file (YAML or JSON); raises SpecError naming file:line:field.
    `${VAR}`s take their values from `environ` (default: this process's environment);
    `unset_env_ok` (validating a job for submission: its `${VAR}`s resolve on the cluster)
    leaves an unset variable's `${VAR}` in place instead of reporting it. What the job sets and
    this project ignores, or a `$VAR` left as written, is in `job.warnings`."""
    path = Path(path)
    doc = read_document(path)
    if not isinstance(doc.data, dict):
        raise SpecError([f"{path}:1: the job must be a mapping of fields, got {type(doc.data).__name__}"])

    def at(key_path: KeyPath, message: str) -> str:
        # A message may quote a value (a formula, a name) that a `${VAR}` expanded.
        return redact.text(f"{path}:{doc.line(key_path)}: {'.'.join(key_path) or '<root>'}: {message}")

    env = EnvFindings()
    data = expand_env(doc.data, os.environ if environ is None else environ, unset_env_ok, env)
    redact = Redactor(env.expanded, url_credentials(strings_in(data)))
    if env.errors:
        raise SpecError([at(p, m) for p, m in env.errors])
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:
        grouped: dict[KeyPath, list[str]] = {}
        for err in e.errors():
            messages = grouped.setdefault(_file_path(err["loc"], data), [])
            message = err["msg"].removeprefix("Value error, ")
            if message not in messages:
                messages.append(message)
        # A value failing a union (`int | "auto"`) fails each member: one line says them all.
        raise SpecError([at(p, "; or ".join(m)) for p, m in grouped.items()]) from None
    if problems := _cross_field_problems(job):
        raise SpecError([at(p, m) for p, m in problems])
    job._source_path = path.resolve()
    warnings = sorted(env.warnings + _ignored_fields(job), key=lambda found: doc.line(found[0]))
    job._warnings = [at(p, f"warning: {m}") for p, m in warnings]
    job._document = Document(None, doc.lines)  # the lines only: the data may hold expanded secrets
    job._redactor = redact
    return job
