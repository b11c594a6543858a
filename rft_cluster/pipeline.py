"""The bookkeeping of the streaming loop: what each step (or evaluation) is waiting for, and
how stale a finished rollout is. Pure Python, no Ray: the driver (`driver.py`) moves the data.

A batch holds the rollouts of one step's prompts (`batch_size` GRPO groups of `group_size`), or
of one evaluation. It is complete when every rollout it started has ended: graded, or in a state
that is not graded. A rollout lost with its worker is recorded once (status `worker_lost`) and
its request re-run with a fresh trace id; the re-run is what completes the batch.

Staleness is counted in learner updates: a rollout's staleness is the number of updates
between the weights that sampled its oldest token and the weights being trained. A step
without a learning signal updates and publishes nothing, so it does not make samples staler.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from statistics import fmean
from typing import Any

from rft_cluster.types import RolloutRequest, RolloutStatus, Trajectory


@dataclass
class Batch:
    kind: str  # "train", "eval" or "warmup" (never stored)
    step: int
    expected: int  # rollouts that must end (re-runs replace lost ones)
    items: dict[str, dict[str, Any]] = field(default_factory=dict)  # trace id -> dataset item
    trajs: list[Trajectory] = field(default_factory=list)  # ended, plus lost records
    ended: int = 0
    sampled_count: int = 0  # rollouts that finished sampling
    submitted_at: float = field(default_factory=time.perf_counter)
    sampled_at: float | None = None  # when its last rollout finished sampling
    completed_at: float | None = None  # when its last rollout was graded (or needed no grading)

    @property
    def complete(self) -> bool:
        return self.ended == self.expected

    def sampled(self) -> None:
        """One rollout finished sampling (it may still be graded)."""
        self.sampled_count += 1
        if self.sampled_count == self.expected:
            self.sampled_at = time.perf_counter()

    def end(self, t: Trajectory) -> None:
        """A rollout's record is final (graded, failed, or not to be graded)."""
        self.trajs.append(t)
        self.ended += 1
        if self.complete:
            self.completed_at = time.perf_counter()

    def record_lost(self, request: RolloutRequest, error: str, node_id: str | None) -> None:
        """The lost rollout's record: it neither ends the batch nor is graded or trained on."""
        self.trajs.append(lost_trajectory(request, error, node_id))


def lost_trajectory(request: RolloutRequest, error: str, node_id: str | None) -> Trajectory:
    return Trajectory(
        trace_id=request.trace_id,
        prompt_id=request.prompt_id,
        group_id=request.group_id,
        step=request.step,
        token_ids=[],
        loss_mask=[],
        logprobs=[],
        weight_versions=[],
        prompt_len=0,
        output_text="",
        status=RolloutStatus.WORKER_LOST,
        error=error,
        node_id=node_id,
    )


class Staleness:
    """Learner updates per published weight version, and the staleness of a rollout against them."""

    def __init__(self, version: int):
        self.updates = 0
        self._at: dict[int, int] = {version: 0}  # weight version -> updates when it was published

    def published(self, version: int) -> None:
        """The weights of one more learner update went out as `version`."""
        self.updates += 1
        self._at[version] = self.updates

    def of(self, t: Trajectory) -> int:
        """Updates since the weights that sampled the rollout's oldest token (0: none sampled)."""
        sampled = [v for v in t.weight_versions if v >= 0]
        return self.updates - self._at[min(sampled)] if sampled else 0


def drop_stale(trajs: list[Trajectory], staleness: Staleness, max_staleness: int, trainable: tuple[RolloutStatus, ...]) -> dict[str, float]:
    """Marks trainable rollouts staler than `max_staleness` as `stale` (kept in the record, not
    trained on); returns the staleness stats of the step's trainable rollouts."""
    ages = []
    dropped = 0
    for t in trajs:
        if t.status not in trainable:
            continue
        age = staleness.of(t)
        ages.append(age)
        if age > max_staleness:
            t.status, t.error = RolloutStatus.STALE, f"sampled {age} learner updates ago (max_staleness {max_staleness})"
            dropped += 1
    return {
        "pipeline/staleness_mean": fmean(ages) if ages else 0.0,
        "pipeline/staleness_max": float(max(ages, default=0)),
        "pipeline/dropped_stale": float(dropped),
    }
