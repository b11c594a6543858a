"""`rft-cluster precheck JOB`: is there a learning signal before any step is spent?

Samples a seeded selection of the validation prompts (or the training prompts) on the job's
current model, `group_size` rollouts each, through the run's own actors and code (the driver's
`Trainer`: rollout fleet, tool proxies, graders, shaped reward), and reports what GRPO would see:
the reward's mean and spread, the share of groups whose rewards are all equal (no gradient), tool
calls and their failures, rollout statuses — and a verdict with its reason. OpenAI's advice to
start RL from a non-zero baseline, as a command.
"""

from __future__ import annotations

import random
import tempfile
from dataclasses import dataclass
from statistics import pstdev
from typing import Any, Literal

from rft_cluster.config import JobSpec
from rft_cluster.metrics import (
    GRADER_FAILED_WARN_FRAC, NO_SIGNAL_WARN_FRAC, format_metrics, parsers_line, rollout_metrics, signal_metrics, unread_calls,
)
from rft_cluster.types import RolloutStatus, Trajectory

# Below this mean score too few groups hold a success for GRPO to climb from.
MIN_BASELINE = 0.05
# Above this share of rollouts that ended without a grade, the tools or the grader are the problem.
MAX_FAILED_FRAC = 0.5
DEFAULT_SAMPLES = 32


@dataclass
class Verdict:
    ok: bool
    reason: str


def verdict(figures: dict[str, float], group_size: int, tool_call_parser: str) -> Verdict:
    """The pre-check's conclusion from its figures (`summarize`), the first problem found first:
    calls the parser does not read explain every figure after them."""
    if unread := unread_calls(figures, tool_call_parser):
        return Verdict(False, unread)
    n = figures["rollouts"]
    failed = n - figures["graded"]
    if figures["graded"] == 0:
        return Verdict(False, f"none of {n:.0f} rollouts was graded: check the tools and the grader (rft-cluster tool-run / grader-run)")
    if (grader_failed := figures.get("grader_failed_frac", 0.0)) > GRADER_FAILED_WARN_FRAC:
        return Verdict(False, f"the grader failed on {grader_failed:.0%} of the rollouts it graded (over {GRADER_FAILED_WARN_FRAC:.0%}): "
                              "see their grader_error with rft-cluster grader-run, and fix the grader first")
    if failed / n > MAX_FAILED_FRAC:
        return Verdict(False, f"{failed / n:.0%} of rollouts ended without a grade (see the statuses): fix those failures first")
    mean = figures["reward_mean"]
    if mean < MIN_BASELINE:
        return Verdict(False, f"baseline {mean:.2f}: too few successes for RL to start; warm-start on demonstrations first (rft-cluster sft)")
    no_signal = figures["groups_no_signal_frac"]
    if no_signal > NO_SIGNAL_WARN_FRAC:
        return Verdict(False, f"{no_signal:.0%} of groups carry no signal at group_size {group_size}: raise group_size or "
                              "temperature, or warm-start further")
    return Verdict(True, f"baseline {mean:.2f} and {1 - no_signal:.0%} of groups carry signal at group_size {group_size}: ready to train")


def summarize(trajs: list[Trajectory]) -> dict[str, float]:
    """The figures a pre-check reports, from its rollouts."""
    scores = [t.score for t in trajs if t.score is not None]
    m = rollout_metrics(trajs, prefix="precheck")
    return {
        "rollouts": m["precheck_rollouts"],
        "graded": float(len(scores)),
        "grader_failed_frac": m.get("precheck_grader_failed_frac", 0.0),
        "reward_mean": m.get("precheck_reward_mean", 0.0),
        "reward_std": pstdev(scores) if scores else 0.0,
        "groups_no_signal_frac": signal_metrics(trajs).get("signal/groups_no_signal_frac", 1.0),
        "tool_calls_per_rollout": m.get("precheck_tool_calls_per_rollout", 0.0),
        "tool_call_failures": m["precheck_tool_errors"],
        **format_metrics(trajs),
        **{f"status/{s.value}": m[f"precheck_status/{s.value}"] for s in RolloutStatus},
    }


def prompt_sample(n_rows: int, samples: int, group_size: int, seed: int) -> list[int]:
    """Row indices of ceil(samples / group_size) prompts (all of them if fewer), seeded."""
    n = min(n_rows, -(-samples // group_size))
    return sorted(random.Random(f"precheck-{seed}").sample(range(n_rows), n))


def precheck(
    job: JobSpec, samples: int = DEFAULT_SAMPLES, split: Literal["valid", "train"] = "valid", verbose: bool = False
) -> dict[str, Any]:
    """Runs the rollouts and returns {split, prompts, group_size, figures, verdict: {ok, reason}}.
    Uses the validation prompts unless the job has none or `split` is "train". `verbose`: as `init_ray`'s."""
    from rft_cluster.driver import Trainer, init_ray
    from rft_cluster.storage import RunStorage

    with tempfile.TemporaryDirectory(prefix="rft-precheck-") as scratch:  # the Trainer's outputs: none are written
        trainer = Trainer(job, RunStorage(scratch))
        used = "valid" if split == "valid" and trainer.valid_rows else "train"
        rows = trainer.valid_rows if used == "valid" else trainer.train_rows
        group = trainer.hp.group_size
        indices = prompt_sample(len(rows), samples, group, job.seed)
        init_ray(job, verbose)
        try:
            cluster = trainer.start(learner=False)
            parsers, roles = cluster.startup["parsers"], cluster.roles()
            batch = trainer.submit(rows, indices, group, 0, "train")  # grouped and rewarded as a training step is
            trainer.wait_for(batch)
        finally:
            trainer.shutdown()
    figures = summarize(batch.trajs)
    v = verdict(figures, group, parsers["tool_call_parser"])
    return {"split": used, "prompts": len(indices), "group_size": group, "roles": roles, "parsers": parsers, "figures": figures,
            "verdict": {"ok": v.ok, "reason": v.reason}}


def format_report(report: dict[str, Any]) -> str:
    """The pre-check's lines for the console."""
    f = report["figures"]
    statuses = ", ".join(f"{k.removeprefix('status/')} {v:.0f}" for k, v in f.items() if k.startswith("status/") and v)
    return "\n".join([
        f"precheck: {report['prompts']} {report['split']} prompts x {report['group_size']} rollouts",
        "  " + parsers_line(report["parsers"]).removeprefix("[rft] "),
        f"  reward (score) mean {f['reward_mean']:.3f}, spread (std) {f['reward_std']:.3f} over {f['graded']:.0f} graded",
        f"  groups with no signal: {f['groups_no_signal_frac']:.0%}",
        f"  grader failures: {f['grader_failed_frac']:.0%} of the rollouts it graded",
        f"  tool calls per rollout {f['tool_calls_per_rollout']:.2f}, failed calls {f['tool_call_failures']:.0f}",
        f"  turns that look like a call the {report['parsers']['tool_call_parser']} parser did not read: "
        f"{f['format/unparsed_call_like']:.0f} (in {f.get('format/unparsed_call_like_rollouts_frac', 0.0):.0%} of rollouts)",
        f"  rollout statuses: {statuses}",
        f"verdict: {'GO' if report['verdict']['ok'] else 'NO-GO'}: {report['verdict']['reason']}",
    ])
