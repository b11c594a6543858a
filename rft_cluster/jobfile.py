"""Reading a job file (YAML, or JSON by its `.json` suffix) safely, with the line of every key.

Whatever the bytes, the result is the document or a `SpecError` whose problems are one line each,
`"{path}:{line}: {message}"`: non-UTF-8 bytes, control characters, syntax errors, nesting deeper
than `MAX_DEPTH`, more than `MAX_VALUES` values or `MAX_JOB_BYTES` of text once YAML aliases
are expanded (an alias bomb is refused while it is being parsed, before anything is expanded; a
JSON file is counted before it is parsed), YAML values with no JSON form (`!!binary`, dates,
`!!set`), and a key given twice (YAML and JSON parsers both keep the later value silently). Then
`${VAR}`s are expanded (`expand_env`), within the same byte budget; `$${` is a literal `${`.
"""

from __future__ import annotations

import bisect
import json
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_JOB_BYTES = 4 * 2**20
MAX_DEPTH = 64  # a job nests about 8 deep
MAX_VALUES = 100_000  # values in the document once its YAML aliases are expanded
# Per value, what a scalar costs beyond its text once parsed (a Python object): counted with the
# text so a million tiny values and a few huge strings hit the same byte budget.
VALUE_OVERHEAD_BYTES = 16
KeyPath = tuple[str, ...]

# `${NAME}`: the only form that is expanded; `$${` is the escape for a literal `${`.
ENV_REF = re.compile(r"(?<!\$)\$\{([A-Za-z_][A-Za-z0-9_]*)\}")
ESCAPED = "$${"
# Anything else that looks meant as a variable: `${1BAD}`, `${}`, `${A` (errors); `$NAME` (a warning).
_BRACED = re.compile(r"(?<!\$)\$\{[^}]*\}?")
_BARE = re.compile(r"(?<!\$)\$([A-Za-z_][A-Za-z0-9_]*)")
# One pass over a string: an escape, a reference, or a malformed reference.
_DOLLAR = re.compile(r"\$\$\{|\$\{([A-Za-z_][A-Za-z0-9_]*)\}|\$\{[^}]*\}?")
# YAML values SafeLoader builds that JSON has no form for: they would fail when the job is
# written as JSON (the run's config) or sent.
_NOT_JSON_TAGS = {f"tag:yaml.org,2002:{t}": t for t in ("binary", "timestamp", "set", "omap", "pairs")}
# C0 controls but tab, and DEL: they break header lines (CR/LF) and terminals.
CONTROL = re.compile(r"[\x00-\x08\x0a-\x1f\x7f]")


class SpecError(Exception):
    """A problem with a job file; `problems` are "file:line: field: message" strings."""

    def __init__(self, problems: list[str]):
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass
class Document:
    data: Any
    lines: dict[KeyPath, int]  # key path -> 1-based line of the key (or of the value, for the root and list items)

    def line(self, path: KeyPath) -> int:
        """The line of `path`, or of its nearest ancestor in the file (a missing field)."""
        return next((self.lines[path[:i]] for i in range(len(path), -1, -1) if path[:i] in self.lines), 1)


def unreadable(path: Path) -> str | None:
    """Why `path` cannot be read as a regular file (a FIFO or device would block or never end), or None."""
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return "no such file"
    except OSError as e:  # ELOOP: a symlink loop; EACCES, ENAMETOOLONG...
        return e.strerror or type(e).__name__
    return None if stat.S_ISREG(mode) else ("a directory" if stat.S_ISDIR(mode) else "not a regular file")


def read_document(path: Path) -> Document:
    """The job file's document and key lines; raises SpecError naming the file and line."""
    if (reason := unreadable(path)) is not None:
        raise SpecError([f"{path}: cannot read: {reason}"])
    try:
        with path.open("rb") as f:
            raw = f.read(MAX_JOB_BYTES + 1)
    except OSError as e:
        raise SpecError([f"{path}: cannot read: {e.strerror}"]) from None
    if len(raw) > MAX_JOB_BYTES:
        raise SpecError([f"{path}: over {MAX_JOB_BYTES // 2**20} MiB: not a job file"])
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise SpecError([f"{path}:{line}: not valid UTF-8 ({e.reason} at byte {e.start}): a job file is UTF-8 text"]) from None
    reader = _read_json if path.suffix == ".json" else _read_yaml
    problems: list[tuple[int, str]] = []
    doc = reader(text, problems)
    if problems:
        raise SpecError([f"{path}:{line}: {message}" for line, message in problems])
    assert doc is not None
    return doc


def _read_json(text: str, problems: list[tuple[int, str]]) -> Document | None:
    # Counted before parsing: a few MB of `[],` would be millions of Python objects.
    values = depth = 0
    for m in _JSON_TOKEN.finditer(text):
        token = m.group()
        depth += (token in "[{") - (token in "]}")
        values += token not in ",:]}"
        if depth > MAX_DEPTH:
            problems.append((text.count("\n", 0, m.start()) + 1, f"not a job: nested deeper than {MAX_DEPTH} levels"))
            return None
        if values > MAX_VALUES:
            problems.append((text.count("\n", 0, m.start()) + 1, f"more than {MAX_VALUES} values: refused"))
            return None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        problems.append((e.lineno, f"not valid JSON: {e.msg} (column {e.colno})"))
        return None
    except RecursionError:
        problems.append((1, f"not a job: nested deeper than {MAX_DEPTH} levels"))
        return None
    except ValueError as e:  # an integer over Python's digit limit
        problems.append((1, f"not valid JSON: {e}"))
        return None
    lines = _json_lines(text, problems)
    return Document(data, lines)


_JSON_TOKEN = re.compile(r'"(?:[^"\\]|\\.)*"|[{}\[\],:]|[^\s{}\[\],:"]+', re.DOTALL)


@dataclass
class _Open:
    """A JSON container being walked: its path, and the object's keys so far or the array's index."""

    path: KeyPath
    is_object: bool
    keys: dict[str, int] = field(default_factory=dict)
    key: str | None = None
    expect_key: bool = True
    index: int = 0


def _json_lines(text: str, problems: list[tuple[int, str]]) -> dict[KeyPath, int]:
    """Key lines of valid JSON text, found by a flat scan (no recursion: any depth is safe);
    reports keys given twice."""
    newlines = [m.start() for m in re.finditer("\n", text)]
    lines: dict[KeyPath, int] = {}
    stack: list[_Open] = []

    def child_path() -> KeyPath:
        if not stack:
            return ()
        top = stack[-1]
        return top.path + ((top.key or ""),) if top.is_object else top.path + (str(top.index),)

    for m in _JSON_TOKEN.finditer(text):
        token, line = m.group(), bisect.bisect(newlines, m.start()) + 1
        top = stack[-1] if stack else None
        if token in "}]":
            stack.pop()
        elif token == ",":
            assert top is not None
            top.expect_key, top.index = True, top.index + 1
        elif token == ":":
            assert top is not None
            top.expect_key = False
        elif top is not None and top.is_object and top.expect_key:
            key = json.loads(token)
            if key in top.keys:
                dotted = ".".join(top.path + (key,))
                problems.append((line, f"{dotted}: duplicate key (first at line {top.keys[key]}); JSON keeps only the later value"))
            top.keys[key], top.key = line, key
            lines[top.path + (key,)] = line
        else:
            path = child_path()
            lines.setdefault(path, line)
            if token in "{[":  # depth was bounded before parsing
                stack.append(_Open(path, token == "{"))
    return lines


def _read_yaml(text: str, problems: list[tuple[int, str]]) -> Document | None:
    try:
        if not _yaml_within_limits(text, problems):
            return None
        loader = yaml.SafeLoader(text)
        try:
            node = loader.get_single_node()
            lines: dict[KeyPath, int] = {}
            if node is not None:  # walked before construction, which merges `<<` keys into the nodes
                _yaml_walk(node, (), lines, problems)
            data = loader.construct_document(node) if node is not None else None
        finally:
            loader.dispose()
    except yaml.YAMLError as e:
        problems.append(_yaml_problem(text, e))
        return None
    return Document(data, lines)


def _yaml_within_limits(text: str, problems: list[tuple[int, str]]) -> bool:
    """Checks depth and the size after alias expansion (values and bytes) on the event stream,
    which is flat and never expands an alias: a billion-laughs file stops here after a few hundred events."""
    sizes: dict[str, tuple[int, int]] = {}  # anchor -> (values, bytes) it stands for
    open_sizes: list[tuple[int, int]] = []  # (values, bytes) so far in each open collection
    open_anchors: list[str | None] = []
    total = total_bytes = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        line = event.start_mark.line + 1
        if isinstance(event, yaml.CollectionStartEvent):
            if len(open_sizes) >= MAX_DEPTH:
                problems.append((line, f"not a job: nested deeper than {MAX_DEPTH} levels"))
                return False
            open_sizes.append((1, VALUE_OVERHEAD_BYTES))
            open_anchors.append(event.anchor)
            total += 1
            total_bytes += VALUE_OVERHEAD_BYTES
        elif isinstance(event, yaml.CollectionEndEvent):
            size, anchor = open_sizes.pop(), open_anchors.pop()
            if anchor is not None:
                sizes[anchor] = size
            if open_sizes:
                open_sizes[-1] = (open_sizes[-1][0] + size[0], open_sizes[-1][1] + size[1])
        elif isinstance(event, yaml.AliasEvent) and event.anchor in open_anchors:
            problems.append((line, f"YAML alias *{event.anchor} refers to a collection that holds it: a job is not recursive"))
            return False
        elif isinstance(event, (yaml.ScalarEvent, yaml.AliasEvent)):
            if isinstance(event, yaml.AliasEvent):
                size = sizes.get(event.anchor, (1, VALUE_OVERHEAD_BYTES))
            else:
                size = (1, len(event.value.encode("utf-8", "surrogatepass")) + VALUE_OVERHEAD_BYTES)
                if event.anchor is not None:
                    sizes[event.anchor] = size
            if open_sizes:
                open_sizes[-1] = (open_sizes[-1][0] + size[0], open_sizes[-1][1] + size[1])
            total += size[0]
            total_bytes += size[1]
        if total > MAX_VALUES:
            problems.append((line, f"more than {MAX_VALUES} values once YAML aliases are expanded: refused (an alias bomb?)"))
            return False
        if total_bytes > MAX_JOB_BYTES:
            problems.append((line, f"over {MAX_JOB_BYTES // 2**20} MiB once YAML aliases are expanded: refused (an alias bomb?)"))
            return False
    return True


def _yaml_problem(text: str, e: yaml.YAMLError) -> tuple[int, str]:
    if isinstance(e, yaml.reader.ReaderError):
        line = text[: e.position].count("\n") + 1
        return line, f"not valid YAML: character U+{e.character:04X} is not allowed"
    mark = getattr(e, "problem_mark", None) or getattr(e, "context_mark", None)
    line = mark.line + 1 if mark is not None else 1
    what = "; ".join(str(part) for part in (getattr(e, "context", None), getattr(e, "problem", None)) if part)
    where = f" (column {mark.column + 1})" if mark is not None else ""
    return line, f"not valid YAML: {what or e}{where}"


def _yaml_walk(node: yaml.Node, path: KeyPath, lines: dict[KeyPath, int], problems: list[tuple[int, str]]) -> None:
    lines.setdefault(path, node.start_mark.line + 1)
    if node.tag in _NOT_JSON_TAGS:
        what = f"{'.'.join(path) or '<root>'}: a YAML {_NOT_JSON_TAGS[node.tag]} has no JSON form"
        problems.append((node.start_mark.line + 1, f"{what}: a job holds strings, numbers, booleans, null, lists and mappings (quote it)"))
        return
    if isinstance(node, yaml.MappingNode):
        first: dict[str, int] = {}
        for k, v in node.value:
            key, line = str(k.value), k.start_mark.line + 1
            if k.tag not in ("tag:yaml.org,2002:str", "tag:yaml.org,2002:merge"):
                problems.append((line, f"{'.'.join(path + (key,))}: a key must be a string, got YAML {k.tag.rpartition(':')[2]} (quote it)"))
            if isinstance(k, yaml.ScalarNode) and key != "<<":
                if key in first:
                    dotted = ".".join(path + (key,))
                    problems.append((line, f"{dotted}: duplicate key (first at line {first[key]}); YAML keeps only the later value"))
                first.setdefault(key, line)
            _yaml_walk(v, path + (key,), lines, problems)
            lines[path + (key,)] = line
    elif isinstance(node, yaml.SequenceNode):
        for i, v in enumerate(node.value):
            _yaml_walk(v, path + (str(i),), lines, problems)


class _Tally:
    """Distinct messages, each with its first key path and how many places said it: a message
    repeated by aliases or a long string is one line, not a million."""

    def __init__(self) -> None:
        self._found: dict[str, list[Any]] = {}  # message -> [first path, count]

    def add(self, path: KeyPath, message: str) -> None:
        self._found.setdefault(message, [path, 0])[1] += 1

    def lines(self) -> list[tuple[KeyPath, str]]:
        return [(path, message if n == 1 else f"{message} ({n} places; the first is here)") for message, (path, n) in self._found.items()]


@dataclass
class EnvFindings:
    """What `expand_env` found: errors and warnings, each (key path, message) once with a count."""

    _errors: _Tally = field(default_factory=_Tally)
    _warnings: _Tally = field(default_factory=_Tally)
    expanded: dict[str, str] = field(default_factory=dict)  # variable -> value, for the redactor
    text_bytes: int = 0  # of every string once expanded, aliases counted each time
    over_cap: bool = False  # text_bytes would pass MAX_JOB_BYTES: reported once, nothing more is expanded
    # variable -> what is wrong with its value (None: nothing): checked once, however often aliases repeat it
    _value_problems: dict[str, str | None] = field(default_factory=dict)

    @property
    def errors(self) -> list[tuple[KeyPath, str]]:
        return self._errors.lines()

    @property
    def warnings(self) -> list[tuple[KeyPath, str]]:
        return self._warnings.lines()


def expand_env(node: Any, environ: Mapping[str, str], unset_env_ok: bool, found: EnvFindings, path: KeyPath = ()) -> Any:
    """Replaces `${VAR}` in every string with its value in `environ` (secrets stay out of files),
    and `$${` with a literal `${`. An unset variable is an error unless `unset_env_ok` (then it is
    left as written); so is an empty one, one holding a line break or control character (it
    would split a header), a malformed `${...}`, and text over MAX_JOB_BYTES once expanded (then
    the rest is returned as it is: the job is refused); a bare `$VAR`, left as written, is a
    warning. Messages never hold values."""
    if found.over_cap:
        return node
    if isinstance(node, dict):
        return {k: expand_env(v, environ, unset_env_ok, found, path + (str(k),)) for k, v in node.items()}
    if isinstance(node, list):
        return [expand_env(v, environ, unset_env_ok, found, path + (str(i),)) for i, v in enumerate(node)]
    if not isinstance(node, str):
        return node
    expanded = _expand_string(node, environ, unset_env_ok, found, path) if "$" in node else node
    found.text_bytes += len(expanded)
    if found.over_cap or found.text_bytes > MAX_JOB_BYTES:
        found.over_cap = True
        found._errors.add(path, f"over {MAX_JOB_BYTES // 2**20} MiB of text once YAML aliases and ${{VAR}}s are expanded: refused")
    return expanded


def _expand_string(node: str, environ: Mapping[str, str], unset_env_ok: bool, found: EnvFindings, path: KeyPath) -> str:
    """`node` expanded, up to the point where the text would pass MAX_JOB_BYTES (then `found.over_cap`)."""
    for m in _BARE.finditer(node):
        found._warnings.add(path, f"${m.group(1)} is left as written (only ${{{m.group(1)}}} reads the environment)")
    grown = 0  # characters the substitutions added to this string

    def sub(m: re.Match[str]) -> str:
        nonlocal grown
        if m.group() == ESCAPED:
            grown -= 1
            return "${"
        name = m.group(1)
        if name is None:
            found._errors.add(path, f"{m.group()!r} is not a variable reference: write ${{NAME}}, NAME of letters, digits and _ "
                                    f"not starting with a digit (a literal ${{ is written {ESCAPED})")
            return m.group()
        value = environ.get(name)
        if value is None:
            if not unset_env_ok:
                found._errors.add(path, f"environment variable ${{{name}}} is not set")
            return m.group()
        if name not in found._value_problems:
            found._value_problems[name] = _value_problem(name, value)
        if (problem := found._value_problems[name]) is not None:
            found._errors.add(path, problem)
        found.expanded[name] = value
        if found.over_cap or found.text_bytes + len(node) + grown + len(value) > MAX_JOB_BYTES:
            found.over_cap = True
            return m.group()  # refused; never built
        grown += len(value) - len(m.group())
        return value

    return _DOLLAR.sub(sub, node)


def _value_problem(name: str, value: str) -> str | None:
    if not value:
        return f"environment variable ${{{name}}} is set but empty"
    if CONTROL.search(value):
        return f"environment variable ${{{name}}} holds a line break or control character"
    return None
