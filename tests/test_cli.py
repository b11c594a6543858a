"""The command line as a user meets it: validation errors name file, line and field."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rft_cluster.cli import main
from tests.conftest import LEDGER_JOB

JOB = """\
model: some/model
training_file: train.jsonl
method:
  type: reinforcement
  reinforcement:
    max_episode_steps: 0
    tools:
      - name: lookup
        server_url: http://127.0.0.1:9/tool
    grader:
      type: string_check
      input: "{{sample.output_text}}"
      reference: "{{item.answer}}"
      operation: equals
"""


def test_validate_reports_every_problem_with_file_line_and_field(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.jsonl").write_text(
        json.dumps({"messages": [{"role": "user", "content": "hi"}], "tools": []}) + "\n"
        + "{not json\n"
        + json.dumps({"messages": [{"role": "assistant", "content": "x"}]}) + "\n"
    )
    job = tmp_path / "job.yaml"
    job.write_text(JOB)
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    assert f"{job}:6: method.reinforcement.max_episode_steps:" in err
    assert f"{job}:14: method.reinforcement.grader.operation:" in err

    job.write_text(JOB.replace("max_episode_steps: 0", "max_episode_steps: 3").replace("equals", "eq"))
    assert main(["validate", str(job)]) == 1
    err = capsys.readouterr().err
    train = tmp_path / "train.jsonl"
    assert f"{train}:2:" in err and f"{train}:3: messages" in err
    assert "nothing was started" in err


def test_validate_accepts_a_good_job(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": 1}) + "\n")
    job = tmp_path / "job.json"
    job.write_text(json.dumps({
        "model": "Qwen/Qwen3-0.6B", "training_file": "train.jsonl",
        "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}}},
    }))
    assert main(["validate", str(job)]) == 0
    assert "valid" in capsys.readouterr().out


def test_unset_environment_variable_is_named(tmp_path: Path, capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RFT_TEST_UNSET_TOKEN", raising=False)
    job = tmp_path / "job.yaml"
    job.write_text(JOB.replace("http://127.0.0.1:9/tool", "http://127.0.0.1:9/tool\n        headers:\n          Authorization: Bearer ${RFT_TEST_UNSET_TOKEN}"))
    assert main(["validate", str(job)]) == 1
    assert f"{job}:11: method.reinforcement.tools.0.headers.Authorization: environment variable ${{RFT_TEST_UNSET_TOKEN}} is not set" in capsys.readouterr().err


@pytest.fixture
def ledger_job(tmp_path: Path, ledger_data: Path, tiny_model_dir: Path, ledger_env, monkeypatch: pytest.MonkeyPatch) -> str:
    """The shipped ledger job, pointed at this session's ledger servers, data and a model (its
    check builds the tokenizer and renders a row, as `train` would; the tiny model has the warm
    one's tokenizer and template)."""
    import shutil

    shutil.copytree(ledger_data, tmp_path / "data")
    (tmp_path / "warm-model").symlink_to(tiny_model_dir)
    monkeypatch.setenv("RFT_DEMO_DIR", str(tmp_path))
    monkeypatch.setenv("RFT_DEMO_URL", ledger_env.base_url)
    monkeypatch.setenv("RFT_DEMO_TOKEN", ledger_env.token)
    return str(LEDGER_JOB)


def test_tool_run_shows_request_response_and_observation(ledger_job: str, ledger_env, ledger_data: Path, capfd: pytest.CaptureFixture) -> None:
    row = json.loads((ledger_data / "train.jsonl").read_text().splitlines()[0])
    assert main(["tool-run", ledger_job, "--tool", "lookup", "--arguments", json.dumps({"account": row["account"]})]) == 0
    out = capfd.readouterr().out
    assert '"type": "function_call"' in out and '"trace_id": "trace_' in out and f'"answer": {row["answer"]}' in out
    assert "response: HTTP 200" in out and f"{row['account']} balance: {row['answer']}" in out
    assert ledger_env.token not in out and "<redacted>" in out

    assert main(["tool-run", ledger_job, "--tool", "lookup", "--arguments", '{"account": "ACC-NOPE"}']) == 1
    out = capfd.readouterr().out
    assert "response: HTTP 404" in out and "the model receives (status client_error)" in out


def test_grader_run_shows_the_reward(ledger_job: str, ledger_env, ledger_data: Path, capfd: pytest.CaptureFixture) -> None:
    row = json.loads((ledger_data / "train.jsonl").read_text().splitlines()[2])
    assert main(["grader-run", ledger_job, "--row", "2", "--output-text", f"It is {row['answer']}."]) == 0
    out = capfd.readouterr().out
    assert '"output_text": "It is' in out and "the learner receives reward 1.0" in out
    assert main(["grader-run", ledger_job, "--row", "2", "--output-text", "no idea"]) == 0
    assert "the learner receives reward 0.0" in capfd.readouterr().out
