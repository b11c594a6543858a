"""Records that cross actor boundaries: tool results, grades, trajectories, training samples.

Plain dataclasses (cheap to pickle through Ray's object store). Field names are the Parquet
column names documented in docs/outputs.md.
"""

from __future__ import annotations

import json
import math
import uuid
from dataclasses import dataclass, field
from enum import Enum
from typing import Any


class RolloutStatus(str, Enum):
    """How a rollout ended. Exactly one per rollout (docs/architecture.md §4)."""

    OK = "ok"
    BUDGET_EXHAUSTED = "budget_exhausted"
    TOOL_FAILED = "tool_failed"
    GRADER_FAILED = "grader_failed"
    ENGINE_FAILED = "engine_failed"
    TIMEOUT = "timeout"
    WORKER_LOST = "worker_lost"  # its rollout worker died mid-rollout; the request was re-run with a new trace id
    STALE = "stale"  # finished too many weight versions behind the learner (max_staleness) to be trained on
    # The model's turn cannot be rendered back through its chat template (e.g. parallel calls
    # where the template takes one per turn): graded, so the policy learns to avoid it.
    FORMAT_FAILED = "format_failed"
    # An exception in this project's code while building or storing the rollout's record (the
    # rollout, not the run, ends; `error` names the stage and the exception).
    INTERNAL_ERROR = "internal_error"


class ToolCallStatus(str, Enum):
    """Outcome of one tool call, as seen by the tool proxy."""

    OK = "ok"
    CLIENT_ERROR = "client_error"  # 4xx: shown to the model as the tool's output
    SERVER_ERROR = "server_error"  # 5xx after all retries: the rollout is discarded
    CONNECTION_ERROR = "connection_error"  # after all retries: the rollout is discarded
    TIMEOUT = "timeout"  # after all retries: the rollout is discarded
    MALFORMED = "malformed"  # the model's call could not be parsed or names no tool
    BAD_RESPONSE = "bad_response"  # the endpoint answered 2xx with a body we cannot read
    PROXY_LOST = "proxy_lost"  # the tool proxy actor died with no restarts left: the rollout is discarded
    INTERNAL_ERROR = "internal_error"  # the proxy's own code raised on this call (named in the output): the rollout is discarded


@dataclass
class RolloutRequest:
    """One rollout to run: a dataset row, its group, and its trace id."""

    trace_id: str
    prompt_id: str
    group_id: str
    step: int
    messages: list[dict]
    tools: list[dict]
    item: dict[str, Any]


@dataclass
class ToolResult:
    """What the proxy returns for one call: the observation plus its accounting."""

    call_id: str
    name: str
    arguments: str
    output: str  # the text the model is shown
    status: ToolCallStatus
    http_status: int | None = None
    latency_s: float = 0.0
    attempts: int = 0

    @property
    def fatal(self) -> bool:
        """True when the rollout must end as `tool_failed`."""
        return self.status in (
            ToolCallStatus.SERVER_ERROR,
            ToolCallStatus.CONNECTION_ERROR,
            ToolCallStatus.TIMEOUT,
            ToolCallStatus.PROXY_LOST,
            ToolCallStatus.INTERNAL_ERROR,
        )


@dataclass
class GradeResult:
    """A grader's verdict. `score is None` means the grader failed (never a silent 0)."""

    score: float | None
    error: str | None = None
    latency_s: float = 0.0
    # A multi grader's sub-grader scores by name (those that succeeded); empty for other graders.
    details: dict[str, float] = field(default_factory=dict)


def new_trace_id() -> str:
    """One per rollout, in OpenAI's `trace_<uuid>` form."""
    return f"trace_{uuid.uuid4().hex}"


# Deeper JSON is not a usable answer, and would make every later encoder (Ray's pickle, json.dumps)
# recurse as deep: past it an answer counts as not JSON.
MAX_JSON_DEPTH = 100


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):  # 1e999
        raise ValueError(f"{text[:20]} is not a finite number")
    return value


def _depth(value: Any) -> int:
    """How deep lists and objects nest in `value` (iterative: the value may be deep)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, depth = stack.pop()
        children = node.values() if isinstance(node, dict) else node if isinstance(node, list) else None
        if children is not None:
            deepest = max(deepest, depth)
            stack.extend((child, depth + 1) for child in children)
    return deepest


def strict_json_loads(text: str) -> Any:
    """`text` parsed as strict JSON (RFC 8259: no NaN/Infinity, numbers that fit a float) nesting at
    most MAX_JSON_DEPTH deep; raises ValueError for anything else, whatever the text."""
    try:
        value = json.loads(text, parse_constant=_reject_constant, parse_float=_finite_float)
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None
    except TypeError as e:  # not a str
        raise ValueError(str(e)) from None
    # ValueError already covers integers of more than sys.get_int_max_str_digits() digits.
    if _depth(value) > MAX_JSON_DEPTH:
        raise ValueError(f"JSON nested deeper than {MAX_JSON_DEPTH}")
    return value


def strict_json(value: Any) -> Any:
    """`value` with every non-finite float (NaN, ±Infinity: not JSON) as None, so that
    `json.dumps(strict_json(v), allow_nan=False)` cannot fail on them: what we send is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [strict_json(v) for v in value]
    return value


def dumps_strict(value: Any) -> bytes:
    """A request body: `value` as strict JSON bytes (see `strict_json`)."""
    return json.dumps(strict_json(value), allow_nan=False).encode()


def grader_sample(output_text: str, tool_calls: list[ToolResult]) -> dict[str, Any]:
    """The `sample` a grader sees (OpenAI's shape): the final answer, its parse when it is strict
    JSON (`strict_json_loads`; else null, whatever the text), and the rollout's tool calls in Chat
    Completions form."""
    calls = [{"id": r.call_id, "type": "function", "function": {"name": r.name, "arguments": r.arguments}} for r in tool_calls]
    try:
        output_json = strict_json_loads(output_text)
    except ValueError:
        output_json = None
    return {
        "output_text": output_text,
        "output_json": output_json,
        "output_tools": calls,
        "choices": [{"index": 0, "message": {"role": "assistant", "content": output_text, "tool_calls": calls}}],
    }


@dataclass
class Trajectory:
    """One rollout, token-exact: `token_ids` are the ids the engine was given and sampled.

    `loss_mask[i] == 1` iff token i was sampled by the policy; only those tokens carry a
    sampling logprob and the weight version that produced them (others hold 0.0 / -1).
    """

    trace_id: str
    prompt_id: str
    group_id: str
    step: int
    token_ids: list[int]
    loss_mask: list[int]
    logprobs: list[float]
    weight_versions: list[int]
    prompt_len: int
    output_text: str
    tool_calls: list[ToolResult] = field(default_factory=list)
    status: RolloutStatus = RolloutStatus.OK
    score: float | None = None  # the grader's
    reward: float | None = None  # what the learner optimises: score minus penalties
    reasoning_tokens: int = 0  # sampled reasoning tokens, as the model's reasoning parser counts them
    # One entry per turn that looks like a tool call the tool-call parser did not read: the
    # parser that would likely read it (`formats.call_like`).
    unparsed_call_like: list[str] = field(default_factory=list)
    grader_error: str | None = None
    num_turns: int = 0
    latency_s: float = 0.0
    grader_latency_s: float = 0.0
    error: str | None = None
    node_id: str | None = None  # the Ray node of the rollout worker that ran it
    # The OpenAI-shaped sample the grader sees (output_text, output_json, output_tools, choices).
    sample: dict[str, Any] = field(default_factory=dict)

    @property
    def generated_tokens(self) -> int:
        return sum(self.loss_mask)


@dataclass
class TrainSample:
    """What the learner needs of a trajectory: tokens, mask, rollout logprobs, advantage."""

    token_ids: list[int]
    loss_mask: list[int]
    rollout_logprobs: list[float]
    advantage: float
