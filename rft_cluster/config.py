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
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Union
from urllib.parse import urlsplit

from pydantic import AfterValidator, AliasChoices, BaseModel, ConfigDict, Field, PrivateAttr, ValidationError, ValidationInfo, field_validator, model_validator
from pydantic import Strict as _StrictType

from rft_cluster.formats import REASONING_PARSERS, TOOL_CALL_PARSERS, known_parser
from rft_cluster.graders.formula import FUNCTIONS as _FORMULA_FUNCTIONS
from rft_cluster.graders.formula import Formula, FormulaError
from rft_cluster.jobfile import CONTROL, ENV_REF, Document, EnvFindings, KeyPath, SpecError, expand_env, read_document
from rft_cluster.redact import Redactor

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


def _http_url(value: str) -> str:
    """An http(s) URL with a host. A `${VAR}` still in it is unset here and checked where it is
    set. Errors name the scheme, never the URL (it may hold a secret)."""
    if ENV_REF.search(value):
        return value
    if CONTROL.search(value) or " " in value:
        raise ValueError("URL holds a space, line break or control character")
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises for a port out of range
    except ValueError as e:
        raise ValueError(f"not a valid URL: {e}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        got = f"scheme {parts.scheme!r}" if parts.scheme else "no scheme"
        raise ValueError(f"must be an http:// or https:// URL with a host, got {got}")
    return value


def _headers(headers: dict[str, str]) -> dict[str, str]:
    for name, value in headers.items():
        if not _HEADER_NAME.match(name):
            raise ValueError(f"header name {name!r} is not an HTTP token (letters, digits, !#$%&'*+-.^_`|~)")
        if CONTROL.search(value):  # CR/LF would start a new header: request smuggling
            raise ValueError(f"header {name!r}: the value holds a line break or control character")
    return headers


NonEmptyStr = Annotated[str, AfterValidator(_not_blank)]
HttpUrl = Annotated[str, AfterValidator(_http_url)]
Headers = Annotated[dict[str, str], AfterValidator(_headers)]


class ToolSpec(Strict):
    """A user's tool endpoint. Several tools may share one URL (the server dispatches on name)."""

    name: str = Field(pattern=TOOL_NAME.pattern)
    server_url: HttpUrl
    headers: Headers = Field(default_factory=dict)


# --- graders ---------------------------------------------------------------------------------


def _finite_interval(name: str, value: tuple[float, float]) -> tuple[float, float]:
    low, high = value
    if not (math.isfinite(low) and math.isfinite(high) and low < high):
        raise ValueError(f"{name} must be [min, max] with finite min < max, got {list(value)}")
    return value


# The widest score_range: rewards far beyond it would overflow a group's statistics (1e308 + 1e308).
MAX_SCORE_MAGNITUDE = 1e6


class GraderCommon(Strict):
    """What every grader accepts. `score_range` (ours) declares the scores it may give, bounds
    included: any other score, like a non-finite one, fails the grade (`grader_failed`)."""

    score_range: tuple[float, float] = (0.0, 1.0)

    @field_validator("score_range")
    @classmethod
    def _score_range_is_an_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        if max(abs(v) for v in _finite_interval("score_range", value)) > MAX_SCORE_MAGNITUDE:
            raise ValueError(f"score_range bounds must lie within ±{MAX_SCORE_MAGNITUDE:g}, got {list(value)}")
        return value


class StringCheckGrader(GraderCommon):
    type: Literal["string_check"]
    name: str = "string_check"
    input: str  # template, e.g. "{{sample.output_text}}"
    reference: str  # template, e.g. "{{item.answer}}"
    operation: Literal["eq", "ne", "like", "ilike"] = "eq"


class TextSimilarityGrader(GraderCommon):
    """Similarity of two rendered templates in [0, 1] (metrics: rft_cluster/graders/text_similarity.py)."""

    type: Literal["text_similarity"]
    name: str = "text_similarity"
    input: str  # template
    reference: str  # template
    evaluation_metric: Literal[
        "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
    ]
    pass_threshold: Float | None = None


class EndpointGrader(GraderCommon):
    type: Literal["endpoint"]
    name: str = "endpoint"
    url: HttpUrl
    headers: Headers = Field(default_factory=dict)
    rate_limit: Int | None = Field(default=None, gt=0, description="requests per minute")
    pass_threshold: Float | None = None


class JudgeMessage(Strict):
    """One chat message of a score_model prompt; `content` is a template."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None  # OpenAI's input messages may carry it


class JudgeSamplingParams(Strict):
    """OpenAI's score_model sampling_params; only the fields that are set are sent."""

    temperature: Float | None = Field(default=None, ge=0)
    top_p: Float | None = Field(default=None, gt=0, le=1)
    seed: Int | None = None
    # OpenAI spells it `max_completions_tokens` here (and `max_completion_tokens` elsewhere).
    max_completions_tokens: Int | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("max_completions_tokens", "max_completion_tokens")
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class ScoreModelGrader(GraderCommon):
    """An LLM judge on any OpenAI-compatible chat endpoint (`base_url`, `headers` are ours)."""

    type: Literal["score_model"]
    name: str = "score_model"
    model: str
    input: list[JudgeMessage] = Field(min_length=1)
    range: tuple[Float, Float] = (0.0, 1.0)
    pass_threshold: Float | None = None
    sampling_params: JudgeSamplingParams = Field(default_factory=JudgeSamplingParams)
    base_url: HttpUrl  # e.g. "http://127.0.0.1:8000/v1"; the request goes to {base_url}/chat/completions
    headers: Headers = Field(default_factory=dict)

    @field_validator("range")
    @classmethod
    def _range_is_an_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        return _finite_interval("range", value)


class PythonGrader(GraderCommon):
    """`grade(sample, item) -> float` from `source`, run in a sandbox (graders/python.py, graders/sandbox.py)."""

    type: Literal["python"]
    name: str = "python"
    source: str
    image_tag: str | None = None

    NOT_ACTED_ON: ClassVar[dict[str, str]] = {"image_tag": "the grader runs in this machine's Python, not in an image"}
    pass_threshold: Float | None = None
    timeout_s: Float = Field(default=5.0, gt=0, le=3600)
    # An interpreter needs ~64 MB of address space to start; 1 TiB is beyond any grader's need.
    memory_mb: Int = Field(default=512, ge=64, le=2**20, description="address-space limit of the child process")

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, source: str) -> str:
        try:
            module = _ast.parse(source)
        except SyntaxError as e:  # a NUL byte has no line
            raise ValueError(f"source line {e.lineno}: {e.msg}" if e.lineno else e.msg) from None
        except (RecursionError, MemoryError):  # CPython's parser reports a deep expression as either
            raise ValueError("source is nested too deeply to compile") from None
        grades = [node for node in module.body if isinstance(node, (_ast.FunctionDef, _ast.AsyncFunctionDef)) and node.name == "grade"]
        if not grades:
            raise ValueError("source must define a top-level function `grade(sample, item)`")
        problem = _grade_signature_problem(grades[-1])  # the last definition is the one that runs
        if problem:
            raise ValueError(f"source line {grades[-1].lineno}: {problem}")
        return source


def _grade_signature_problem(grade: _ast.FunctionDef | _ast.AsyncFunctionDef) -> str | None:
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

    type: Literal["multi"]
    name: str = "multi"
    graders: dict[str, Grader] = Field(min_length=1)
    calculate_output: str

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
        if "graders" in info.data:  # else the graders already failed and were reported
            try:
                Formula(expression, info.data["graders"])
            except FormulaError as e:
                raise ValueError(str(e)) from None
        return expression


Grader = Annotated[
    Union[StringCheckGrader, TextSimilarityGrader, ScoreModelGrader, PythonGrader, MultiGrader, EndpointGrader],
    Field(discriminator="type"),
]
MultiGrader.model_rebuild()  # `graders` refers to `Grader`, defined just above


class Hyperparameters(Strict):
    """OpenAI's hyperparameters (each `"auto"` by default) and our explicit extensions."""

    batch_size: PositiveInt | Auto = "auto"  # prompts per step (at most the training rows)
    compute_multiplier: Annotated[PositiveFloat, Field(le=256)] | Auto = "auto"  # scales rollouts per prompt (group_size's bound)
    n_epochs: PositiveInt | Auto = "auto"
    learning_rate_multiplier: PositiveFloat | Auto = "auto"
    eval_interval: PositiveInt | Auto = "auto"
    eval_samples: Annotated[PositiveInt, Field(le=1024)] | Auto = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    # --- rft-cluster extensions ---
    # Rollouts per prompt (GRPO group): a group of one has no advantage; over 1024 is one prompt's batch beyond any engine.
    group_size: Annotated[Int, Field(ge=2, le=1024)] | Auto = "auto"
    max_steps: Int | None = Field(default=None, gt=0)  # stop before the epochs are done
    base_learning_rate: Float = Field(default=1e-5, gt=0)
    warmup_steps: Int = Field(default=0, ge=0)  # the rate ramps linearly up to its value over these steps
    clip_epsilon: Float = Field(default=0.2, gt=0)
    # Per-token KL to the starting policy, weighted into the loss (GRPO's beta); > 0 keeps a
    # frozen copy of the starting model in the learner, one more forward pass per step.
    kl_coef: Float = Field(default=0.0, ge=0)
    temperature: Float = Field(default=1.0, gt=0)
    max_tokens_per_turn: Int = Field(default=256, gt=0)
    # Reward shaping (`grpo.shaped_reward`): the tool-call penalty is subtracted per call, or with
    # "scale" it takes that share of the score, so only rollouts that earned credit pay it.
    tool_call_penalty: Float = Field(default=0.0, ge=0)
    tool_call_penalty_mode: Literal["subtract", "scale"] = "subtract"
    reasoning_token_penalty: Float = Field(default=0.0, ge=0)
    scale_advantages: bool = True  # divide by the group's reward std (GRPO); false: Dr. GRPO
    # Weight versions a trained-on token may lag the policy being updated: 0 samples each step
    # on the newest weights (synchronous); k > 0 lets sampling run up to k steps ahead of training.
    max_staleness: Int = Field(default=0, ge=0)

    def resolved(self, n_train_rows: int) -> "ResolvedHyperparameters":
        """Turns every "auto" into a number (documented in README: "auto" values); raises
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
    temperature: Float
    max_tokens_per_turn: Int
    tool_call_penalty: Float
    tool_call_penalty_mode: Literal["subtract", "scale"]
    reasoning_token_penalty: Float
    scale_advantages: bool
    max_staleness: Int


class ToolSettings(Strict):
    """How the tool proxy treats endpoints. Defaults follow OpenAI's stated behaviour."""

    timeout_s: Float = Field(default=30.0, gt=0, le=3600)
    max_retries: Int = Field(default=3, ge=0, le=10)  # for 5xx and connection errors
    backoff_s: Float = Field(default=0.5, ge=0, le=60)  # the n-th retry waits backoff_s * 2**n
    max_concurrency: Int = Field(default=1024, gt=0, description="requests in flight per endpoint host, per tool proxy actor")
    max_request_bytes: Int = Field(default=1_000_000, gt=0)
    max_response_bytes: Int = Field(default=1_000_000, gt=0)
    rollout_timeout_s: Float = Field(default=900.0, gt=0, le=86400, description="wall time of one whole rollout")

    @model_validator(mode="after")
    def _retries_end(self) -> "ToolSettings":
        # `tool-run` and graders have no rollout deadline: a call's retries must end on their own.
        waits = self.backoff_s * (2**self.max_retries - 1)
        if waits > self.rollout_timeout_s:
            raise ValueError(
                f"max_retries {self.max_retries} with backoff_s {self.backoff_s:g} wait {waits:g} s in all, "
                f"longer than rollout_timeout_s {self.rollout_timeout_s:g}"
            )
        return self


class Reinforcement(Strict):
    grader: Grader
    tools: list[ToolSpec] = Field(default_factory=list)
    max_episode_steps: Int = Field(default=10, gt=0, description="tool calls per rollout")
    response_format: dict[str, Any] | None = None

    NOT_ACTED_ON: ClassVar[dict[str, str]] = {
        "response_format": "the final answer is not constrained to it; a grader sees the text as written",
    }
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    tool_settings: ToolSettings = Field(default_factory=ToolSettings)

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
    type: Literal["reinforcement"]
    reinforcement: Reinforcement


class EngineSpec(Strict):
    """vLLM engine settings for each rollout worker."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: Int = Field(default=4096, gt=0)
    gpu_memory_utilization: Float = Field(default=0.85, gt=0, le=1)
    cpu_kv_cache_gb: Float = Field(default=1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE")
    max_num_seqs: Int = Field(default=64, gt=0)
    enforce_eager: bool = True
    tensor_parallel_size: Int = Field(default=1, gt=0, description="GPUs one engine spans (vLLM tensor parallelism)")
    tool_call_parser: Annotated[str, AfterValidator(lambda v: known_parser(v, "tool_call_parser", TOOL_CALL_PARSERS))] = Field(
        default="auto",
        description="vLLM tool-call parser that reads the model's calls (as `vllm serve --tool-call-parser`), e.g. "
                    "hermes, llama3_json, mistral, qwen3_coder, openai; auto: chosen from the chat template",
    )
    reasoning_parser: Annotated[str, AfterValidator(lambda v: known_parser(v, "reasoning_parser", REASONING_PARSERS, ("auto", "none")))] = Field(
        default="auto",
        description="vLLM reasoning parser that separates and counts the model's reasoning (as `vllm serve "
                    "--reasoning-parser`), e.g. qwen3, deepseek_r1, mistral, openai_gptoss; none: the model does not reason; "
                    "auto: chosen from the chat template",
    )


class LearnerSpec(Strict):
    zero_stage: Annotated[Int, Field(ge=0, le=3)] = 2  # an Int, not Literal[0..3]: that would take `true` as 1
    dtype: Literal["float32", "bfloat16"] = "float32"
    ranks: Int = Field(default=1, gt=0, description="processes of the learner's DeepSpeed world, one Ray actor each")
    micro_batch_size: Int = Field(default=4, gt=0)
    weight_bucket_mb: Int = Field(default=64, gt=0, le=2**20, description="size of each weight-sync bucket")
    gradient_checkpointing: bool = False
    cpu_threads: Int | None = Field(
        default=None, gt=0,
        description="torch threads of a CPU learner rank; default: Ray's OMP_NUM_THREADS, i.e. resources.learner.cpus",
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

    cpus: Float = Field(default=1, ge=0)
    gpus: Float = Field(default=0, ge=0)
    memory_gb: Float | None = Field(default=None, gt=0, description="Ray memory reserved per actor")
    resources: dict[str, Float] = Field(default_factory=dict, description="custom Ray resources per actor")
    node_labels: dict[str, str] = Field(default_factory=dict, description="Ray node labels the node must carry")

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

    rollout_worker: RoleResources = Field(default_factory=RoleResources)
    learner: RoleResources = Field(default_factory=RoleResources)
    tool_proxy: RoleResources = Field(default_factory=_network_role)
    grader: RoleResources = Field(default_factory=_network_role)


class FleetSize(Strict):
    """An elastic rollout fleet: sampling starts once `min` workers are up; up to `max` are asked
    for, and those that come up later (e.g. on nodes the autoscaler adds) join the run."""

    min: Int = Field(gt=0)
    max: Int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "FleetSize":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class ClusterSpec(Strict):
    ray_address: str | None = None  # None: RAY_ADDRESS if set (e.g. inside a Ray job), else a fresh local cluster
    rollout_workers: Int | FleetSize = Field(default=1, description="a number, or {min, max} for an elastic fleet")
    tool_proxies: Int = Field(default=1, gt=0)
    graders: Int = Field(default=1, gt=0)
    resources: ClusterResources = Field(default_factory=ClusterResources)
    placement_timeout_s: Float = Field(
        default=120.0, gt=0, le=86400, description="how long to wait for every role to be placed before failing with what is missing"
    )
    actor_max_restarts: Int = Field(
        default=5, ge=0, description="restarts of a dead tool proxy or grader actor (its in-flight calls are retried)"
    )
    engine: EngineSpec = Field(default_factory=EngineSpec)
    learner: LearnerSpec = Field(default_factory=LearnerSpec)

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
    project: str = "rft-cluster"
    mode: Literal["offline", "online", "disabled"] = "offline"


class WandbIntegrationSettings(Strict):
    project: str
    name: str | None = None
    entity: str | None = None
    tags: list[str] = Field(default_factory=list)

    NOT_ACTED_ON: ClassVar[dict[str, str]] = {
        "name": "the W&B run is named from `suffix`",
        "entity": "the W&B run goes to the logged-in default entity",
        "tags": "the W&B run is not tagged",
    }


class WandbIntegration(Strict):
    """OpenAI's `integrations: [{type: wandb, wandb: {...}}]`; its project names our W&B run."""

    type: Literal["wandb"]
    wandb: WandbIntegrationSettings


class JobSpec(Strict):
    model: NonEmptyStr  # HF hub name or local HF directory
    training_file: NonEmptyStr
    validation_file: NonEmptyStr | None = None
    seed: Annotated[Int, Field(ge=0, lt=2**32)] = 42  # numpy's seed range
    suffix: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)  # OpenAI's; kept with the run config
    integrations: list[WandbIntegration] = Field(default_factory=list)
    method: Method
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    # Where a run writes everything (`--output` overrides): a local path or a pyarrow.fs URI
    # (s3://, gs://, hdfs://, file://), written by whichever actor holds the data.
    storage: NonEmptyStr | None = None
    wandb: WandbSpec = Field(default_factory=WandbSpec)
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
        return f"{path}:{doc.line(key_path)}: {'.'.join(key_path) or '<root>'}: {message}"

    env = EnvFindings()
    data = expand_env(doc.data, os.environ if environ is None else environ, unset_env_ok, env)
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
    job._redactor = Redactor(env.expanded)
    return job
