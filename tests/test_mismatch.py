"""When engine and learner disagree: a bf16 vLLM engine samples, an fp32 learner trains on what
it sampled. Their logprobs of the same tokens differ (bf16 weights and kernels); with
`old_logprobs: learner` the PPO ratio starts at exactly 1 and the gap is measured instead, with
`old_logprobs: engine` the gap is in every ratio. And `validate` refuses a TIS cap that has no
learner logprobs to weigh."""

from __future__ import annotations

import inspect
from pathlib import Path

import pytest
import ray

from rft_cluster.config import EngineSpec, Hyperparameters, load_job
from rft_cluster.jobfile import SpecError
from rft_cluster.learner import Learner
from rft_cluster.learner_group import LearnerGroup
from rft_cluster.rollout_worker import RolloutWorker, SamplingSettings
from rft_cluster.types import TrainSample
from tests.test_learner import make_learner
from tests.test_rollout import requests_for, rollouts
from tests.test_validate_hostile import BASE, HP_LINE


@pytest.fixture(scope="module")
def bf16_batch(ray_local: None, tiny_model_dir: Path, ledger_data: Path) -> list[TrainSample]:
    """Eight rollouts of the tiny model sampled by a bf16 engine (started once, and stopped before
    the learners start), as training samples with advantages of both signs. The model is not
    warm-started: the warm model is so sure of its demonstrations' tokens (logprobs ~ -1e-4)
    that any error in them is as small. No tools: a turn that calls one ends its rollout."""
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(str(tiny_model_dir), EngineSpec(dtype="bfloat16", max_model_len=2048), 0, [])
    try:
        ray.get(worker.start.remote())
        settings = SamplingSettings(temperature=1.0, max_tokens_per_turn=48, max_episode_steps=0, seed=0)
        trajs = rollouts(worker, requests_for(ledger_data / "valid.jsonl", 8), settings)
    finally:
        ray.get(worker.shutdown.remote())
        ray.kill(worker)
    assert all(sum(t.loss_mask) > 0 for t in trajs), [t.error for t in trajs]
    return [TrainSample(t.token_ids, t.loss_mask, t.logprobs, adv) for t, adv in zip(trajs, [1.0, -1.0, 0.5, -0.5] * 2)]


@pytest.mark.slow
def test_learner_logprobs_put_a_bf16_engines_ratio_at_one(bf16_batch: list[TrainSample], tiny_model_dir: Path) -> None:
    # One step each on the same batch from the same weights: its only minibatch, before any update.
    learner = make_learner(tiny_model_dir, zero_stage=2, micro_batch_size=2).train_step(bf16_batch)
    engine = make_learner(tiny_model_dir, zero_stage=2, micro_batch_size=2, old_logprobs="engine", tis_cap=None).train_step(bf16_batch)
    print(f"\nbf16 engine vs fp32 learner over {learner['tokens']:.0f} tokens: |Δ logprob| mean {learner['mismatch_mean']:.2e}, "
          f"max {learner['mismatch_max']:.2e}; TIS weights truncated at 2: {learner['tis_truncated']:.3f}; "
          f"step {learner['seconds']:.2f} s (engine mode {engine['seconds']:.2f} s)\n"
          f"ratio - 1: learner logprobs mean {learner['ratio_mean'] - 1:.1e} max |.| {learner['ratio_dev_max']:.1e}; "
          f"engine logprobs mean {engine['ratio_mean'] - 1:.1e} max |.| {engine['ratio_dev_max']:.1e}, clip fraction {engine['clip_fraction']:.3f}")
    # The mismatch is real: ten times the bound an fp32 engine keeps to (tests/test_rollout.py), in
    # the few tokens the tiny model is unsure of (most it samples at logprob ~0, where bf16 errs little).
    assert learner["mismatch_max"] > 1e-3 and learner["mismatch_mean"] > 1e-5
    # Recomputed on the learner, the ratio is 1 to float precision at the step's only minibatch...
    assert learner["ratio_mean"] == pytest.approx(1.0, abs=1e-7) and learner["ratio_dev_max"] < 1e-6
    # ... while the engine's logprobs put the bf16 gap into the ratios, before any update.
    assert engine["ratio_dev_max"] > 1e-3
    # Both measure the same gap: the engine-mode ratio's log is learner - engine logprob.
    assert engine["logprob_gap"] == pytest.approx(learner["mismatch_mean"], rel=1e-4)


@pytest.mark.parametrize(("settings", "line", "problem"), [
    ({"old_logprobs": "engine"}, HP_LINE - 1, "tis_cap: 2 needs old_logprobs: learner"),  # the default cap: located at its mapping
    ({"old_logprobs": "engine", "tis_cap": 3}, HP_LINE + 2, "tis_cap: 3 needs old_logprobs: learner"),
    ({"tis_cap": 0.5}, HP_LINE + 1, "tis_cap: Input should be greater than or equal to 1"),
])
def test_validate_refuses_a_tis_cap_without_learner_logprobs(tmp_path: Path, settings: dict[str, object], line: int, problem: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(BASE + "".join(f"      {key}: {value}\n" for key, value in settings.items()))  # from line HP_LINE + 1
    with pytest.raises(SpecError) as refused:
        load_job(job)
    [refusal] = refused.value.problems
    assert refusal.startswith(f"{job}:{line}: method.reinforcement.hyperparameters.{problem}"), refusal


def test_engine_logprobs_without_a_tis_cap_are_accepted(tmp_path: Path) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(BASE + "      old_logprobs: engine\n      tis_cap: null\n")
    hyper = load_job(job).rl.hyperparameters
    assert (hyper.old_logprobs, hyper.tis_cap) == ("engine", None)


def test_a_learner_built_without_the_settings_has_the_jobs_defaults() -> None:
    job = Hyperparameters()
    for cls in (Learner, LearnerGroup):
        params = inspect.signature(cls).parameters
        assert (params["old_logprobs"].default, params["tis_cap"].default) == (job.old_logprobs, job.tis_cap), cls
