from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
from rich.console import Console

from rft_cluster.metrics import RunLogger, StepPrinter, rollout_metrics
from rft_cluster.storage import RunStorage
from rft_cluster.types import RolloutStatus, ToolCallStatus, ToolResult, Trajectory
from tests.conftest import RunLocation, S3Server
from tests.wandb_log import wandb_history, wandb_records


def call(name: str, latency_s: float, status: ToolCallStatus = ToolCallStatus.OK) -> ToolResult:
    return ToolResult(f"call_{name}", name, "{}", "out", status, latency_s=latency_s)


def traj(status: RolloutStatus, score: float | None, calls: list[ToolResult], generated: int,
         turns: int, latency_s: float, grader_latency_s: float, reasoning: int = 0) -> Trajectory:
    """A rollout whose shaped reward is its score minus 0.1 per tool call."""
    reward = None if score is None else score - 0.1 * len(calls)
    return Trajectory(
        trace_id="trace", prompt_id="p", group_id="g", step=0,
        token_ids=[0] * (generated + 1), loss_mask=[0] + [1] * generated,
        logprobs=[0.0] * (generated + 1), weight_versions=[-1] + [0] * generated,
        prompt_len=1, output_text="", tool_calls=calls, status=status, score=score, reward=reward,
        reasoning_tokens=reasoning,
        num_turns=turns, latency_s=latency_s, grader_latency_s=grader_latency_s,
    )


BATCH = [
    traj(RolloutStatus.OK, 1.0, [call("search", 0.1), call("search", 0.2), call("cat", 0.3)], 2, 4, 10.0, 1.0, reasoning=2),
    traj(RolloutStatus.OK, 0.0,
         [call("cat", 0.4, ToolCallStatus.CLIENT_ERROR), call("serach", 0.0, ToolCallStatus.MALFORMED)],
         4, 2, 6.0, 3.0),
    traj(RolloutStatus.TOOL_FAILED, None, [call("search", 1.0, ToolCallStatus.SERVER_ERROR)], 1, 1, 2.0, 0.0),
    traj(RolloutStatus.GRADER_FAILED, None, [], 3, 1, 3.0, 2.0),
]


def test_rollout_metrics_hand_computed() -> None:
    assert rollout_metrics(BATCH) == pytest.approx({
        "train_rollouts": 4,
        "train_reward_mean": 0.5,  # only the two rollouts that have a score
        "train_shaped_reward_mean": 0.25,  # (1.0 - 0.3 + 0.0 - 0.2) / 2
        "train_reasoning_tokens_mean": 0.5,
        "train_grader_latency_mean_s": 2.0,  # (1 + 3 + 2) / 3: the tool-failed rollout was never graded
        "train_grader_failed_frac": 1 / 3,  # of the same three
        "train_rollout_latency_mean_s": 5.25,
        "train_generated_tokens_mean": 2.5,
        "train_turns_mean": 2.0,
        "train_tool_calls_per_rollout": 1.5,
        "train_tool_calls_per_rollout/search": 0.75,
        "train_tool_calls_per_rollout/cat": 0.5,
        "train_tool_calls_per_rollout/_malformed": 0.25,  # not a metric named after the typo
        "train_tool_latency_mean_s": 2.0 / 6,
        "train_tool_errors": 3,  # client error, malformed, server error
        # pairs: (search, search) (search, cat) | (cat, serach) -> 1 of 3 repeats
        "train_repeated_tool_bigram_fraction": 1 / 3,
        "train_status/ok": 2,
        "train_status/budget_exhausted": 0,
        "train_status/tool_failed": 1,
        "train_status/grader_failed": 1,
        "train_status/engine_failed": 0,
        "train_status/timeout": 0,
        "train_status/worker_lost": 0,
        "train_status/stale": 0,
        "train_status/format_failed": 0,
        "train_status/internal_error": 0,
    })


def test_pass_rate_counts_scored_rollouts_at_or_above_the_threshold() -> None:
    with_half = BATCH + [traj(RolloutStatus.OK, 0.5, [], 1, 1, 1.0, 1.0)]
    # Scores 1.0, 0.0, 0.5 (the failed rollouts have none): 0.5 passes at 0.5, not at 0.6.
    assert rollout_metrics(with_half, pass_threshold=0.5)["train_pass_rate"] == pytest.approx(2 / 3)
    assert rollout_metrics(with_half, pass_threshold=0.6)["train_pass_rate"] == pytest.approx(1 / 3)
    assert "train_pass_rate" not in rollout_metrics(with_half)  # no threshold, no metric


def test_rollout_metrics_omits_undefined_means_and_uses_prefix() -> None:
    metrics = rollout_metrics([traj(RolloutStatus.TIMEOUT, None, [call("cat", 0.5)], 1, 1, 30.0, 0.0)], "valid")
    assert all(k.startswith("valid_") for k in metrics)
    # No reward, no graded rollout, no call pair: those means do not exist (not 0, not NaN).
    for absent in ("valid_reward_mean", "valid_grader_latency_mean_s", "valid_repeated_tool_bigram_fraction"):
        assert absent not in metrics
    assert metrics["valid_status/timeout"] == 1
    assert metrics["valid_status/ok"] == 0

    empty = rollout_metrics([])
    assert empty["train_rollouts"] == 0 and empty["train_tool_errors"] == 0
    statuses = {k for k in empty if k.startswith("train_status/")}
    assert statuses == {f"train_status/{s.value}" for s in RolloutStatus}


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")  # belt and braces: never the network
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


@pytest.mark.usefixtures("offline_wandb")
def test_run_logger_writes_jsonl_and_offline_wandb_without_secrets(tmp_path: Path) -> None:
    out = tmp_path / "run"
    config = {"model": "tiny", "tools": [{"name": "search", "headers": {"Authorization": "Bearer s3cret-token"}}]}
    logger = RunLogger(out, "job-1", config)
    logger.log(1, {"train_reward_mean": 0.25, "timing.step.full_iteration": 3.0})
    logger.log(2, {"train_reward_mean": 0.75, "train_tool_errors": float("nan")})
    logger.finish()

    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert lines == [
        {"step": 1, "train_reward_mean": 0.25, "timing.step.full_iteration": 3.0},
        {"step": 2, "train_reward_mean": 0.75, "train_tool_errors": None},
    ]

    run_dir = logger.wandb_run_dir
    assert run_dir is not None and run_dir.is_relative_to(out) and run_dir.name.startswith("offline-run-")
    records = wandb_records(run_dir)
    assert wandb_history(run_dir) == {
        1: {"train_reward_mean": 0.25, "timing.step.full_iteration": 3.0},
        2: {"train_reward_mean": 0.75, "train_tool_errors": pytest.approx(float("nan"), nan_ok=True)},
    }
    [run] = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert any("<redacted>" in item.value_json for item in run.config.update)
    leaked = [p for p in run_dir.rglob("*") if p.is_file() and b"s3cret-token" in p.read_bytes()]
    assert leaked == []


@pytest.mark.usefixtures("offline_wandb")
def test_a_resumed_run_continues_the_same_wandb_run(tmp_path: Path) -> None:
    out = tmp_path / "run"
    first = RunLogger(out, "job-1", {})
    first.log(1, {"train_reward_mean": 0.25})
    first.finish()
    again = RunLogger(out, "job-1-resumed-at-1", {})  # a new process, after a kill
    again.log(2, {"train_reward_mean": 0.5})
    again.finish()
    assert first.wandb_run_dir != again.wandb_run_dir
    ids = {r.run.run_id for d in (first.wandb_run_dir, again.wandb_run_dir) for r in wandb_records(d)
           if r.WhichOneof("record_type") == "run"}
    assert ids == {(out / "wandb" / "run_id").read_text()}


def test_run_logger_disabled_writes_only_jsonl(tmp_path: Path) -> None:
    logger = RunLogger(tmp_path, "job-1", {}, wandb_mode="disabled")
    logger.log(0, {"train_rollouts": 4.0})
    logger.finish()
    assert logger.wandb_run_dir is None
    assert [p.name for p in tmp_path.iterdir()] == ["metrics.jsonl"]


def test_run_logger_continues_and_drops_after_what_storage_holds(run_location: RunLocation) -> None:
    first = RunLogger(run_location.uri, "job-1", {}, wandb_mode="disabled")
    for step in (0, 1, 2):
        first.log(step, {"train_rollouts": float(step)})
    # A resumed run (a new process) reads the file back, forgets step 2 and logs it again.
    again = RunLogger(run_location.uri, "job-1-resumed-at-1", {}, wandb_mode="disabled")
    again.drop_after(1)
    again.log(2, {"train_rollouts": 20.0})
    text = RunStorage(run_location.uri).read_text("metrics.jsonl")
    assert [json.loads(x) for x in text.splitlines()] == [
        {"step": 0, "train_rollouts": 0.0}, {"step": 1, "train_rollouts": 1.0}, {"step": 2, "train_rollouts": 20.0}
    ]
    assert run_location.files() == ["metrics.jsonl"]


@pytest.mark.usefixtures("offline_wandb")
def test_run_logger_on_s3_uploads_wandb_at_checkpoints_and_finish(s3_server: S3Server, s3_prefix: str, tmp_path: Path) -> None:
    logger = RunLogger(s3_server.uri(s3_prefix), "job-1", {"tools": [{"headers": {"Authorization": "Bearer s3cret-token"}}]})
    staging = logger.wandb_run_dir
    assert staging is not None and not staging.is_relative_to(tmp_path)
    logger.log(1, {"train_reward_mean": 0.25})
    logger.upload_wandb()  # a checkpoint: a run killed after it keeps this much
    run = f"wandb/{staging.name}"
    assert any(k.startswith(f"{run}/") and k.endswith(".wandb") for k in s3_server.keys(s3_prefix))
    logger.log(2, {"train_reward_mean": 0.75})
    logger.finish()
    assert not staging.exists()  # the local staging directory is gone; the bucket has it all

    keys = s3_server.keys(s3_prefix)
    assert "metrics.jsonl" in keys and all(k in ("metrics.jsonl", RunLogger.WANDB_ID) or k.startswith(f"{run}/") for k in keys)
    local = RunStorage(s3_server.uri(s3_prefix)).download_dir(run, tmp_path / "down")
    assert wandb_history(local) == {1: {"train_reward_mean": 0.25}, 2: {"train_reward_mean": 0.75}}
    assert [p for p in local.rglob("*") if p.is_file() and b"s3cret-token" in p.read_bytes()] == []


STEP_METRICS = rollout_metrics(BATCH) | {
    "format/unparsed_call_like": 2.0,
    "timing.step.sampling": 12.34,
    "timing.step.grading": 1.0,
    "timing.step.training": 3.21,
    "timing.step.full_iteration": 17.0,  # weight_sync missing: shown as "-"
}


def test_step_printer_plain_when_not_a_terminal() -> None:
    buf = io.StringIO()
    printer = StepPrinter(Console(file=buf, force_terminal=False, width=40))
    printer.print_step(1, STEP_METRICS)
    printer.print_step(2, rollout_metrics([]))
    text = buf.getvalue()
    assert "\x1b" not in text
    header, row1, row2 = text.splitlines()  # one line each despite the 40-column console
    assert header.split() == ["step", "reward", "calls/roll", "unparsed", "no", "signal", "status", "sampling", "grading", "training",
                              "weight_sync", "total", "(seconds)"]
    # The grader failed on 1 of the 3 rollouts it ran on: over GRADER_FAILED_WARN_FRAC, so shouted.
    assert row1.split() == ["1", "0.500", "1.50", "2", "-", "ok", "2", "tool", "1", "GRADER", "1", "(33%)",
                            "12.3", "1.0", "3.2", "-", "17.0"]
    assert row2.split() == ["2", "-", "-", "-", "-", "-", "-", "-", "-", "-"]
    assert len(row1) == len(row2) == header.index("  (seconds)")  # columns line up under the header


def test_step_printer_styles_on_a_terminal() -> None:
    buf = io.StringIO()
    StepPrinter(Console(file=buf, force_terminal=True, color_system="standard")).print_step(1, STEP_METRICS)
    assert "\x1b[" in buf.getvalue()
