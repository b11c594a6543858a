"""Records that cross actor boundaries: tool results, grades, trajectories, training samples.

Plain dataclasses (cheap to pickle through Ray's object store). Field names are the Parquet
column names documented in docs/outputs.md.
"""

from __future__ import annotations

import json
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


def grader_sample(output_text: str, tool_calls: list[ToolResult]) -> dict[str, Any]:
    """The `sample` a grader sees (OpenAI's shape): the final answer, its JSON parse when it is
    JSON, and the rollout's tool calls in Chat Completions form."""
    calls = [{"id": r.call_id, "type": "function", "function": {"name": r.name, "arguments": r.arguments}} for r in tool_calls]
    try:
        output_json = json.loads(output_text)
    except (json.JSONDecodeError, TypeError):
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
