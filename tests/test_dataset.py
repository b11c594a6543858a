from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from rft_cluster.dataset import DatasetError, check_dataset, load_rows, validate_job_and_data

USER = {"role": "user", "content": "What was ACME's 2021 revenue?"}


def tool(name: str, **function) -> dict:
    return {"type": "function", "function": {"name": name, **function}}


GOOD_ROWS = [
    {"messages": [{"role": "system", "content": "Be terse."}, USER], "answer": "12.5",
     "tools": [tool("search", description="BM25 search", parameters={"type": "object", "properties": {}}),
               tool("cat")]},
    {"messages": [USER, {"role": "assistant", "content": "a"}, {"role": "tool", "tool_call_id": "c1", "content": "b"},
                  {"role": "developer", "content": "c"}, {"role": "user", "content": "line\u2028sep"}],
     "answer": "7"},  # every row has what the job's grader template reads
]


def write_lines(path: Path, lines: list[str | bytes | dict]) -> Path:
    """Writes rows (dicts as JSON) and raw lines (str, bytes) as a JSONL file."""
    def encode(line: str | bytes | dict) -> bytes:
        if isinstance(line, dict):
            line = json.dumps(line, ensure_ascii=False)  # keeps U+2028 unescaped, as some writers do
        return line if isinstance(line, bytes) else line.encode()

    path.write_bytes(b"\n".join(map(encode, lines)) + b"\n")
    return path


def located(problems: list[str], path: Path) -> list[tuple[int, str]]:
    """(line, field) of each problem, checking the "{path}:{line}: {field}: {message}" shape."""
    out = []
    for problem in problems:
        m = re.match(rf"^{re.escape(str(path))}:(\d+): ([^ ]+): \S", problem)
        assert m, problem
        out.append((int(m[1]), m[2]))
    return out


def test_every_problem_is_reported_with_line_and_field(tmp_path: Path) -> None:
    bad_tools = [
        {"type": "func", "function": {"name": "bad name!", "description": 5, "parameters": {"type": "array"}}},
        "search",
        {"type": "function"},
        tool("search"),
        tool("search"),
    ]
    path = write_lines(tmp_path / "bad.jsonl", [
        GOOD_ROWS[0],                                                                  # 1
        '{"messages": [',                                                              # 2
        "[1, 2]",                                                                      # 3
        {"answer": 1},                                                                 # 4
        {"messages": "hi"},                                                            # 5
        {"messages": [{"role": "bot", "content": "x"}, {"role": "user", "content": ["x"]}]},  # 6
        {"messages": [USER, {"role": "assistant", "content": "a"}]},                   # 7
        {"messages": [USER], "tools": {"search": {}}},                                 # 8
        {"messages": [USER], "tools": bad_tools},                                      # 9
        {"messages": [USER], "sample": {}, "trace_id": "t"},                           # 10
        "",                                                                            # 11: blank, skipped
        {"messages": [{"role": "user", "content": "x" * 600}]},                        # 12
        b'{"messages": "\xff"}',                                                       # 13
        {"messages": [], "answer": 3},                                                 # 14
        {"messages": [{"content": "no role"}, 7]},                                     # 15
    ])
    problems = check_dataset(path, max_row_bytes=500)
    assert sorted(located(problems, path)) == sorted([
        (2, "<row>"),
        (3, "<row>"),
        (4, "messages"),
        (5, "messages"),
        (6, "messages[0].role"), (6, "messages[1].content[0]"),
        (7, "messages[1].role"),
        (8, "tools"),
        (9, "tools[0].type"), (9, "tools[0].function.name"), (9, "tools[0].function.description"),
        (9, "tools[0].function.parameters"), (9, "tools[1]"), (9, "tools[2].function"),
        (9, "tools[4].function.name"),
        (10, "sample"), (10, "trace_id"),
        (12, "<row>"),
        (13, "<row>"),
        (14, "messages"),
        (15, "messages[0].role"), (15, "messages[1]"),
    ])
    text = "\n".join(problems)
    for expected in (
        "2: <row>: not valid JSON",
        "3: <row>: must be a JSON object, got array",
        "6: messages[0].role: must be one of system|developer|user|assistant|tool, got 'bot'",
        "6: messages[1].content[0]: must be a text part",
        "7: messages[1].role: the last message must be from 'user', got 'assistant'",
        "9: tools[4].function.name: duplicate tool name 'search' (also tools[3])",
        "10: sample: reserved",
        "bytes, over the limit of 500",
        "13: <row>: not valid UTF-8",
        "15: messages[0].role: must be one of system|developer|user|assistant|tool, missing",
    ):
        assert expected in text


def test_good_file_has_no_problems_and_loads(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "good.jsonl", GOOD_ROWS)
    assert check_dataset(path) == []
    assert load_rows(path) == GOOD_ROWS  # U+2028 inside a string did not split the row


def test_load_rows_raises_with_all_problems(tmp_path: Path) -> None:
    path = write_lines(tmp_path / "bad.jsonl", ["nope", {"messages": []}])
    with pytest.raises(DatasetError) as err:
        load_rows(path)
    assert located(err.value.problems, path) == [(1, "<row>"), (2, "messages")]


def test_empty_and_missing_files(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n\n")
    assert check_dataset(empty) == [f"{empty}: empty: the dataset has no rows"]
    [problem] = check_dataset(tmp_path / "missing.jsonl")
    assert problem.startswith(f"{tmp_path / 'missing.jsonl'}: cannot read:")


def write_job(tmp_path: Path, tools: list[str], **extra: str) -> Path:
    job = {
        "model": "tiny",
        "training_file": "train.jsonl",
        **extra,
        "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"},
            "tools": [{"name": name, "server_url": "http://127.0.0.1:1/tools"} for name in tools],
        }},
    }
    path = tmp_path / "job.yaml"
    path.write_text(json.dumps(job))  # JSON is YAML
    return path


def test_job_with_undeclared_tool_names_the_row(tmp_path: Path) -> None:
    write_lines(tmp_path / "train.jsonl", [GOOD_ROWS[1], GOOD_ROWS[0]])  # row 2 uses search and cat
    job = write_job(tmp_path, ["search"], validation_file="valid.jsonl")
    problems = validate_job_and_data(job)
    train = tmp_path / "train.jsonl"
    assert problems[0] == (
        f"{train}:2: tools[1].function.name: tool 'cat' is not declared in the job's "
        "method.reinforcement.tools (declared: ['search'])"
    )
    assert problems[1].startswith(f"{tmp_path / 'valid.jsonl'}: cannot read:")
    assert len(problems) == 2


def test_good_job_and_data_have_no_problems(tmp_path: Path) -> None:
    write_lines(tmp_path / "train.jsonl", GOOD_ROWS)
    assert validate_job_and_data(write_job(tmp_path, ["search", "cat"])) == []


def test_job_spec_problems_are_returned(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text("model: tiny\n")
    problems = validate_job_and_data(job)
    assert any("training_file" in p for p in problems) and any("method" in p for p in problems)
