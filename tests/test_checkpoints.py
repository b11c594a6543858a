"""The checkpoint index and resume marker, on a local directory and on S3 (`run_location`)."""

from __future__ import annotations

from rft_cluster.checkpoints import CheckpointDir
from rft_cluster.storage import RunStorage
from tests.conftest import RunLocation


def fake_model(st: RunStorage, step: int) -> None:
    """What the learner's save_hf leaves at a checkpoint."""
    st.write_text(f"{CheckpointDir.model_rel(step)}/config.json", "{}")


def test_index_keeps_the_best_and_deletes_the_rest(run_location: RunLocation) -> None:
    ckpt = CheckpointDir(run_location.uri, keep=2)
    assert ckpt.index() == []
    for step, reward in ((2, 0.5), (4, None), (6, 0.7), (8, 0.5)):
        fake_model(ckpt.storage, step)
        ckpt.add(step, reward)
    # best first; equal rewards: the later step first; unvalidated last (and here dropped)
    assert [(c.step, c.valid_reward_mean) for c in CheckpointDir(run_location.uri).index()] == [(6, 0.7), (8, 0.5)]
    assert run_location.files() == ["checkpoints/index.json", "checkpoints/step-000006/config.json", "checkpoints/step-000008/config.json"]
    # `path` is where the model is, without the URI's query options
    [best, _] = ckpt.index()
    assert best.path == ckpt.storage.uri_for("checkpoints/step-000006") and "?" not in best.path


def test_save_step_marks_the_state_and_drops_older_states(run_location: RunLocation) -> None:
    ckpt = CheckpointDir(run_location.uri)
    assert ckpt.resumable_step() is None
    st = ckpt.storage
    for step in (2, 4):
        st.write_text(f"{ckpt.LEARNER_STATE}/{ckpt.state_tag(step)}/mp_rank_00_model_states.pt", "w")
        st.write_text(f"{ckpt.LEARNER_STATE}/latest", ckpt.state_tag(step))
        ckpt.save_step(step)
    assert CheckpointDir(run_location.uri).resumable_step() == 4
    assert run_location.files() == ["state/driver.json", "state/learner/latest", "state/learner/step-4/mp_rank_00_model_states.pt"]
