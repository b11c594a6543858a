"""Dataset rows (JSONL; docs/architecture.md §3): checked up front, every problem reported at once.

A row is `{"messages": [...], "tools": [...], ...reference data}`. `messages` is a chat whose last
message is from the user; `tools` are Chat Completions function schemas; every other key is the
row's reference data, which tools and graders receive as `item`. As in OpenAI's format, a
message's `content` is a string or a list of text parts (`load_rows` joins them into a string),
and an assistant message with `tool_calls` may have `content: null`. A row is strict JSON: no
NaN/Infinity, no key twice, no lone surrogate (it could not be written as UTF-8), at most
`MAX_ROW_DEPTH` levels deep.

Problems read `"{path}:{line}: {field}: {message}"` (lines 1-based, fields like
`messages[2].role`; `<row>` for the row as a whole); problems with the file itself read
`"{path}: {message}"`, as in `config.load_job`.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any, BinaryIO

from jsonschema import Draft202012Validator, SchemaError

from rft_cluster.config import TOOL_NAME, JobSpec, SpecError, load_job
from rft_cluster.formats import choose_tool_call_parser, local_chat_template
from rft_cluster.graders.template import TemplateError, lookup, placeholders
from rft_cluster.jobfile import unreadable
from rft_cluster.preflight import preflight_problems
from rft_cluster.types import grader_sample

ROLES = ("system", "developer", "user", "assistant", "tool")
DEFAULT_MAX_ROW_BYTES = 1_000_000
MAX_ROW_DEPTH = 64
# Lines a row's (and a file's) problems take at most; the rest are counted: 20,000 bad roles in
# one row are one kind of mistake, not 20,000 lines to read.
MAX_PROBLEMS_PER_ROW = 20
MAX_PROBLEMS_PER_FILE = 100
# Byte-order marks of encodings that are not UTF-8 (UTF-32 LE first: it starts with UTF-16 LE's).
_BOMS = ((codecs.BOM_UTF32_LE, "UTF-32"), (codecs.BOM_UTF32_BE, "UTF-32"), (codecs.BOM_UTF16_LE, "UTF-16"), (codecs.BOM_UTF16_BE, "UTF-16"))
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
    """The rows of a dataset, text parts joined; raises DatasetError listing every problem if it has any."""
    rows, problems = _scan(Path(path), max_row_bytes)
    if problems:
        raise DatasetError(problems)
    return [_join_text_parts(row) for _, row in rows]


def validate_job_and_data(job_path: Path, unset_env_ok: bool = False) -> list[str]:
    """Every problem of a job file and its datasets (`unset_env_ok`: see `load_job`)."""
    return check_job_and_data(job_path, unset_env_ok)[0]


def check_job_and_data(job_path: Path, unset_env_ok: bool = False, output: str | Path | None = None) -> tuple[list[str], list[str]]:
    """(problems, warnings) of a job file and its datasets, the job checked against the rows:
    tool names the rows use but the job does not declare, a batch larger than the training
    set, and grader templates naming an `item` field a row lacks; then, for a job and data
    without problems, what `train` builds before it starts (`preflight`; `output`: `--output`).
    No line shows a `${VAR}`'s value (a path may hold one)."""
    try:
        job = load_job(job_path, unset_env_ok)
    except SpecError as e:
        return e.problems, []
    problems = _job_and_data_problems(job, output)
    return [job.redactor.text(p) for p in problems], [job.redactor.text(w) for w in job.warnings]


def _job_and_data_problems(job: JobSpec, output: str | Path | None) -> list[str]:
    declared = {tool.name for tool in job.rl.tools}
    problems: list[str] = []
    scanned: list[tuple[Path, list[tuple[int, dict[str, Any]]]]] = []
    for data_file in filter(None, [job.training_file, job.validation_file]):
        path = job.resolve_path(data_file)
        rows, row_problems = _scan(path, DEFAULT_MAX_ROW_BYTES)
        problems += row_problems
        scanned.append((path, rows))
        for line, row in rows:
            for where, name in _tool_names(row):
                if name not in declared:
                    problems.append(
                        f"{path}:{line}: {where}: tool {name!r} is not declared "
                        f"in the job's method.reinforcement.tools (declared: {sorted(declared)})"
                    )
    train_path, train_rows = scanned[0]
    try:
        if train_rows:  # none: the file's problem is reported already
            job.rl.hyperparameters.resolved(len(train_rows))
    except ValueError as e:  # values that only fail against the data
        problems.append(f"{job.locate('method', 'reinforcement', 'hyperparameters', 'batch_size')}: {e} ({train_path})")
    problems += _template_problems(job, scanned)
    problems += _format_problems(job)
    if not problems:  # the rows are sound: what train builds from them can be built
        problems += preflight_problems(job, [(path, _join_text_parts(rows[0][1])) for path, rows in scanned], output)
    return problems


def _format_problems(job: JobSpec) -> list[str]:
    """`tool_call_parser: auto` needs a chat template that shows the model's call format: checked
    here when a local model directory holds a template (a hub model's, or a directory's without
    one, is checked when its engines start, which need the tokenizer anyway)."""
    model = job.resolve_path(job.model)
    template = local_chat_template(model) if model.is_dir() else None
    if job.cluster.engine.tool_call_parser != "auto" or template is None:
        return []
    try:
        choose_tool_call_parser(template)
    except ValueError as e:
        return [f"{job.locate('cluster', 'engine', 'tool_call_parser')}: {e}"]
    return []


# The keys of the `sample` a grader sees (its values do not matter here).
_SAMPLE_KEYS = dict.fromkeys(grader_sample("", []))


def _grader_templates(grader: Any, key_path: tuple[str, ...]) -> list[tuple[tuple[str, ...], str]]:
    """(key path, template) of every template in a grader config, sub-graders included."""
    if grader.type == "multi":
        return [t for name, sub in grader.graders.items() for t in _grader_templates(sub, key_path + ("graders", name))]
    if grader.type in ("string_check", "text_similarity"):
        return [(key_path + ("input",), grader.input), (key_path + ("reference",), grader.reference)]
    if grader.type == "score_model":
        return [(key_path + ("input", str(i), "content"), m.content) for i, m in enumerate(grader.input)]
    return []  # endpoint and python graders receive the whole item


def _template_problems(job: JobSpec, scanned: list[tuple[Path, list[tuple[int, dict[str, Any]]]]]) -> list[str]:
    """A template variable that no grade could render: an unknown `sample` field, or an `item`
    field missing from a row (the first such row is named, with how many more lack it)."""
    problems = []
    for key_path, template in _grader_templates(job.rl.grader, ("method", "reinforcement", "grader")):
        for variable in placeholders(template):
            if not variable.startswith("item."):
                try:  # only the sample's top-level keys are known before a rollout
                    lookup(".".join(variable.split(".")[:2]), {"item": {}, "sample": _SAMPLE_KEYS})
                except TemplateError as e:
                    problems.append(f"{job.locate(*key_path)}: {e}")
                continue
            lacking: list[tuple[Path, int, str]] = []
            for path, rows in scanned:
                for line, row in rows:
                    try:
                        lookup(variable, {"item": row_item(row)})
                    except TemplateError as e:
                        lacking.append((path, line, str(e)))
            if lacking:
                path, line, why = lacking[0]
                more = f" (and {len(lacking) - 1} more rows)" if len(lacking) > 1 else ""
                problems.append(f"{job.locate(*key_path)}: {why} in the row at {path}:{line}{more}")
    return problems


Problem = tuple[str, str]  # (field, message), located by the caller


def _scan(path: Path, max_row_bytes: int) -> tuple[list[tuple[int, dict[str, Any]]], list[str]]:
    """(line, row) for every line that parsed as an object, and every problem found (at most
    MAX_PROBLEMS_PER_FILE lines, then their count)."""
    if (reason := unreadable(path)) is not None:  # a FIFO or device would block or never end
        return [], [f"{path}: cannot read: {reason}"]
    try:
        f = path.open("rb")
    except OSError as e:
        return [], [f"{path}: cannot read: {e.strerror}"]
    rows: list[tuple[int, dict[str, Any]]] = []
    problems: list[str] = []
    unlisted = not_utf8 = 0
    with f:
        if encoding := _foreign_encoding(f.read(4)):
            return [], [f"{path}: encoded as {encoding}: a dataset is UTF-8 JSONL (convert it, e.g. `iconv -f {encoding} -t UTF-8`)"]
        f.seek(0)
        for line, raw in _lines(f, max_row_bytes):
            if isinstance(raw, int):
                found: list[Problem] = [("<row>", f"{raw} bytes, over the limit of {max_row_bytes}: not read")]
            elif not raw.strip():
                continue  # blank lines (e.g. a trailing one) are not rows
            else:
                row, found = _parse_line(raw[3:] if line == 1 and raw.startswith(codecs.BOM_UTF8) else raw)
                if row is not None:
                    rows.append((line, row))
                    found += _check_row(row)
            if found and found[-1][1].startswith("not valid UTF-8"):
                not_utf8 += 1
                if not_utf8 > 1:  # the encoding is said once, the lines counted
                    continue
            if len(found) > MAX_PROBLEMS_PER_ROW:
                found = found[:MAX_PROBLEMS_PER_ROW] + [("<row>", f"and {len(found) - MAX_PROBLEMS_PER_ROW} more problems in this row")]
            room = MAX_PROBLEMS_PER_FILE - len(problems)
            problems += [f"{path}:{line}: {field}: {message}" for field, message in found[:room]]
            unlisted += max(0, len(found) - room)
    if not_utf8 > 1:
        problems.append(f"{path}: {not_utf8 - 1} more lines are not valid UTF-8: a dataset is UTF-8 JSONL (is the file in another encoding?)")
    if unlisted:
        problems.append(f"{path}: and {unlisted} more problems (the first {MAX_PROBLEMS_PER_FILE} are listed)")
    if not rows and not problems:
        problems.append(f"{path}: empty: the dataset has no rows")
    return rows, problems


def _foreign_encoding(head: bytes) -> str | None:
    """The encoding a dataset's first bytes show when it is not UTF-8: a UTF-16/32 byte-order
    mark, or UTF-16 without one (ASCII with a NUL byte beside each character)."""
    for bom, name in _BOMS:
        if head.startswith(bom):
            return name
    if len(head) >= 2 and (head[0] == 0) != (head[1] == 0):
        return "UTF-16"
    return None


def _lines(f: BinaryIO, max_row_bytes: int) -> Iterator[tuple[int, bytes | int]]:
    """(line number, bytes without the line break) of each line; a line over `max_row_bytes` is
    skipped without being held, as (line number, its size). Lines break at `\n` only: JSON
    allows U+2028 and friends unescaped inside strings."""
    line = 0
    while chunk := f.readline(max_row_bytes + 2):
        line += 1
        ended = chunk.endswith(b"\n")
        content = chunk[:-1] if ended else chunk
        if len(content) <= max_row_bytes:
            yield line, content.removesuffix(b"\r")
            continue
        size = len(content)
        while not ended and (chunk := f.readline(2**20)):
            ended = chunk.endswith(b"\n")
            size += len(chunk) - ended
        yield line, size


def _parse_line(raw: bytes) -> tuple[dict[str, Any] | None, list[Problem]]:
    problems: list[Problem] = []
    try:
        row = json.loads(raw.decode("utf-8"), object_pairs_hook=_unique_keys, parse_constant=_not_json)
    except UnicodeDecodeError as e:
        return None, problems + [("<row>", f"not valid UTF-8: {e.reason} at byte {e.start}")]
    except json.JSONDecodeError as e:
        return None, problems + [("<row>", f"not valid JSON: {e.msg} at column {e.colno}")]
    except RecursionError:
        return None, problems + [("<row>", f"nested deeper than {MAX_ROW_DEPTH} levels")]
    except ValueError as e:  # from the hooks below, or an integer over Python's digit limit
        return None, problems + [("<row>", str(e))]
    if not isinstance(row, dict):
        return None, problems + [("<row>", f"must be a JSON object, got {_kind(row)}")]
    return row, problems + _unwritable(row)


def _unique_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    keys = [k for k, _ in pairs]
    if len(set(keys)) < len(keys):
        twice = sorted({k for k in keys if keys.count(k) > 1})
        raise ValueError(f"key {twice[0]!r} appears twice in one object; JSON readers would keep only the later value")
    return dict(pairs)


def _not_json(constant: str) -> Any:
    raise ValueError(f"{constant} is not JSON (Python writes it for a float that is not finite): use null or a string")


def _unwritable(row: dict[str, Any]) -> list[Problem]:
    """Nesting over MAX_ROW_DEPTH, and strings with a lone surrogate (valid JSON as an escape,
    but not encodable as UTF-8: the Parquet write would fail mid-run). Walked without recursion."""
    problems: list[Problem] = []
    stack: list[tuple[Any, int]] = [(row, 1)]
    while stack:
        value, depth = stack.pop()
        if depth > MAX_ROW_DEPTH:
            return [("<row>", f"nested deeper than {MAX_ROW_DEPTH} levels")]
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                problems.append(("<row>", f"a string holds a lone surrogate (\\u{ord(value[e.start]):04x}): not encodable as UTF-8"))
        elif isinstance(value, dict):
            stack += [(k, depth) for k in value] + [(v, depth + 1) for v in value.values()]
        elif isinstance(value, list):
            stack += [(v, depth + 1) for v in value]
    return problems[:1]


def _check_row(row: dict[str, Any]) -> list[Problem]:
    problems = [(key, why) for key, why in RESERVED_KEYS.items() if key in row]
    problems += _check_messages(row.get("messages"))
    if "tools" in row:
        problems += _check_tools(row["tools"])
        offered = {name for _, name in _function_names(row["tools"])}
        problems += [(where, f"calls {name!r}, which the row's tools do not declare")
                     for where, name in _tool_names(row) if where.startswith("messages") and name not in offered]
    return problems


def _check_messages(messages: Any) -> list[Problem]:
    if messages is None:
        return [("messages", "missing: each row needs a chat whose last message is from the user")]
    if not isinstance(messages, list):
        return [("messages", f"must be a list of messages, got {_kind(messages)}")]
    if not messages:
        return [("messages", "empty: the last message must be from 'user'")]
    problems: list[Problem] = []
    call_ids: set[str] = set()  # of the calls made so far: what a tool message answers
    for i, message in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(message, dict):
            problems.append((where, f"must be an object, got {_kind(message)}"))
            continue
        if message.get("role") not in ROLES:
            problems.append((f"{where}.role", f"must be one of {'|'.join(ROLES)}, {_got(message, 'role')}"))
        problems += _check_content(message, where)
        if "tool_calls" in message:
            problems += _check_tool_calls(message, where)
            calls = message["tool_calls"] if isinstance(message["tool_calls"], list) else []
            call_ids |= {c["id"] for c in calls if isinstance(c, dict) and isinstance(c.get("id"), str)}
        if message.get("role") == "tool" and not isinstance(message.get("tool_call_id"), str):
            problems.append((f"{where}.tool_call_id", f"a tool message answers a call: its tool_call_id must be the call's id, {_got(message, 'tool_call_id')}"))
        elif message.get("role") == "tool" and call_ids and message["tool_call_id"] not in call_ids:
            problems.append((f"{where}.tool_call_id", f"{_got(message, 'tool_call_id')}, the id of no earlier tool call"))
    last = messages[-1]
    # A last message with an invalid role was reported above; repeating it adds nothing.
    if isinstance(last, dict) and last.get("role") in ROLES and last["role"] != "user":
        where = f"messages[{len(messages) - 1}].role"
        problems.append((where, f"the last message must be from 'user', got {last['role']!r}"))
    return problems


def _check_content(message: dict[str, Any], where: str) -> list[Problem]:
    """A string, a list of text parts, or null in an assistant message that makes tool calls."""
    content = message.get("content")
    if isinstance(content, str):
        return []
    if content is None and message.get("role") == "assistant" and message.get("tool_calls"):
        return []
    if isinstance(content, list):
        return [
            (f"{where}.content[{k}]", 'must be a text part {"type": "text", "text": "..."} (only text is supported)')
            for k, part in enumerate(content)
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str))
        ]
    return [(f"{where}.content", f"must be a string or a list of text parts, {_got(message, 'content')}")]


def _check_tool_calls(message: dict[str, Any], where: str) -> list[Problem]:
    """An assistant's earlier tool calls, in Chat Completions form (arguments: a JSON string)."""
    calls = message["tool_calls"]
    if message.get("role") != "assistant":
        return [(f"{where}.tool_calls", "only an assistant message makes tool calls")]
    if not isinstance(calls, list):
        return [(f"{where}.tool_calls", f"must be a list, got {_kind(calls)}")]
    problems: list[Problem] = []
    for k, call in enumerate(calls):
        fn = call.get("function") if isinstance(call, dict) else None
        name, arguments = (fn.get("name"), fn.get("arguments")) if isinstance(fn, dict) else (None, None)
        if not (isinstance(name, str) and TOOL_NAME.fullmatch(name) and isinstance(arguments, str)):
            shape = '{"type": "function", "function": {"name": "...", "arguments": "<JSON object as a string>"}}'
            problems.append((f"{where}.tool_calls[{k}]", f"must be {shape}"))
    return problems


def _join_text_parts(row: dict[str, Any]) -> dict[str, Any]:
    """The row with each list of text parts as one string, as chat templates expect content."""
    messages = [
        {**m, "content": "".join(part["text"] for part in m["content"])} if isinstance(m.get("content"), list) else m
        for m in row["messages"]
    ]
    return {**row, "messages": messages}


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
        if not isinstance(name, str) or not TOOL_NAME.fullmatch(name):
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
        elif "parameters" in fn and (schema_problem := _schema_problem(params)):
            problems.append((f"{where}.function.parameters", schema_problem))
    return problems


def _schema_problem(schema: dict[str, Any]) -> str | None:
    """Why `schema` is not a valid JSON Schema (what the engine and the chat template are given)."""
    try:
        Draft202012Validator.check_schema(schema)
    except SchemaError as e:
        at = "/".join(str(p) for p in e.absolute_path) or "the root"
        return f"not a valid JSON Schema at {at}: {e.message[:200]}"
    return None


def _tool_names(row: dict[str, Any]) -> list[tuple[str, str]]:
    """(field, name) of each tool schema and each earlier call in a row that has a string name."""
    tools, messages = row.get("tools"), row.get("messages")
    found = [(f"tools[{j}].function.name", name) for j, name in _function_names(tools)]
    for i, message in enumerate(messages if isinstance(messages, list) else []):
        if isinstance(message, dict):
            found += [(f"messages[{i}].tool_calls[{k}].function.name", name) for k, name in _function_names(message.get("tool_calls"))]
    return found


def _function_names(entries: Any) -> list[tuple[int, str]]:
    """(index, name) of each `{"function": {"name": "..."}}` entry with a string name."""
    if not isinstance(entries, list):
        return []
    return [
        (j, entry["function"]["name"])
        for j, entry in enumerate(entries)
        if isinstance(entry, dict) and isinstance(entry.get("function"), dict) and isinstance(entry["function"].get("name"), str)
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
