"""Dataset rows (JSONL; docs/architecture.md §3): checked up front, every problem reported at once.

A row is `{"messages": [...], "tools": [...], ...reference data}`. `messages` is a chat whose last
message is from the user; `tools` are Chat Completions function schemas; every other key is the
row's reference data, which tools and graders receive as `item`.

Problems read `"{path}:{line}: {field}: {message}"` (lines 1-based, fields like
`messages[2].role`; `<row>` for the row as a whole); problems with the file itself read
`"{path}: {message}"`, as in `config.load_job`.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from rft_cluster.config import SpecError, load_job

ROLES = ("system", "developer", "user", "assistant", "tool")
TOOL_NAME = re.compile(r"^[a-zA-Z0-9_-]{1,64}$")
DEFAULT_MAX_ROW_BYTES = 1_000_000
# Row keys that would be confused with the protocol's own fields (docs/architecture.md §3).
RESERVED_KEYS = {
    "sample": "reserved: graders address the model's output as `sample` ({{sample.output_text}}, "
    "the endpoint grader's request body), so a row field of that name is ambiguous",
    "trace_id": "reserved: tool and grader requests carry the rollout's own `trace_id` beside "
    "`item`, so a row field of that name would be mistaken for it",
}


class DatasetError(SpecError):
    """A dataset that failed its check; a SpecError so callers can report both alike."""


def check_dataset(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[str]:
    """Every problem of a JSONL dataset (empty list: the file is good)."""
    return _scan(Path(path), max_row_bytes)[1]


def row_item(row: dict[str, Any]) -> dict[str, Any]:
    """A row's reference data, sent to tools and graders as `item`: every key but the prompt's."""
    return {k: v for k, v in row.items() if k not in ("messages", "tools")}


def load_rows(path: Path, max_row_bytes: int = DEFAULT_MAX_ROW_BYTES) -> list[dict[str, Any]]:
    """The rows of a dataset; raises DatasetError listing every problem if it has any."""
    rows, problems = _scan(Path(path), max_row_bytes)
    if problems:
        raise DatasetError(problems)
    return [row for _, row in rows]


def validate_job_and_data(job_path: Path, unset_env_ok: bool = False) -> list[str]:
    """Every problem of a job file and its datasets, including undeclared tool names in rows
    (`unset_env_ok`: see `load_job`)."""
    try:
        job = load_job(job_path, unset_env_ok)
    except SpecError as e:
        return e.problems
    declared = {tool.name for tool in job.rl.tools}
    problems: list[str] = []
    for data_file in filter(None, [job.training_file, job.validation_file]):
        path = job.resolve_path(data_file)
        rows, row_problems = _scan(path, DEFAULT_MAX_ROW_BYTES)
        problems += row_problems
        for line, row in rows:
            for j, name in _tool_names(row):
                if name not in declared:
                    problems.append(
                        f"{path}:{line}: tools[{j}].function.name: tool {name!r} is not declared "
                        f"in the job's method.reinforcement.tools (declared: {sorted(declared)})"
                    )
    return problems


Problem = tuple[str, str]  # (field, message), located by the caller


def _scan(path: Path, max_row_bytes: int) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line, row) for every line that parsed as an object, and every problem found."""
    try:
        data = path.read_bytes()
    except OSError as e:
        return [], [f"{path}: cannot read: {e.strerror}"]
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    # Split bytes, not text: str.splitlines() also breaks on U+2028 and friends, which JSON
    # allows unescaped inside strings.
    for line, raw in enumerate(data.splitlines(), start=1):
        if not raw.strip():
            continue  # blank lines (e.g. a trailing one) are not rows
        row, found = _parse_line(raw, max_row_bytes)
        if row is not None:
            rows.append((line, row))
            found += _check_row(row)
        problems += [f"{path}:{line}: {field}: {message}" for field, message in found]
    if not rows and not problems:
        problems.append(f"{path}: empty: the dataset has no rows")
    return rows, problems


def _parse_line(raw: bytes, max_row_bytes: int) -> tuple[dict[str, Any] | None, list[Problem]]:
    problems: list[Problem] = []
    if len(raw) > max_row_bytes:
        problems.append(("<row>", f"{len(raw)} bytes, over the limit of {max_row_bytes}"))
    try:
        row = json.loads(raw.decode("utf-8"))
    except UnicodeDecodeError as e:
        return None, problems + [("<row>", f"not valid UTF-8: {e.reason} at byte {e.start}")]
    except json.JSONDecodeError as e:
        return None, problems + [("<row>", f"not valid JSON: {e.msg} at column {e.colno}")]
    if not isinstance(row, dict):
        return None, problems + [("<row>", f"must be a JSON object, got {_kind(row)}")]
    return row, problems


def _check_row(row: dict[str, Any]) -> list[Problem]:
    problems = [(key, why) for key, why in RESERVED_KEYS.items() if key in row]
    problems += _check_messages(row.get("messages"))
    if "tools" in row:
        problems += _check_tools(row["tools"])
    return problems


def _check_messages(messages: Any) -> list[Problem]:
    if messages is None:
        return [("messages", "missing: each row needs a chat whose last message is from the user")]
    if not isinstance(messages, list):
        return [("messages", f"must be a list of messages, got {_kind(messages)}")]
    if not messages:
        return [("messages", "empty: the last message must be from 'user'")]
    problems: list[Problem] = []
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"must be an object, got {_kind(message)}"))
            continue
        if message.get("role") not in ROLES:
            problems.append((f"{where}.role", f"must be one of {'|'.join(ROLES)}, {_got(message, 'role')}"))
        if not isinstance(message.get("content"), str):
            problems.append((f"{where}.content", f"must be a string, {_got(message, 'content')}"))
    last = messages[-1]
    # A last message with an invalid role was reported above; repeating it adds nothing.
    if isinstance(last, dict) and last.get("role") in ROLES and last["role"] != "user":
        where = f"messages[{len(messages) - 1}].role"
        problems.append((where, f"the last message must be from 'user', got {last['role']!r}"))
    return problems


def _check_tools(tools: Any) -> list[Problem]:
    if not isinstance(tools, list):
        return [("tools", f"must be a list of function schemas, got {_kind(tools)}")]
    problems: list[Problem] = []
    first_index: dict[str, int] = {}
    for j, tool in enumerate(tools):
        where = f"tools[{j}]"
        if not isinstance(tool, dict):
            problems.append((where, f'must be {{"type": "function", "function": {{...}}}}, got {_kind(tool)}'))
            continue
        if tool.get("type") != "function":
            problems.append((f"{where}.type", f"must be 'function', {_got(tool, 'type')}"))
        fn = tool.get("function")
        if not isinstance(fn, dict):
            problems.append((f"{where}.function", f"must be an object with a name, {_got(tool, 'function')}"))
            continue
        name = fn.get("name")
        if not isinstance(name, str) or not TOOL_NAME.match(name):
            problems.append((f"{where}.function.name", f"must match {TOOL_NAME.pattern}, {_got(fn, 'name')}"))
        elif name in first_index:
            duplicate = f"duplicate tool name {name!r} (also tools[{first_index[name]}])"
            problems.append((f"{where}.function.name", duplicate))
        else:
            first_index[name] = j
        if "description" in fn and not isinstance(fn["description"], str):
            problems.append((f"{where}.function.description", f"must be a string, {_got(fn, 'description')}"))
        params = fn.get("parameters")
        if "parameters" in fn and not (isinstance(params, dict) and params.get("type") == "object"):
            problems.append((f"{where}.function.parameters", 'must be a JSON schema with "type": "object"'))
    return problems


def _tool_names(row: dict[str, Any]) -> list[tuple[int, str]]:
    """(index, name) of each tool schema in a row that has a string name."""
    tools = row.get("tools")
    if not isinstance(tools, list):
        return []
    return [
        (j, tool["function"]["name"])
        for j, tool in enumerate(tools)
        if isinstance(tool, dict)
        and isinstance(tool.get("function"), dict)
        and isinstance(tool["function"].get("name"), str)
    ]


_JSON_TYPES = {dict: "object", list: "array", str: "string", bool: "boolean", int: "number", float: "number"}


def _kind(value: Any) -> str:
    """A value's JSON type name, to say what was found instead."""
    return "null" if value is None else _JSON_TYPES.get(type(value), type(value).__name__)


def _got(obj: dict[str, Any], key: str) -> str:
    """What a field holds, for a message: missing, a short value's repr, or its JSON type."""
    if key not in obj:
        return "missing"
    value = obj[key]
    return f"got {value!r}" if isinstance(value, str) and len(value) <= 40 else f"got {_kind(value)}"
