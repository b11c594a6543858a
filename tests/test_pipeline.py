"""The streaming loop's bookkeeping: when a batch is complete, how stale a rollout is, and
which rollouts are too stale to train on."""

from __future__ import annotations

from rft_cluster.pipeline import Batch, Staleness, drop_stale
from rft_cluster.types import RolloutRequest, RolloutStatus, Trajectory

TRAINABLE = (RolloutStatus.OK, RolloutStatus.BUDGET_EXHAUSTED)


def traj(versions: list[int], status: RolloutStatus = RolloutStatus.OK) -> Trajectory:
    return Trajectory("t", "p", "g", 1, [0] * len(versions), [int(v >= 0) for v in versions], [0.0] * len(versions),
                      versions, 0, "", status=status)


def test_a_batch_completes_when_every_rollout_ended_and_lost_ones_do_not_count() -> None:
    b = Batch("train", 1, expected=2)
    b.record_lost(RolloutRequest("trace_a", "p", "g", 1, [], [], {}), "rollout worker 0 died", "node")
    b.end(traj([0]))
    assert not b.complete and b.completed_at is None
    b.end(traj([0]))  # the lost rollout's re-run
    assert b.complete and b.completed_at is not None
    assert [t.status for t in b.trajs] == [RolloutStatus.WORKER_LOST, RolloutStatus.OK, RolloutStatus.OK]
    assert b.trajs[0].trace_id == "trace_a" and b.trajs[0].reward is None and b.trajs[0].token_ids == []


def test_staleness_counts_learner_updates_since_the_oldest_sampled_token() -> None:
    s = Staleness(0)
    s.published(1)
    s.published(2)
    assert s.of(traj([-1, 2, 2])) == 0
    assert s.of(traj([-1, 1, -1, 2])) == 1  # a turn sampled on version 1, the next on 2: its oldest counts
    assert s.of(traj([0, 0])) == 2
    assert s.of(traj([-1, -1])) == 0  # nothing sampled
    # Resumed at step 5: versions before it are unknown, 5 is the start.
    r = Staleness(5)
    r.published(6)
    assert r.of(traj([5])) == 1 and r.of(traj([6])) == 0


def test_only_trainable_rollouts_beyond_the_bound_are_dropped_and_counted() -> None:
    s = Staleness(0)
    for v in (1, 2, 3):
        s.published(v)
    fresh, one_behind, too_old, failed = traj([3]), traj([2, 3]), traj([1, 3]), traj([0], RolloutStatus.TOOL_FAILED)
    stats = drop_stale([fresh, one_behind, too_old, failed], s, max_staleness=1, trainable=TRAINABLE)
    assert [t.status for t in (fresh, one_behind, too_old, failed)] == [
        RolloutStatus.OK, RolloutStatus.OK, RolloutStatus.STALE, RolloutStatus.TOOL_FAILED]
    assert "max_staleness 1" in too_old.error
    assert stats == {"pipeline/staleness_mean": 1.0, "pipeline/staleness_max": 2.0, "pipeline/dropped_stale": 1.0}
    # max_staleness 0 (synchronous) keeps only rollouts of the newest weights.
    assert drop_stale([traj([2])], s, 0, TRAINABLE)["pipeline/dropped_stale"] == 1.0
