"""What a person watching the console sees: the actors' output kept in log files (and a run's
copy of them) instead of the terminal, progress that degrades to a few lines off a terminal, and
the demo's closing summary."""

from __future__ import annotations

import io
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from rich.console import Console
from rich.text import Text

from rft_cluster import driver
from rft_cluster.config import load_job
from rft_cluster.redact import Redactor
from rft_cluster.storage import RunStorage

JOB = "1000001"  # a Ray job id, as get_job_id() gives it


@pytest.fixture
def job(tmp_path: Path) -> Any:
    path = tmp_path / "job.json"
    path.write_text(json.dumps({
        "model": "some/model", "training_file": "train.jsonl",
        "method": {"type": "reinforcement", "reinforcement": {
            "grader": {"type": "string_check", "input": "{{sample.output_text}}", "reference": "{{item.answer}}", "operation": "eq"}}},
    }))
    return load_job(path)


def ray_init_calls(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = []
    monkeypatch.setattr(driver.ray, "is_initialized", lambda: False)
    monkeypatch.setattr(driver.ray, "init", lambda **kwargs: calls.append(kwargs))
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    return calls


def test_actors_output_stays_off_the_console_and_vllm_logs_warnings_only(job: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    calls = ray_init_calls(monkeypatch)
    monkeypatch.delenv("VLLM_LOGGING_LEVEL", raising=False)
    driver.init_ray(job)
    assert calls[-1]["log_to_driver"] is False
    assert calls[-1]["runtime_env"] == {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}}
    monkeypatch.setenv("VLLM_LOGGING_LEVEL", "DEBUG")  # the user's level wins (and Ray refuses the key twice)
    driver.init_ray(job)
    assert calls[-1]["runtime_env"] is None and calls[-1]["log_to_driver"] is False
    driver.init_ray(job, verbose=True)
    assert calls[-1] == {"address": "local", "include_dashboard": False}


def test_a_local_run_keeps_its_jobs_worker_logs_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    logs = tmp_path / "session" / "logs"
    logs.mkdir(parents=True)
    files = {
        f"worker-aa-{JOB}-1.out": "engine up\nsecret-token-1234 sent\n",  # started for this job
        "worker-bb-ffffffff-2.err": f":job_id:{JOB}\nWARNING from a prestarted worker\n",  # taken by this job later
        "worker-cc-02000000-3.out": "another job's output\n",
        "worker-dd-ffffffff-4.out": ":job_id:02000000\nanother job's, prestarted\n",
        f"worker-ee-{JOB}-5.err": "",  # nothing written: not copied
        "raylet.out": "not a worker's\n",
    }
    for name, text in files.items():
        (logs / name).write_text(text)
    monkeypatch.setattr(driver, "worker_logs_dir", lambda: logs)
    monkeypatch.setattr(driver.ray, "get_runtime_context", lambda: SimpleNamespace(get_job_id=lambda: JOB))
    redactor = Redactor({"TOKEN": "secret-token-1234"})

    kept = driver.keep_worker_logs(RunStorage(tmp_path / "run"), redactor)
    assert kept == tmp_path / "run" / "logs"
    assert sorted(p.name for p in kept.iterdir()) == [f"worker-aa-{JOB}-1.out", "worker-bb-ffffffff-2.err"]
    assert (kept / f"worker-aa-{JOB}-1.out").read_text() == "engine up\n${TOKEN} sent\n"
    assert driver.keep_worker_logs(RunStorage("mock:///run"), redactor) is None  # an object store: left alone


def test_pretraining_prints_a_few_lines_off_a_terminal_and_a_bar_on_one(monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    import torch

    from rft_cluster import tiny_model

    class Model(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.ones(1))

        def forward(self, input_ids: torch.Tensor, labels: torch.Tensor) -> SimpleNamespace:
            return SimpleNamespace(loss=(self.w * input_ids.float()).pow(2).mean())

    monkeypatch.setattr(tiny_model, "_batches", lambda *args: iter(lambda: (torch.ones(2, 3), torch.ones(2, 3)), None))
    monkeypatch.delenv("TTY_COMPATIBLE", raising=False)
    monkeypatch.delenv("FORCE_COLOR", raising=False)
    tiny_model._pretrain(Model(), None, None, steps=200, batch_size=2, seq_len=3, lr=1e-3)
    plain = capsys.readouterr().out.splitlines()
    assert len(plain) == 10 and all(line.startswith("[tiny-model] pre-training step ") for line in plain)
    assert plain[-1].startswith("[tiny-model] pre-training step 200/200: loss ")

    monkeypatch.setenv("TTY_COMPATIBLE", "1")  # rich: this output is a terminal
    tiny_model._pretrain(Model(), None, None, steps=200, batch_size=2, seq_len=3, lr=1e-3)
    shown = Text.from_ansi(capsys.readouterr().out).plain
    assert shown.count("[tiny-model] pre-training step ") == 1 and "200/200" in shown and "━" in shown


def test_the_demo_ends_with_baseline_and_final_and_where_everything_is(tmp_path: Path) -> None:
    from rft_cluster.demo import summary_table

    summary = {
        "seeds": [{"seed": "seed 3", "baseline_step": 0, "final_step": 16,
                   "baseline": {"valid_reward_mean": 0.341, "tool_calls_per_rollout": 5.4},
                   "final": {"valid_reward_mean": 0.5, "tool_calls_per_rollout": None}}],
        "wall_time_s": 492.4,
    }
    logs = tmp_path / "run-seed3" / "logs"
    buf = io.StringIO()
    console = Console(file=buf, force_terminal=False, width=100)
    console.print(summary_table(summary, tmp_path / "report.md", logs))
    text = buf.getvalue()
    for expected in ("seed 3: baseline -> final", "valid reward mean", "0.341 -> 0.500", "5.40 -> -", "RL steps", "16",
                     "492 s", str(tmp_path / "report.md")):
        assert expected in text
    assert "actor logs" not in text  # a run on an object store keeps none
    logs.mkdir(parents=True)
    console.print(summary_table(summary, tmp_path / "report.md", logs))
    assert "actor logs" in buf.getvalue()
