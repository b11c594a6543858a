"""`rft-cluster validate` against hostile and careless input: every bad job file or dataset is
refused with one line naming the file and line (and the field), exit status 1, never a traceback,
and what would only fail once a run started is caught here."""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from rft_cluster.cli import main
from rft_cluster.config import Hyperparameters, load_job
from rft_cluster.dataset import check_job_and_data, load_rows

ROW = {"messages": [{"role": "user", "content": "hi"}], "answer": "1"}
TRAIN_ROWS = 4
STRING_CHECK = '      type: string_check\n      input: "{{sample.output_text}}"\n      reference: "{{item.answer}}"\n'
BASE = f"""model: m
training_file: train.jsonl
method:
  type: reinforcement
  reinforcement:
    tools:
      - name: t
        server_url: http://127.0.0.1:9/tool
    grader:
{STRING_CHECK}    hyperparameters:
      batch_size: 2
"""
HP_LINE = 14  # the line of `batch_size`; a hyperparameter added after it is on line 15
SECRET = "s3cr3t-value"
ENV = {"RFT_T_EMPTY": "", "RFT_T_CRLF": f"{SECRET}\r\nX-Injected: 1", "RFT_T_URL": f"file://user:{SECRET}@host/x"}


def hp(key: str, value: object) -> str:
    return BASE + f"      {key}: {value}\n"


def header(value: str, name: str = "X") -> str:
    return BASE.replace("/tool\n", f"/tool\n        headers:\n          {name}: {value}\n")


def grader(text: str) -> str:
    return BASE.replace(STRING_CHECK, text)


def python_grader(source: str, **fields: object) -> str:
    extra = "".join(f"      {k}: {v}\n" for k, v in fields.items())
    return grader(f"      type: python\n{extra}      source: {json.dumps(source)}\n")


def alias_bomb() -> bytes:
    lines = ['a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]']
    for prev, name in zip("abcdefgh", "bcdefghi"):
        lines.append(f"{name}: &{name} [" + ",".join([f"*{prev}"] * 9) + "]")
    return ("\n".join(lines) + "\n").encode()


def job_json(**reinforcement: object) -> dict:
    return {"model": "m", "training_file": "train.jsonl", "method": {"type": "reinforcement", "reinforcement": {
        "grader": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}"}, **reinforcement}}}


# name -> (file bytes, line of the problem, text the one-line error must hold)
HOSTILE_JOBS: dict[str, tuple[bytes, int, str]] = {
    # --- the file itself
    "binary.yaml": (b"model: m\n\x00\x01\xff\xfe" * 5, 2, "not valid UTF-8"),
    "latin1.yaml": (BASE.replace("model: m", "model: caf\xe9").encode("latin-1"), 1, "not valid UTF-8"),
    "nul.yaml": ((BASE + "suffix: a\x00b\n").encode(), 15, "U+0000 is not allowed"),
    "tabs.json": (json.dumps(job_json(max_episode_steps=0), indent="\t").encode(), 12, "max_episode_steps: Input should be greater than 0"),
    "control.json": (b'{"model": "m",\n "suffix": "a\x01b"}', 2, "not valid JSON: Invalid control character"),
    "deep.yaml": (("a: " + "[" * 20000 + "]" * 20000 + "\n").encode(), 1, "nested deeper than 64 levels"),
    "deep.json": (('{"model": ' + "[" * 100000 + "]" * 100000 + "}").encode(), 1, "nested deeper than 64 levels"),
    "deepish.json": (('{"model": ' + "[" * 200 + "]" * 200 + "}").encode(), 1, "nested deeper than 64 levels"),
    "bomb.yaml": (alias_bomb(), 6, "values once YAML aliases are expanded: refused"),
    "recursive-alias.yaml": (BASE.replace("model: m", "model: &a {b: [*a]}"), 1, "YAML alias *a refers to a collection that holds it"),
    "dup-grader.yaml": ((BASE + f"    grader:\n{STRING_CHECK}").replace("    hyperparameters:\n      batch_size: 2\n", ""), 13,
                        "method.reinforcement.grader: duplicate key (first at line 9)"),
    "dup-model.json": (b'{"model": "m",\n "training_file": "train.jsonl",\n "model": "n"}', 3, "model: duplicate key (first at line 1)"),
    "syntax.yaml": (b"model: [\n", 2, "not valid YAML"),
    "list.yaml": (b"- a\n", 1, "the job must be a mapping"),
    "python-tag.yaml": (BASE.replace("model: m", "model: !!python/object/apply:os.system [id]").encode(), 1, "could not determine a constructor"),
    # --- hyperparameters: real ranges, strict numbers
    "batch-0.yaml": (BASE.replace("batch_size: 2", "batch_size: 0"), HP_LINE, "batch_size: Input should be greater than 0"),
    "batch-true.yaml": (BASE.replace("batch_size: 2", "batch_size: true"), HP_LINE, "batch_size: Input should be a valid integer"),
    "batch-over-rows.yaml": (BASE.replace("batch_size: 2", f"batch_size: {TRAIN_ROWS + 1}"), HP_LINE, f"batch_size: batch_size {TRAIN_ROWS + 1} is larger than the {TRAIN_ROWS} training rows"),
    "group-1.yaml": (hp("group_size", 1), 15, "group_size: Input should be greater than or equal to 2"),
    "epochs-0.yaml": (hp("n_epochs", 0), 15, "n_epochs: Input should be greater than 0"),
    "eval-interval-0.yaml": (hp("eval_interval", 0), 15, "eval_interval: Input should be greater than 0"),
    "eval-samples-neg.yaml": (hp("eval_samples", -1), 15, "eval_samples: Input should be greater than 0"),
    "lr-mult-neg.yaml": (hp("learning_rate_multiplier", -1), 15, "learning_rate_multiplier: Input should be greater than 0"),
    "lr-mult-nan.yaml": (hp("learning_rate_multiplier", ".nan"), 15, "learning_rate_multiplier: Input should be a finite number"),
    "lr-inf.yaml": (hp("base_learning_rate", ".inf"), 15, "base_learning_rate: Input should be a finite number"),
    "kl-inf.yaml": (hp("kl_coef", ".inf"), 15, "kl_coef: Input should be a finite number"),
    "kl-neg.yaml": (hp("kl_coef", -0.1), 15, "kl_coef: Input should be greater than or equal to 0"),
    "temperature-inf.yaml": (hp("temperature", ".inf"), 15, "temperature: Input should be a finite number"),
    "penalty-nan.yaml": (hp("tool_call_penalty", ".nan"), 15, "tool_call_penalty: Input should be a finite number"),
    "reasoning-penalty-inf.yaml": (hp("reasoning_token_penalty", ".inf"), 15, "reasoning_token_penalty: Input should be a finite number"),
    "int-huge.yaml": (hp("max_tokens_per_turn", 10**30), 15, "max_tokens_per_turn: must fit in 64 bits"),
    "turn-over-context.yaml": (hp("max_tokens_per_turn", 4096), 15, "leaves no room for the prompt"),
    "backoff-inf.yaml": (BASE + "    tool_settings:\n      backoff_s: .inf\n", 16, "backoff_s: Input should be a finite number"),
    "retries-outlast.yaml": (BASE + "    tool_settings:\n      max_retries: 10\n      backoff_s: 60\n", 15, "longer than rollout_timeout_s"),
    "retries-bool.yaml": (BASE + "    tool_settings:\n      max_retries: true\n", 16, "max_retries: Input should be a valid integer"),
    "zero-stage-true.yaml": (BASE + "cluster:\n  learner:\n    zero_stage: true\n", 17, "zero_stage: Input should be a valid integer"),
    "workers-true.yaml": (BASE + "cluster:\n  rollout_workers: true\n", 16, "rollout_workers: Input should be a valid integer"),
    "cpus-nan.yaml": (BASE + "cluster:\n  resources:\n    learner: {cpus: .nan}\n", 17, "cpus: Input should be a finite number"),
    "source-path.yaml": (BASE + "source_path: /etc\n", 15, "source_path: Extra inputs are not permitted"),
    "seed-float.yaml": (BASE.replace("model: m", "model: m\nseed: 1.0"), 2, "seed: Input should be a valid integer"),
    # --- paths, tools, URLs, headers, variables
    "empty-training-file.yaml": (BASE.replace("training_file: train.jsonl", "training_file: ''"), 2, "training_file: must not be empty"),
    "blank-model.yaml": (BASE.replace("model: m", "model: '  '"), 1, "model: must not be empty"),
    "duplicate-tool.yaml": (BASE.replace("    grader:", "      - name: t\n        server_url: http://127.0.0.1:9/tool\n    grader:"), 6,
                            "tools[1] and tools[0] are both named 't'"),
    "tool-name.yaml": (BASE.replace("name: t", "name: 'a b'"), 7, "tools.0.name"),
    "file-url.yaml": (BASE.replace("http://127.0.0.1:9/tool", "file:///etc/passwd"), 8, "must be an http:// or https:// URL with a host, got scheme 'file'"),
    "no-host.yaml": (BASE.replace("http://127.0.0.1:9/tool", "http:///tool"), 8, "URL with a host"),
    "bad-port.yaml": (BASE.replace("127.0.0.1:9", "127.0.0.1:99999"), 8, "not a valid URL"),
    "header-name.yaml": (header("x", name="'Bad Name'"), 9, "header name 'Bad Name' is not an HTTP token"),
    "header-crlf.yaml": (header('"a\\r\\nX-Injected: 1"'), 9, "the value holds a line break or control character"),
    "var-crlf.yaml": (header("${RFT_T_CRLF}"), 10, "environment variable ${RFT_T_CRLF} holds a line break"),
    "var-empty.yaml": (header("Bearer ${RFT_T_EMPTY}"), 10, "environment variable ${RFT_T_EMPTY} is set but empty"),
    "var-malformed.yaml": (header("Bearer ${1BAD}"), 10, "'${1BAD}' is not a variable reference"),
    "var-unterminated.yaml": (header("Bearer ${TOKEN"), 10, "'${TOKEN' is not a variable reference"),
    "var-url-scheme.yaml": (BASE.replace("http://127.0.0.1:9/tool", "${RFT_T_URL}"), 8, "got scheme 'file'"),
    # --- graders against the data, and their limits
    "template-field.yaml": (BASE.replace("{{item.answer}}", "{{item.answr}}"), 12, f"no key 'answr' in the row at train.jsonl:1 (and {TRAIN_ROWS - 1} more rows)"),
    "multi-template.yaml": (grader('      type: multi\n      calculate_output: a\n      graders:\n        a:\n' + STRING_CHECK.replace("      ", "          ").replace("item.answer", "item.answr")),
                            16, "method.reinforcement.grader.graders.a.reference: template variable 'item.answr'"),
    "judge-template.yaml": (grader('      type: score_model\n      model: j\n      base_url: http://127.0.0.1:9/v1\n      input:\n        - {role: user, content: "{{item.question}}"}\n'),
                            14, "method.reinforcement.grader.input.0.content: template variable 'item.question'"),
    "template-sample.yaml": (BASE.replace("{{sample.output_text}}", "{{sample.output_txt}}"), 11, "no key 'output_txt'"),
    "template-root.yaml": (BASE.replace("{{item.answer}}", "{{row.answer}}"), 12, "must start with 'item.' or 'sample.'"),
    "python-one-arg.yaml": (python_grader("def grade(x):\n    return 1\n"), 11, "`grade` must take two positional arguments"),
    "python-three-args.yaml": (python_grader("def grade(sample, item, extra):\n    return 1\n"), 11, "`grade` must take two positional arguments"),
    "python-kwonly.yaml": (python_grader("def grade(sample, item, *, k):\n    return 1\n"), 11, "`grade` must take two positional arguments"),
    "python-async.yaml": (python_grader("async def grade(sample, item):\n    return 1\n"), 11, "returns a coroutine"),
    "python-nul.yaml": (python_grader("def grade(sample, item):\n    return \x00\n"), 11, "grader.source: source code string cannot contain null bytes"),
    "python-deep.yaml": (python_grader("x = " + "-" * 100000 + "1\ndef grade(sample, item):\n    return 1\n"), 11, "source is nested too deeply"),
    "python-memory.yaml": (python_grader("def grade(sample, item):\n    return 1\n", memory_mb=10**14), 11, "memory_mb: Input should be less than or equal to"),
    "python-memory-float.yaml": (python_grader("def grade(sample, item):\n    return 1\n", memory_mb="1.0e+14"), 11, "memory_mb: Input should be a valid integer"),
    "python-timeout-inf.yaml": (python_grader("def grade(sample, item):\n    return 1\n", timeout_s=".inf"), 11, "timeout_s: Input should be a finite number"),
    "pass-threshold-nan.yaml": (grader(STRING_CHECK.replace("string_check", "text_similarity") + "      evaluation_metric: bleu\n      pass_threshold: .nan\n"),
                                14, "pass_threshold: Input should be a finite number"),
}

# name -> (row line(s), line of the problem, text)
HOSTILE_ROWS: dict[str, tuple[bytes, int, str]] = {
    "nan.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": NaN}', 1, "NaN is not JSON"),
    "infinity.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": -Infinity}', 1, "-Infinity is not JSON"),
    "surrogate.jsonl": (b'{"messages": [{"role": "user", "content": "cut \\ud83d"}], "answer": "1"}', 1, "lone surrogate (\\ud83d)"),
    "duplicate-key.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": "1", "answer": "2"}', 1, "key 'answer' appears twice"),
    "deep.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": ' + b"[" * 100000 + b"]" * 100000 + b"}", 1, "nested deeper than 64"),
    "deepish.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": ' + b"[" * 100 + b"]" * 100 + b"}", 1, "nested deeper than 64"),
    "nul.jsonl": (json.dumps(ROW).encode() + b"\n\x00", 2, "not valid JSON"),
    "huge-int.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}], "answer": ' + b"9" * 5000 + b"}", 1, "integer string conversion"),
    "image-part.jsonl": (json.dumps({**ROW, "messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]}).encode(),
                         1, "messages[0].content[0]: must be a text part"),
    "null-content.jsonl": (json.dumps({**ROW, "messages": [{"role": "assistant", "content": None}, ROW["messages"][0]]}).encode(),
                           1, "messages[0].content: must be a string or a list of text parts, got null"),
    "bad-tool-call.jsonl": (json.dumps({**ROW, "messages": [{"role": "assistant", "content": None, "tool_calls": [{"function": {"name": "t", "arguments": {}}}]},
                                                           ROW["messages"][0]]}).encode(), 1, "messages[0].tool_calls[0]: must be"),
}


@pytest.fixture(scope="module")
def hostile_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("hostile")
    (d / "train.jsonl").write_text("".join(json.dumps(ROW) + "\n" for _ in range(TRAIN_ROWS)))
    for name, (content, _, _) in HOSTILE_JOBS.items():
        (d / name).write_bytes(content if isinstance(content, bytes) else content.encode())
    for name, (content, _, _) in HOSTILE_ROWS.items():
        (d / name).write_bytes(content + b"\n")
        (d / f"job-{name}.yaml").write_text(BASE.replace("train.jsonl", name).replace("batch_size: 2", "batch_size: 1"))
    os.mkfifo(d / "fifo.yaml")  # reading it would block forever
    os.mkfifo(d / "fifo.jsonl")
    (d / "job-fifo.jsonl.yaml").write_text(BASE.replace("train.jsonl", "fifo.jsonl"))
    return d


def every_hostile_file(d: Path) -> list[Path]:
    return [d / n for n in HOSTILE_JOBS] + [d / f"job-{n}.yaml" for n in HOSTILE_ROWS] + [d / "fifo.yaml", d / "job-fifo.jsonl.yaml"]


@pytest.fixture
def env(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in ENV.items():
        monkeypatch.setenv(k, v)


def validate(path: Path, capsys: pytest.CaptureFixture) -> tuple[int, list[str]]:
    code = main(["validate", str(path)])
    err = capsys.readouterr().err.splitlines()
    assert err[-1].endswith("nothing was started.")
    return code, err[:-1]


@pytest.mark.parametrize("name", HOSTILE_JOBS)
def test_a_hostile_job_file_is_one_located_line(name: str, hostile_dir: Path, env: None, capsys: pytest.CaptureFixture) -> None:
    _, line, text = HOSTILE_JOBS[name]
    code, problems = validate(hostile_dir / name, capsys)
    assert code == 1
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{hostile_dir / name}:{line}: "), problems[0]
    assert text in problems[0].replace(f"{hostile_dir}/", "")
    assert SECRET not in problems[0]  # an expanded value is never echoed


@pytest.mark.parametrize("name", HOSTILE_ROWS)
def test_a_hostile_row_is_one_located_line(name: str, hostile_dir: Path, capsys: pytest.CaptureFixture) -> None:
    _, line, text = HOSTILE_ROWS[name]
    code, problems = validate(hostile_dir / f"job-{name}.yaml", capsys)
    assert code == 1
    assert len(problems) == 1, problems
    assert problems[0].startswith(f"{hostile_dir / name}:{line}: "), problems[0]
    assert text in problems[0]


def test_files_that_are_not_regular_files_are_refused_without_blocking(hostile_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert validate(hostile_dir / "fifo.yaml", capsys) == (1, [f"{hostile_dir / 'fifo.yaml'}: cannot read: not a regular file"])
    assert validate(hostile_dir / "job-fifo.jsonl.yaml", capsys) == (1, [f"{hostile_dir / 'fifo.jsonl'}: cannot read: not a regular file"])


def _limit_memory() -> None:
    # The alias bomb expands to ~400 million values: any expansion would blow through this.
    resource.setrlimit(resource.RLIMIT_AS, (2 * 2**30, 2 * 2**30))


def _cli_validate(path: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "rft_cluster.cli", "validate", str(path)],
        capture_output=True, text=True, timeout=300, env={**os.environ, **ENV}, preexec_fn=_limit_memory,
    )  # fmt: skip


def test_the_cli_exits_1_without_a_traceback_on_every_hostile_file(hostile_dir: Path) -> None:
    files = every_hostile_file(hostile_dir)
    with ThreadPoolExecutor(4) as pool:
        results = dict(zip(files, pool.map(_cli_validate, files)))
    for path, r in results.items():
        assert r.returncode == 1, (path, r.stdout, r.stderr)
        assert "Traceback" not in r.stderr, (path, r.stderr)
        # One line per problem, each naming a file of this test, then the summary.
        *problems, summary = r.stderr.splitlines()
        assert summary.endswith("nothing was started.") and problems
        assert all(p.startswith(str(hostile_dir)) for p in problems), r.stderr


def test_what_openai_accepts_is_accepted_and_text_parts_are_joined(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    call = {"id": "c1", "type": "function", "function": {"name": "t", "arguments": '{"q": 1}'}}
    row = {"answer": "1", "messages": [
        {"role": "system", "content": [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}]},
        {"role": "user", "content": "q"},
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "c1", "content": [{"type": "text", "text": "42"}]},
        {"role": "user", "content": [{"type": "text", "text": "so?"}]},
    ]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n")
    (tmp_path / "job.yaml").write_text(BASE.replace("batch_size: 2", "batch_size: 1"))
    assert main(["validate", str(tmp_path / "job.yaml")]) == 0, capsys.readouterr().err
    [loaded] = load_rows(tmp_path / "train.jsonl")
    assert [m["content"] for m in loaded["messages"]] == ["Be terse.", "q", None, "42", "so?"]
    assert loaded["messages"][2]["tool_calls"] == [call]


def test_openai_fields_that_are_not_acted_on_are_warnings(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    job = tmp_path / "job.yaml"
    text = (
        BASE.replace("batch_size: 2", "batch_size: 1").replace("/tool\n", "/tool\n        headers:\n          X: Bearer $TOKEN\n")
        + "      reasoning_effort: low\n    response_format: {type: json_object}\n"  # the first reaches the template
        + "integrations:\n  - type: wandb\n    wandb: {project: p, entity: team}\n"
    )
    job.write_text(text)

    def line(marker: str) -> int:
        return text[: text.index(marker)].count("\n") + 1

    assert main(["validate", str(job)]) == 0
    captured = capsys.readouterr()
    assert "valid" in captured.out
    warnings = captured.err.splitlines()
    assert [w.split(": warning: ")[0] for w in warnings] == [  # in the file's order
        f"{job}:{line('X: Bearer')}: method.reinforcement.tools.0.headers.X",
        f"{job}:{line('response_format')}: method.reinforcement.response_format",
        f"{job}:{line('wandb: {')}: integrations.0.wandb.entity",
    ], warnings
    assert "$TOKEN is left as written (only ${TOKEN} reads the environment)" in warnings[0]
    assert all("ignored" in w for w in warnings[1:])
    # The model still loads, with the warnings beside it for `train` to print.
    assert load_job(job).warnings == warnings


@pytest.mark.parametrize("signature", ["sample, item", "s, i, /", "sample, item, extra=1", "*args", "sample, *rest, k=2"])
def test_python_grader_signatures_that_can_be_called_with_sample_and_item(tmp_path: Path, signature: str) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(python_grader(f"def grade(x):\n    return 0\n\ndef grade({signature}):\n    return 1\n").replace("batch_size: 2", "batch_size: 1"))
    assert check_job_and_data(job) == ([], [])  # the later `grade` is the one that runs


def test_the_driver_refuses_a_batch_larger_than_the_training_rows() -> None:
    # validate refuses it first; this is the guard for jobs built in Python (train(JobSpec)).
    with pytest.raises(ValueError, match="batch_size 5 is larger than the 4 training rows"):
        Hyperparameters(batch_size=5).resolved(4)
    assert Hyperparameters(batch_size=4).resolved(4).total_steps == 1


def test_an_unset_variable_in_a_url_waits_for_the_cluster(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RFT_T_UNSET", raising=False)
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(BASE.replace("http://127.0.0.1:9", "${RFT_T_UNSET}").replace("batch_size: 2", "batch_size: 1"))
    assert check_job_and_data(job, unset_env_ok=True) == ([], [])
    [problem] = check_job_and_data(job)[0]
    assert problem == f"{job}:8: method.reinforcement.tools.0.server_url: environment variable ${{RFT_T_UNSET}} is not set"
    monkeypatch.setenv("RFT_T_UNSET", "ftp://host")
    [problem] = check_job_and_data(job)[0]
    assert problem.endswith("server_url: must be an http:// or https:// URL with a host, got scheme 'ftp'")


def test_yaml_anchors_and_merge_keys_within_the_budget_are_accepted(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps(ROW) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(BASE.replace("batch_size: 2", "batch_size: 1").replace(
        "      - name: t\n        server_url: http://127.0.0.1:9/tool\n",
        "      - &tool\n        name: t\n        server_url: http://127.0.0.1:9/tool\n        headers: &auth {Authorization: x}\n"
        "      - <<: *tool\n        name: u\n        headers: *auth\n",
    ))
    assert check_job_and_data(job) == ([], [])  # `name: u` overrides the merged `name`: not a duplicate
    assert [(t.name, t.headers) for t in load_job(job).rl.tools] == [("t", {"Authorization": "x"}), ("u", {"Authorization": "x"})]
