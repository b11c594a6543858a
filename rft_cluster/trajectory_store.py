"""Every trajectory, train and eval, as Parquet: one file per (kind, step), inspectable with any
Parquet reader (pyarrow, pandas, DuckDB, Polars).

Layout: `<run>/trajectories/kind=<train|eval>/step-<NNNNNN>.parquet`, where `<run>` is the run's
storage (a local path or a pyarrow.fs URI, see `rft_cluster.storage`). The `kind=` directories are
Hive-style partitions, so `pandas.read_parquet("<run>/trajectories")` or DuckDB's
`read_parquet('<run>/trajectories/**/*.parquet', hive_partitioning=true)` recover a `kind` column.
Writing a step again (e.g. after a resume) replaces that step's file instead of duplicating it.
Each step file appears whole or not at all (`RunStorage.write_bytes`): a local temp file renamed,
or one object-store upload. (`pyarrow.dataset.write_dataset` writes the same Hive layout, but it
can only replace a whole `kind=` partition, not one step's file, and not atomically: hence the
one `write_table` per step here.)

| column | type | meaning |
|---|---|---|
| `trace_id` | string | one per rollout; sent on all its tool calls and its grader call |
| `step` | int64 | training step whose prompts produced the rollout |
| `prompt_id` | string | the dataset row |
| `group_id` | string | the GRPO group (rollouts of one prompt that share advantage statistics) |
| `token_ids` | list<int32> | exact token ids the engine was given and sampled (prompt, outputs, tool outputs) |
| `loss_mask` | list<int8> | 1 where the policy sampled the token, 0 for prompt and tool-output tokens |
| `logprobs` | list<float32> | sampling logprob per token (0.0 where `loss_mask` is 0) |
| `weight_versions` | list<int32> | weight version that sampled each token (-1 where `loss_mask` is 0) |
| `prompt_len` | int32 | number of leading prompt tokens in `token_ids` |
| `output_text` | string | the final answer text the grader saw |
| `tool_calls` | list<struct> | one entry per call, in order: `call_id`, `name`, `arguments` (JSON string), `output` (text shown to the model), `status` (`ok`, `client_error`, `server_error`, `connection_error`, `timeout`, `malformed`, `bad_response`, `proxy_lost`, `internal_error`), `http_status` (int32, null without a response), `latency_s` (float64, all attempts), `attempts` (int32) |
| `score` | float64, nullable | the grader's score; null when the rollout was not graded or the grader failed |
| `reward` | float64, nullable | the reward trained on: `score` minus the tool-call and reasoning-token penalties |
| `status` | string | `ok`, `budget_exhausted`, `tool_failed`, `grader_failed`, `engine_failed`, `timeout`, `worker_lost`, `stale`, `format_failed`, `internal_error` (an exception in our code while building, grading or storing this rollout: `error` names the stage; a record that could not be stored is kept as a stub without tokens or texts) |
| `grader_error` | string, nullable | why the grader failed |
| `num_turns` | int32 | generation turns (model calls) in the rollout |
| `latency_s` | float64 | wall time of the rollout, generation and tools |
| `grader_latency_s` | float64 | wall time of grading |
| `error` | string, nullable | why the rollout ended abnormally (engine error, timeout, failed tool) |
| `generated_tokens` | int32 | tokens sampled by the policy (sum of `loss_mask`) |
| `reasoning_tokens` | int32 | sampled reasoning tokens, as the model's reasoning parser counts them (models that reason) |
| `unparsed_call_like` | list<string> | one entry per turn that looks like a tool call the tool-call parser did not read (a wrong `tool_call_parser`, or a malformed call): the parser likely to read it |
| `node_id` | string, nullable | the Ray node of the rollout worker that ran the rollout |
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import pyarrow as pa
import pyarrow.parquet as pq

from rft_cluster.redact import Redactor
from rft_cluster.storage import RunStorage
from rft_cluster.types import RolloutStatus, ToolResult, Trajectory
from rft_cluster.untrusted import replace_surrogates

Kind = Literal["train", "eval"]
KINDS: tuple[Kind, ...] = ("train", "eval")

TOOL_CALL_TYPE = pa.struct(
    [
        pa.field("call_id", pa.string(), nullable=False),
        pa.field("name", pa.string(), nullable=False),
        pa.field("arguments", pa.string(), nullable=False),
        pa.field("output", pa.string(), nullable=False),
        pa.field("status", pa.string(), nullable=False),
        pa.field("http_status", pa.int32()),
        pa.field("latency_s", pa.float64(), nullable=False),
        pa.field("attempts", pa.int32(), nullable=False),
    ]
)

SCHEMA = pa.schema(
    [
        pa.field("trace_id", pa.string(), nullable=False),
        pa.field("step", pa.int64(), nullable=False),
        pa.field("prompt_id", pa.string(), nullable=False),
        pa.field("group_id", pa.string(), nullable=False),
        pa.field("token_ids", pa.list_(pa.int32()), nullable=False),
        pa.field("loss_mask", pa.list_(pa.int8()), nullable=False),
        pa.field("logprobs", pa.list_(pa.float32()), nullable=False),
        pa.field("weight_versions", pa.list_(pa.int32()), nullable=False),
        pa.field("prompt_len", pa.int32(), nullable=False),
        pa.field("output_text", pa.string(), nullable=False),
        pa.field("tool_calls", pa.list_(TOOL_CALL_TYPE), nullable=False),
        pa.field("score", pa.float64()),
        pa.field("reward", pa.float64()),
        pa.field("status", pa.string(), nullable=False),
        pa.field("grader_error", pa.string()),
        pa.field("num_turns", pa.int32(), nullable=False),
        pa.field("latency_s", pa.float64(), nullable=False),
        pa.field("grader_latency_s", pa.float64(), nullable=False),
        pa.field("error", pa.string()),
        pa.field("generated_tokens", pa.int32(), nullable=False),
        pa.field("reasoning_tokens", pa.int32(), nullable=False),
        pa.field("unparsed_call_like", pa.list_(pa.string()), nullable=False),
        pa.field("node_id", pa.string()),
    ]
)
# What `read()` returns: the stored columns plus the partition, as Hive-aware readers show it.
READ_SCHEMA = SCHEMA.append(pa.field("kind", pa.string(), nullable=False))


def _tool_call_row(call: ToolResult) -> dict[str, Any]:
    return {
        "call_id": call.call_id,
        "name": call.name,
        "arguments": call.arguments,
        "output": call.output,
        "status": call.status.value,
        "http_status": call.http_status,
        "latency_s": call.latency_s,
        "attempts": call.attempts,
    }


def _row(t: Trajectory) -> dict[str, Any]:
    # `sample` is not stored: it is derived from output_text and tool_calls for the grader.
    return {
        "trace_id": t.trace_id,
        "step": t.step,
        "prompt_id": t.prompt_id,
        "group_id": t.group_id,
        "token_ids": t.token_ids,
        "loss_mask": t.loss_mask,
        "logprobs": t.logprobs,
        "weight_versions": t.weight_versions,
        "prompt_len": t.prompt_len,
        "output_text": t.output_text,
        "tool_calls": [_tool_call_row(c) for c in t.tool_calls],
        "score": t.score,
        "reward": t.reward,
        "status": t.status.value,
        "grader_error": t.grader_error,
        "num_turns": t.num_turns,
        "latency_s": t.latency_s,
        "grader_latency_s": t.grader_latency_s,
        "error": t.error,
        "generated_tokens": t.generated_tokens,
        "reasoning_tokens": t.reasoning_tokens,
        "unparsed_call_like": t.unparsed_call_like,
        "node_id": t.node_id,
    }


class TrajectoryStore:
    """Appends trajectories as one Parquet file per (kind, step) under `<run>/trajectories/`.
    File names returned are relative to the run (`trajectories/kind=train/step-000003.parquet`).
    Every text is stored through `redactor` (a tool's or grader's error text may quote a secret)."""

    DIR = "trajectories"

    def __init__(self, run: RunStorage | str | Path, redactor: Redactor | None = None):
        self.storage = run if isinstance(run, RunStorage) else RunStorage(run)
        self._redact = redactor or Redactor()

    def rel_for(self, step: int, kind: Kind = "train") -> str:
        return f"{self.DIR}/kind={kind}/step-{step:06d}.parquet"

    def append(self, trajectories: list[Trajectory], kind: Kind = "train") -> str:
        """Writes one step's trajectories atomically; replaces an earlier file of that step."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
        steps = {t.step for t in trajectories}
        if len(steps) != 1:
            raise ValueError(f"append needs trajectories of exactly one step, got steps {sorted(steps)}")
        rel = self.rel_for(steps.pop(), kind)
        try:
            table = pa.Table.from_pylist([self._redact(_row(t)) for t in trajectories], schema=SCHEMA)
        except Exception:  # some record cannot be stored: find it, row by row (rare, so not the usual path)
            table = pa.Table.from_pylist([self._row_or_stub(t) for t in trajectories], schema=SCHEMA)
        # Serialized in memory (one step is small) and stored in one atomic write.
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink)
        self.storage.write_bytes(rel, sink.getvalue().to_pybytes())
        return rel

    def _row_or_stub(self, t: Trajectory) -> dict[str, Any]:
        """`t`'s row if it converts; else `t` becomes `internal_error`, saying why, and is stored
        as a stub (its ids, no tokens or texts): one rollout's record never costs the step file."""
        try:
            row = self._redact(_row(t))
            pa.Table.from_pylist([row], schema=SCHEMA)
            return row
        except Exception as e:
            t.status = RolloutStatus.INTERNAL_ERROR
            t.error = replace_surrogates(f"storing the rollout: {type(e).__name__}: {self._redact.clip(str(e), 500)}")
            stub = Trajectory(t.trace_id, t.prompt_id, t.group_id, t.step, [], [], [], [], 0, "", status=t.status,
                              score=t.score, reward=t.reward, error=t.error, node_id=t.node_id)
            return self._redact(_row(stub))

    def files(self, kind: Kind | None = None) -> list[str]:
        """Step files in (kind, step) order; all kinds when `kind` is None."""
        return [
            f"{self.DIR}/kind={k}/{name}"
            for k in sorted([kind] if kind else KINDS)
            for name in self.storage.list(f"{self.DIR}/kind={k}")
            if name.startswith("step-") and name.endswith(".parquet")
        ]

    def _read(self, rel: str, **kw: Any) -> pa.Table:
        return pq.read_table(self.storage.path(rel), filesystem=self.storage.fs, **kw)

    def read(self, kind: Kind | None = None) -> pa.Table:
        """All stored trajectories (of one kind, or all kinds): SCHEMA's columns plus `kind`."""
        tables = []
        for f in self.files(kind):
            table = self._read(f, schema=SCHEMA)
            file_kind = f.split("/")[-2].removeprefix("kind=")
            tables.append(table.append_column(READ_SCHEMA.field("kind"), pa.array([file_kind] * len(table))))
        return pa.concat_tables(tables) if tables else READ_SCHEMA.empty_table()

    def trace_ids(self, kind: Kind | None = None) -> set[str]:
        return {tid for f in self.files(kind) for tid in self._read(f, columns=["trace_id"]).column("trace_id").to_pylist()}

    def drop_after(self, step: int) -> int:
        """Removes every step file after `step` (a resumed run redoes those steps); returns how
        many were removed."""
        stale = [f for f in self.files() if int(f.rsplit("/", 1)[-1].removeprefix("step-").removesuffix(".parquet")) > step]
        for f in stale:
            self.storage.delete(f)
        return len(stale)
