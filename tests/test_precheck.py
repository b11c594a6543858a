"""`rft-cluster precheck` and the per-step signal figures: what GRPO would see, measured before
any step is spent (real runs on the ledger job), and the verdicts drawn from it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from rft_cluster.config import StringCheckGrader
from rft_cluster.metrics import StepPrinter, signal_metrics, signal_warning
from rft_cluster.precheck import prompt_sample, verdict
from rft_cluster.types import RolloutStatus, Trajectory


def _traj(group: str, reward: float | None, status: RolloutStatus = RolloutStatus.OK) -> Trajectory:
    return Trajectory(trace_id=f"t-{group}-{reward}", prompt_id=group, group_id=group, step=1, token_ids=[], loss_mask=[],
                      logprobs=[], weight_versions=[], prompt_len=0, output_text="", status=status, score=reward, reward=reward)


def test_signal_counts_groups_whose_rewards_all_tie() -> None:
    trajs = [_traj("a", 1.0), _traj("a", 0.0), _traj("b", 0.5), _traj("b", 0.5), _traj("c", 1.0),
             _traj("c", 0.0, RolloutStatus.STALE), _traj("d", None, RolloutStatus.TOOL_FAILED)]
    m = signal_metrics(trajs)
    # a: signal; b: a tie; c: one rollout left once the stale one is dropped; d: nothing graded.
    assert m["signal/groups"] == 3 and m["signal/groups_no_signal_frac"] == pytest.approx(2 / 3)
    assert m["signal/group_reward_std_mean"] == pytest.approx(0.5 / 3)
    assert signal_warning(m, 4) and "67% of this step's groups carry no signal at group_size 4" in signal_warning(m, 4)
    assert signal_warning(signal_metrics(trajs[:2]), 4) is None


def test_the_step_row_shows_the_no_signal_share(capsys: pytest.CaptureFixture[str]) -> None:
    StepPrinter().print_step(3, {"train_reward_mean": 0.5, "signal/groups_no_signal_frac": 0.75})
    header, row = capsys.readouterr().out.splitlines()
    assert "no signal" in header and "75%" in row


@pytest.mark.parametrize(("figures", "ok", "reason"), [
    ({"graded": 0, "reward_mean": 0.0, "groups_no_signal_frac": 1.0}, False, "none of 32 rollouts was graded"),
    ({"graded": 12, "reward_mean": 0.5, "groups_no_signal_frac": 0.0}, False, "62% of rollouts ended without a grade"),
    ({"graded": 32, "reward_mean": 0.02, "groups_no_signal_frac": 0.9}, False,
     "baseline 0.02: too few successes for RL to start; warm-start on demonstrations first"),
    ({"graded": 32, "reward_mean": 0.9, "groups_no_signal_frac": 0.92}, False, "92% of groups carry no signal at group_size 4"),
    ({"graded": 30, "reward_mean": 0.3, "groups_no_signal_frac": 0.25}, True, "baseline 0.30 and 75% of groups carry signal"),
    # Calls the parser does not read come first: they explain every other figure.
    ({"graded": 0, "reward_mean": 0.0, "groups_no_signal_frac": 1.0, "format/unparsed_call_like_rollouts_frac": 0.9,
      "format/unparsed_call_like/mistral": 40.0, "format/unparsed_call_like/hermes": 2.0}, False,
     "90% of rollouts wrote what looks like mistral tool calls, which the hermes parser does not read: "
     "set cluster.engine.tool_call_parser: mistral"),
    ({"graded": 32, "reward_mean": 0.3, "groups_no_signal_frac": 0.25, "format/unparsed_call_like_rollouts_frac": 0.6,
      "format/unparsed_call_like/hermes": 20.0}, False, "calls in its own format that the hermes parser could not read (malformed)"),
    ({"graded": 30, "reward_mean": 0.3, "groups_no_signal_frac": 0.25, "format/unparsed_call_like_rollouts_frac": 0.5,
      "format/unparsed_call_like/mistral": 16.0}, True, "ready to train"),
])
def test_verdicts_name_the_first_problem(figures: dict[str, float], ok: bool, reason: str) -> None:
    v = verdict({"rollouts": 32.0, **figures}, group_size=4, tool_call_parser="hermes")
    assert v.ok is ok and reason in v.reason


def test_prompt_sample_is_seeded_and_sized_in_groups() -> None:
    assert len(prompt_sample(100, 32, 4, seed=1)) == 8 and prompt_sample(100, 32, 4, 1) == prompt_sample(100, 32, 4, 1)
    assert prompt_sample(100, 32, 4, 1) != prompt_sample(100, 32, 4, 2)
    assert prompt_sample(5, 64, 4, 1) == [0, 1, 2, 3, 4]


@pytest.mark.slow
def test_precheck_on_real_rollouts_says_go_and_no_go(ray_local, demo_job, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    """The ledger job's rollouts on the warm model, graded for real: with the trace-id grader every
    group has distinct rewards (GO); with a grader no answer can satisfy, the baseline is 0 (NO-GO);
    a training step under that grader logs the no-signal share and warns."""
    from rft_cluster.driver import train
    from rft_cluster.precheck import precheck

    report = precheck(demo_job, samples=8)
    f = report["figures"]
    assert (report["split"], report["prompts"], f["rollouts"]) == ("valid", 2, 8.0)
    assert report["verdict"]["ok"] and f["groups_no_signal_frac"] == 0.0 and f["graded"] == f["status/ok"] + f["status/budget_exhausted"] > 0
    assert f["tool_calls_per_rollout"] > 0  # the warm-started policy calls the ledger's tool
    assert report["parsers"]["tool_call_parser"] == "hermes" and f["format/unparsed_call_like"] == 0
    assert report["roles"] == {"rollout_worker": 1, "tool_proxy": 1, "grader": 1}  # it never trains: no learner

    # The wrong parser for this Hermes-format model: no call is read, and precheck says which would.
    demo_job.cluster.engine.tool_call_parser = "qwen3_coder"
    report = precheck(demo_job, samples=8)
    assert report["figures"]["tool_calls_per_rollout"] == 0 and report["figures"]["format/unparsed_call_like/hermes"] >= 5
    assert not report["verdict"]["ok"] and "set cluster.engine.tool_call_parser: hermes" in report["verdict"]["reason"]
    demo_job.cluster.engine.tool_call_parser = "auto"

    demo_job.rl.grader = StringCheckGrader(type="string_check", input="{{sample.output_text}}", reference="never-an-answer")
    report = precheck(demo_job, samples=8, split="train")
    assert report["split"] == "train" and not report["verdict"]["ok"]
    assert report["verdict"]["reason"].startswith("baseline 0.00: too few successes")
    assert report["figures"]["groups_no_signal_frac"] == 1.0

    train(demo_job, tmp_path / "run", max_steps=1)
    step1 = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()][-1]
    assert step1["step"] == 1 and step1["signal/groups_no_signal_frac"] == 1.0 and step1["signal/groups"] == 2
    assert "100% of this step's groups carry no signal at group_size 4" in capsys.readouterr().out
