"""The job spec: OpenAI Agent RFT's shape (DESIGN §3) plus our explicit extensions.

OpenAI fields keep OpenAI's names and `"auto"` defaults. Our additions sit beside them under
their own names (`hyperparameters.group_size`, `tool_settings`, `cluster`, ...). Every model
forbids unknown keys so a typo is reported with its path instead of silently ignored.
"""

from __future__ import annotations

import ast as _ast
import json
import keyword as _keyword
import math
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args

import yaml
from pydantic import AliasChoices, BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from rft_cluster.graders.formula import FUNCTIONS as _FORMULA_FUNCTIONS
from rft_cluster.graders.formula import Formula, FormulaError

Auto = Literal["auto"]


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ToolSpec(Strict):
    """A user's tool endpoint. Several tools may share one URL (the server dispatches on name)."""

    name: str = Field(min_length=1)
    server_url: str
    headers: dict[str, str] = Field(default_factory=dict)


# --- graders ---------------------------------------------------------------------------------


class StringCheckGrader(Strict):
    type: Literal["string_check"]
    name: str = "string_check"
    input: str  # template, e.g. "{{sample.output_text}}"
    reference: str  # template, e.g. "{{item.answer}}"
    operation: Literal["eq", "ne", "like", "ilike"] = "eq"


class TextSimilarityGrader(Strict):
    """Similarity of two rendered templates in [0, 1] (metrics: rft_cluster/graders/text_similarity.py)."""

    type: Literal["text_similarity"]
    name: str = "text_similarity"
    input: str  # template
    reference: str  # template
    evaluation_metric: Literal[
        "fuzzy_match", "bleu", "gleu", "meteor", "rouge_1", "rouge_2", "rouge_3", "rouge_4", "rouge_5", "rouge_l"
    ]
    pass_threshold: float | None = None


class EndpointGrader(Strict):
    type: Literal["endpoint"]
    name: str = "endpoint"
    url: str
    headers: dict[str, str] = Field(default_factory=dict)
    rate_limit: int | None = Field(default=None, gt=0, description="requests per minute")
    pass_threshold: float | None = None


class JudgeMessage(Strict):
    """One chat message of a score_model prompt; `content` is a template."""

    role: Literal["system", "developer", "user", "assistant"]
    content: str
    type: Literal["message"] | None = None  # OpenAI's input messages may carry it


class JudgeSamplingParams(Strict):
    """OpenAI's score_model sampling_params; only the fields that are set are sent."""

    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = Field(default=None, gt=0, le=1)
    seed: int | None = None
    # OpenAI spells it `max_completions_tokens` here (and `max_completion_tokens` elsewhere).
    max_completions_tokens: int | None = Field(
        default=None, gt=0, validation_alias=AliasChoices("max_completions_tokens", "max_completion_tokens")
    )
    reasoning_effort: Literal["none", "minimal", "low", "medium", "high", "xhigh"] | None = None


class ScoreModelGrader(Strict):
    """An LLM judge on any OpenAI-compatible chat endpoint (`base_url`, `headers` are ours)."""

    type: Literal["score_model"]
    name: str = "score_model"
    model: str
    input: list[JudgeMessage] = Field(min_length=1)
    range: tuple[float, float] = (0.0, 1.0)
    pass_threshold: float | None = None
    sampling_params: JudgeSamplingParams = Field(default_factory=JudgeSamplingParams)
    base_url: str  # e.g. "http://127.0.0.1:8000/v1"; the request goes to {base_url}/chat/completions
    headers: dict[str, str] = Field(default_factory=dict)

    @field_validator("range")
    @classmethod
    def _range_is_an_interval(cls, value: tuple[float, float]) -> tuple[float, float]:
        low, high = value
        if not (math.isfinite(low) and math.isfinite(high) and low < high):
            raise ValueError(f"range must be [min, max] with finite min < max, got {list(value)}")
        return value


class PythonGrader(Strict):
    """`grade(sample, item) -> float` from `source`, run in a limited child process (graders/python.py)."""

    type: Literal["python"]
    name: str = "python"
    source: str
    image_tag: str | None = None  # OpenAI's; accepted so their jobs load, and ignored (no images here)
    pass_threshold: float | None = None
    timeout_s: float = Field(default=5.0, gt=0)
    memory_mb: int = Field(default=512, gt=0, description="address-space limit of the child process")

    @field_validator("source")
    @classmethod
    def _defines_grade(cls, source: str) -> str:
        try:
            module = _ast.parse(source)
        except SyntaxError as e:
            raise ValueError(f"source line {e.lineno}: {e.msg}") from None
        if not any(isinstance(node, _ast.FunctionDef) and node.name == "grade" for node in module.body):
            raise ValueError("source must define a top-level function `grade(sample, item)`")
        return source


class MultiGrader(Strict):
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
# pydantic puts the discriminator's value into error paths; these are dropped to match the file.
_GRADER_TAGS = {cls.model_fields["type"].annotation.__args__[0] for cls in get_args(get_args(Grader)[0])}


class Hyperparameters(Strict):
    """OpenAI's hyperparameters (each `"auto"` by default) and our explicit extensions."""

    batch_size: int | Auto = "auto"  # prompts per step
    compute_multiplier: float | Auto = "auto"  # scales rollouts per prompt
    n_epochs: int | Auto = "auto"
    learning_rate_multiplier: float | Auto = "auto"
    eval_interval: int | Auto = "auto"
    eval_samples: int | Auto = "auto"
    reasoning_effort: Literal["default", "low", "medium", "high"] = "default"
    # --- rft-cluster extensions ---
    group_size: int | Auto = "auto"  # rollouts per prompt (GRPO group)
    max_steps: int | None = Field(default=None, gt=0)  # stop before the epochs are done
    base_learning_rate: float = Field(default=1e-5, gt=0)
    warmup_steps: int = Field(default=0, ge=0)  # the rate ramps linearly up to its value over these steps
    clip_epsilon: float = Field(default=0.2, gt=0)
    # Per-token KL to the starting policy, weighted into the loss (GRPO's beta); > 0 keeps a
    # frozen copy of the starting model in the learner, one more forward pass per step.
    kl_coef: float = Field(default=0.0, ge=0)
    temperature: float = Field(default=1.0, gt=0)
    max_tokens_per_turn: int = Field(default=256, gt=0)
    # Reward shaping (`grpo.shaped_reward`): the tool-call penalty is subtracted per call, or with
    # "scale" it takes that share of the score, so only rollouts that earned credit pay it.
    tool_call_penalty: float = Field(default=0.0, ge=0)
    tool_call_penalty_mode: Literal["subtract", "scale"] = "subtract"
    reasoning_token_penalty: float = Field(default=0.0, ge=0)
    scale_advantages: bool = True  # divide by the group's reward std (GRPO); false: Dr. GRPO
    # Weight versions a trained-on token may lag the policy being updated: 0 samples each step
    # on the newest weights (synchronous); k > 0 lets sampling run up to k steps ahead of training.
    max_staleness: int = Field(default=0, ge=0)

    def resolved(self, n_train_rows: int) -> "ResolvedHyperparameters":
        """Turns every "auto" into a number (documented in README: "auto" values)."""
        cm = 1.0 if self.compute_multiplier == "auto" else float(self.compute_multiplier)
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
    batch_size: int
    group_size: int
    n_epochs: int
    learning_rate: float
    warmup_steps: int
    total_steps: int
    eval_interval: int
    eval_samples: int
    clip_epsilon: float
    kl_coef: float
    temperature: float
    max_tokens_per_turn: int
    tool_call_penalty: float
    tool_call_penalty_mode: Literal["subtract", "scale"]
    reasoning_token_penalty: float
    scale_advantages: bool
    max_staleness: int


class ToolSettings(Strict):
    """How the tool proxy treats endpoints. Defaults follow OpenAI's stated behaviour."""

    timeout_s: float = Field(default=30.0, gt=0)
    max_retries: int = Field(default=3, ge=0)  # for 5xx and connection errors
    backoff_s: float = Field(default=0.5, ge=0)
    max_concurrency: int = Field(default=1024, gt=0, description="requests in flight per endpoint host, per tool proxy actor")
    max_request_bytes: int = Field(default=1_000_000, gt=0)
    max_response_bytes: int = Field(default=1_000_000, gt=0)
    rollout_timeout_s: float = Field(default=900.0, gt=0, description="wall time of one whole rollout")


class Reinforcement(Strict):
    grader: Grader
    tools: list[ToolSpec] = Field(default_factory=list)
    max_episode_steps: int = Field(default=10, gt=0, description="tool calls per rollout")
    response_format: dict[str, Any] | None = None
    hyperparameters: Hyperparameters = Field(default_factory=Hyperparameters)
    tool_settings: ToolSettings = Field(default_factory=ToolSettings)


class Method(Strict):
    type: Literal["reinforcement"]
    reinforcement: Reinforcement


class EngineSpec(Strict):
    """vLLM engine settings for each rollout worker."""

    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    max_model_len: int = Field(default=4096, gt=0)
    gpu_memory_utilization: float = Field(default=0.85, gt=0, le=1)
    cpu_kv_cache_gb: float = Field(default=1.0, gt=0, description="VLLM_CPU_KVCACHE_SPACE")
    max_num_seqs: int = Field(default=64, gt=0)
    enforce_eager: bool = True
    tensor_parallel_size: int = Field(default=1, gt=0, description="GPUs one engine spans (vLLM tensor parallelism)")


class LearnerSpec(Strict):
    zero_stage: Literal[0, 1, 2, 3] = 2
    dtype: Literal["float32", "bfloat16"] = "float32"
    ranks: int = Field(default=1, gt=0, description="processes of the learner's DeepSpeed world, one Ray actor each")
    micro_batch_size: int = Field(default=4, gt=0)
    weight_bucket_mb: int = Field(default=64, gt=0, description="size of each weight-sync bucket")
    gradient_checkpointing: bool = False
    cpu_threads: int | None = Field(
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

    cpus: float = Field(default=1, ge=0)
    gpus: float = Field(default=0, ge=0)
    memory_gb: float | None = Field(default=None, gt=0, description="Ray memory reserved per actor")
    resources: dict[str, float] = Field(default_factory=dict, description="custom Ray resources per actor")
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

    min: int = Field(gt=0)
    max: int = Field(gt=0)

    @model_validator(mode="after")
    def _ordered(self) -> "FleetSize":
        if self.max < self.min:
            raise ValueError(f"max ({self.max}) must be >= min ({self.min})")
        return self


class ClusterSpec(Strict):
    ray_address: str | None = None  # None: RAY_ADDRESS if set (e.g. inside a Ray job), else a fresh local cluster
    rollout_workers: int | FleetSize = Field(default=1, description="a number, or {min, max} for an elastic fleet")
    tool_proxies: int = Field(default=1, gt=0)
    graders: int = Field(default=1, gt=0)
    resources: ClusterResources = Field(default_factory=ClusterResources)
    placement_timeout_s: float = Field(
        default=120.0, gt=0, description="how long to wait for every role to be placed before failing with what is missing"
    )
    actor_max_restarts: int = Field(
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


class WandbIntegration(Strict):
    """OpenAI's `integrations: [{type: wandb, wandb: {...}}]`; its project names our W&B run."""

    type: Literal["wandb"]
    wandb: WandbIntegrationSettings


class JobSpec(Strict):
    model: str  # HF hub name or local HF directory
    training_file: str
    validation_file: str | None = None
    seed: int = 42
    suffix: str | None = None
    metadata: dict[str, str] = Field(default_factory=dict)  # OpenAI's; kept with the run config
    integrations: list[WandbIntegration] = Field(default_factory=list)
    method: Method
    cluster: ClusterSpec = Field(default_factory=ClusterSpec)
    # Where a run writes everything (`--output` overrides): a local path or a pyarrow.fs URI
    # (s3://, gs://, hdfs://, file://), written by whichever actor holds the data.
    storage: str | None = None
    wandb: WandbSpec = Field(default_factory=WandbSpec)
    # Where the job file lives; relative paths in it resolve against this directory.
    source_path: Path | None = Field(default=None, exclude=True)

    @model_validator(mode="after")
    def _integrations_name_the_wandb_project(self) -> "JobSpec":
        """An OpenAI job's wandb integration sets our W&B project unless `wandb` says otherwise."""
        if self.integrations and "project" not in self.wandb.model_fields_set:
            self.wandb.project = self.integrations[0].wandb.project
        return self

    @property
    def rl(self) -> Reinforcement:
        return self.method.reinforcement

    def resolve_path(self, p: str) -> Path:
        path = Path(p).expanduser()
        if not path.is_absolute() and self.source_path is not None:
            path = self.source_path.parent / path
        return path


class SpecError(Exception):
    """A problem with a job file; `problems` are "file:line: field: message" strings."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


def _yaml_lines(text: str) -> dict[tuple[str, ...], int]:
    """Maps each key path of a YAML/JSON document to its 1-based line, for error messages."""
    lines: dict[tuple[str, ...], int] = {}

    def walk(node: yaml.Node, path: tuple[str, ...]) -> None:
        lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            for k, v in node.value:
                walk(v, path + (str(k.value),))
                lines[path + (str(k.value),)] = k.start_mark.line + 1
        elif isinstance(node, yaml.SequenceNode):
            for i, v in enumerate(node.value):
                walk(v, path + (str(i),))

    root = yaml.compose(text)
    if root is not None:
        walk(root, ())
    return lines


_ENV_REF = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def _expand_env(node: Any, path: tuple[str, ...], missing: list[tuple[tuple[str, ...], str]], env: Mapping[str, str]) -> Any:
    """Replaces `${VAR}` in every string with `env`'s value (secrets stay out of files)."""
    if isinstance(node, dict):
        return {k: _expand_env(v, path + (str(k),), missing, env) for k, v in node.items()}
    if isinstance(node, list):
        return [_expand_env(v, path + (str(i),), missing, env) for i, v in enumerate(node)]
    if isinstance(node, str):

        def sub(m: re.Match[str]) -> str:
            if m.group(1) not in env:
                missing.append((path, m.group(1)))
                return m.group(0)
            return env[m.group(1)]

        return _ENV_REF.sub(sub, node)
    return node


def load_job(path: str | Path, unset_env_ok: bool = False, variables: Mapping[str, str] | None = None) -> JobSpec:
    """Parses and validates a job file (YAML or JSON); raises SpecError naming file:line:field.
    `unset_env_ok` (validating a job for submission: its `${VAR}`s resolve on the cluster)
    leaves an unset variable's `${VAR}` in place instead of reporting it. `variables` resolve
    `${VAR}`s before the environment does (a caller that starts the job's servers names them)."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror}"]) from None
    try:
        data = json.loads(text) if path.suffix == ".json" else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as e:
        line = getattr(e, "lineno", None) or getattr(getattr(e, "problem_mark", None), "line", -1) + 1
        raise SpecError([f"{path}:{line}: not valid {'JSON' if path.suffix == '.json' else 'YAML'}: {e}"]) from None
    if not isinstance(data, dict):
        raise SpecError([f"{path}:1: the job must be a mapping, got {type(data).__name__}"])
    lines = _yaml_lines(text)
    missing: list[tuple[tuple[str, ...], str]] = []
    data = _expand_env(data, (), missing, {**os.environ, **(variables or {})})
    if missing and not unset_env_ok:
        raise SpecError(
            [f"{path}:{lines.get(p, 1)}: {'.'.join(p)}: environment variable ${{{var}}} is not set" for p, var in missing]
        )
    try:
        job = JobSpec.model_validate(data)
    except ValidationError as e:
        problems = []
        for err in e.errors():
            loc = tuple(str(x) for x in err["loc"])
            keyed = tuple(x for x in loc if x not in _GRADER_TAGS)
            line = next((lines[keyed[:i]] for i in range(len(keyed), -1, -1) if keyed[:i] in lines), 1)
            problems.append(f"{path}:{line}: {'.'.join(keyed) or '<root>'}: {err['msg']}")
        raise SpecError(problems) from None
    job.source_path = path.resolve()
    return job
