"""Agent loops on a real vLLM engine (CPU), calling real tools through a real proxy actor."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import pytest
import ray
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft_cluster.config import EngineSpec, LearnerSpec
from rft_cluster.driver import Trainer
from rft_cluster.learner_group import LearnerGroup
from rft_cluster.rollout_worker import RolloutWorker, SamplingSettings
from rft_cluster.types import RolloutRequest, RolloutStatus, ToolCallStatus, Trajectory
from rft_cluster.weight_transfer import NamedWeights, Publish, publish, publish_from

pytestmark = pytest.mark.slow


def requests_for(rows_path: Path, n: int, step: int = 0) -> list[RolloutRequest]:
    rows = [json.loads(line) for line in rows_path.read_text().splitlines()][:n]
    return [
        RolloutRequest(
            trace_id=f"trace_test{step}_{i}",
            prompt_id=str(i),
            group_id=str(i),
            step=step,
            messages=row["messages"],
            tools=row["tools"],
            item={k: v for k, v in row.items() if k not in ("messages", "tools")},
        )
        for i, row in enumerate(rows)
    ]


def publish_model(worker, model_dir: Path, version: int) -> None:
    """Loads a model directory's weights into the engine as `version` (the learner's protocol)."""
    weights = AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()
    publish(NamedWeights.of({n: p.detach() for n, p in weights}), [worker], version=version, bucket_bytes=64 << 20)


def rollouts(worker, reqs: list[RolloutRequest], settings: SamplingSettings) -> list[Trajectory]:
    """The requests run concurrently, one Ray call each (as the driver calls them)."""
    return ray.get([worker.rollout.remote(r, settings) for r in reqs])


def runs(mask: list[int], value: int) -> list[tuple[int, int]]:
    """[start, end) spans where mask == value."""
    spans, start = [], None
    for i, m in enumerate(mask + [1 - value]):
        if m == value and start is None:
            start = i
        elif m != value and start is not None:
            spans.append((start, i))
            start = None
    return spans


@pytest.fixture(scope="module")
def trajectories(rollout_worker, ledger_data: Path) -> list[Trajectory]:
    settings = SamplingSettings(temperature=1.0, max_tokens_per_turn=48, max_episode_steps=4)
    return rollouts(rollout_worker, requests_for(ledger_data / "valid.jsonl", 12), settings)


def test_multi_turn_trajectories_mask_everything_but_sampled_tokens(trajectories, warm_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    with_tools = [t for t in trajectories if t.tool_calls]
    assert len(with_tools) >= len(trajectories) // 2, "the warm-started policy should call its tool"
    for t in with_tools:
        assert len(t.token_ids) == len(t.loss_mask) == len(t.logprobs) == len(t.weight_versions)
        assert t.num_turns >= 2 and t.loss_mask[: t.prompt_len] == [0] * t.prompt_len
        generated = [tok.decode(t.token_ids[a:b]) for a, b in runs(t.loss_mask, 1)]
        shown = [tok.decode(t.token_ids[a:b]) for a, b in runs(t.loss_mask, 0)][1:]  # after the prompt
        assert "<tool_call>" in generated[0]
        for call in t.tool_calls:
            # Each tool output reaches the model in an unmasked-out (mask 0) span, never a trained one.
            assert any(f"<tool_response>\n{call.output}\n</tool_response>" in s for s in shown)
            assert not any(call.output in g for g in generated)
        # Sampled tokens carry their logprob and weight version; shown tokens carry neither.
        for m, lp, v in zip(t.loss_mask, t.logprobs, t.weight_versions):
            assert (v == 0 and lp <= 0.0) if m else (v == -1 and lp == 0.0)


def test_trajectory_tokens_are_exactly_what_the_engine_saw(rollout_worker, trajectories) -> None:
    """Re-scoring the stored ids with the engine reproduces every sampled token's logprob: the
    ids are the engine's own sequence, not a re-tokenization of the text."""
    for t in [t for t in trajectories if t.num_turns >= 2][:4]:
        scored = ray.get(rollout_worker.prompt_logprobs.remote(t.token_ids))
        sampled = [(s, lp) for s, lp, m in zip(scored, t.logprobs[1:], t.loss_mask[1:]) if m]
        assert sampled
        assert max(abs(a - b) for a, b in sampled) < 1e-3


def test_trace_id_tags_every_tool_call_of_its_rollout_only(trajectories, ledger_env) -> None:
    assert len({t.trace_id for t in trajectories}) == len(trajectories)
    for t in trajectories:
        sent = [c for c in t.tool_calls if c.status != ToolCallStatus.MALFORMED]
        seen = ledger_env.calls(t.trace_id)
        assert [c["call_id"] for c in seen] == [c.call_id for c in sent]
        assert all(c["id"].startswith("fc_") for c in seen)


def test_budget_exhausted_when_the_model_wants_more_calls(rollout_worker, ledger_data: Path, warm_model_dir: Path) -> None:
    tok = AutoTokenizer.from_pretrained(warm_model_dir)
    settings = SamplingSettings(temperature=1.0, max_tokens_per_turn=48, max_episode_steps=0)
    trajs = rollouts(rollout_worker, requests_for(ledger_data / "valid.jsonl", 6, step=1), settings)
    for t in trajs:
        assert t.tool_calls == [] and t.num_turns == 1  # a budget of 0 executes no call
        # A call is a closed block; one cut off by max_tokens_per_turn is no call (the turn is
        # the answer), so "<tool_call>" alone does not mean the model asked for one.
        text = tok.decode([i for i, m in zip(t.token_ids, t.loss_mask) if m])
        wanted_call = re.search(r"<tool_call>.*?</tool_call>", text, re.DOTALL) is not None
        assert t.status == (RolloutStatus.BUDGET_EXHAUSTED if wanted_call else RolloutStatus.OK), text
    assert any(t.status == RolloutStatus.BUDGET_EXHAUSTED for t in trajs)


def test_a_rollout_past_its_time_limit_ends_as_timeout(rollout_worker, ledger_data: Path) -> None:
    settings = SamplingSettings(temperature=1.0, max_tokens_per_turn=48, max_episode_steps=4, rollout_timeout_s=0.001)
    [t] = rollouts(rollout_worker, requests_for(ledger_data / "valid.jsonl", 1, step=2), settings)
    assert t.status == RolloutStatus.TIMEOUT and "0.001" in t.error


def test_an_engine_error_ends_that_rollout_only_as_engine_failed(rollout_worker, ledger_data: Path) -> None:
    """Two ways a rollout cannot run, each recorded as engine_failed (and discarded) while the
    others of the batch complete: a prompt longer than the context (the worker's own check,
    before the engine), and a request vLLM itself rejects (a negative temperature)."""
    ok, too_long, rejected = requests_for(ledger_data / "valid.jsonl", 3, step=3)
    too_long.messages = [{"role": "user", "content": "balance? " * 3000}]
    settings = SamplingSettings(temperature=1.0, max_tokens_per_turn=48, max_episode_steps=4)
    before = ray.get(rollout_worker.engine_stats.remote())
    a, b, c = ray.get([
        rollout_worker.rollout.remote(ok, settings),
        rollout_worker.rollout.remote(too_long, settings),
        rollout_worker.rollout.remote(rejected, SamplingSettings(temperature=-1.0, max_tokens_per_turn=48, max_episode_steps=4)),
    ])
    after = ray.get(rollout_worker.engine_stats.remote())
    assert a.status in (RolloutStatus.OK, RolloutStatus.BUDGET_EXHAUSTED)
    assert b.status == RolloutStatus.ENGINE_FAILED and "does not fit max_model_len 2048" in b.error
    assert c.status == RolloutStatus.ENGINE_FAILED and c.error.startswith("VLLMValidationError: temperature must be non-negative")
    for failed in (b, c):
        # Nothing was sampled: the prompt alone, shown, with no turn, reward or tool call.
        assert failed.num_turns == 0 and failed.generated_tokens == 0 and failed.tool_calls == []
        assert failed.loss_mask == [0] * len(failed.token_ids) == [0] * failed.prompt_len and failed.reward is None
    # Only the good rollout's turns reached the engine's counters; the worker serves on.
    assert after["generated_tokens"] - before["generated_tokens"] == a.generated_tokens
    [again] = rollouts(rollout_worker, [ok], settings)
    assert again.status in (RolloutStatus.OK, RolloutStatus.BUDGET_EXHAUSTED)


def test_a_publish_reaches_two_workers_at_once_and_nothing_they_cached_survives_it(
    rollout_worker, trajectories, warm_model_dir: Path, ledger_data: Path
) -> None:
    """After a training step, one publish (the driver's `publish_from`) to two real engines: each
    scores a fixed sequence exactly as the learner does (fp32 on both sides; observed gap ~1e-6,
    bound 1e-4 is 100x below the gap a missed sync leaves), and a prompt each had cached before
    the publish is sampled from the new weights alone (version 1, the learner's logprobs): old
    prefix-cache blocks served after the publish would give other logprobs."""
    second = ray.remote(num_cpus=1)(RolloutWorker).remote(str(warm_model_dir), EngineSpec(dtype="float32", max_model_len=2048), 0, [])
    started = second.start.remote()  # the engine starts while the learner does
    group = LearnerGroup(str(warm_model_dir), LearnerSpec(zero_stage=2), 5e-3, 0.2, seed=0)
    workers = [rollout_worker, second]
    try:
        ray.get(started)
        [probe] = requests_for(ledger_data / "valid.jsonl", 1, step=5)
        one_turn = SamplingSettings(temperature=1.0, max_tokens_per_turn=16, max_episode_steps=0)
        for w in workers:  # the probe's prompt in each prefix cache, shown to serve it
            rollouts(w, [probe], one_turn)
            cached = ray.get(w.engine_stats.remote())["cached_prompt_tokens"]
            rollouts(w, [probe], one_turn)
            assert ray.get(w.engine_stats.remote())["cached_prompt_tokens"] > cached, "the prefix cache should serve a repeated prompt"

        for t, r in zip(trajectories, [1.0, 0.0] * len(trajectories)):
            t.reward, t.group_id = r, "g"
        group.train_step(Trainer.train_samples(trajectories))
        seq = trajectories[0].token_ids
        [want] = group.compute_logprobs([seq])
        before = ray.get(rollout_worker.prompt_logprobs.remote(seq))
        assert max(abs(a - b) for a, b in zip(before, want)) > 1e-2, "the step should have changed the weights"

        sync = publish_from(group, Publish(workers, 1, 64 << 20, "rft_shm", None))
        assert sync.lost == []
        n_params = sum(p.numel() for p in AutoModelForCausalLM.from_pretrained(warm_model_dir).parameters())
        assert sync.bytes == 4 * n_params  # every parameter once, tied ones once, for both workers
        for w in workers:
            cached = ray.get(w.engine_stats.remote())["cached_prompt_tokens"]
            [t] = rollouts(w, [probe], one_turn)  # first thing after the publish: nothing else cached
            assert ray.get(w.engine_stats.remote())["cached_prompt_tokens"] == cached, "served blocks of the old weights"
            sampled = [i for i, m in enumerate(t.loss_mask) if m]
            assert sampled and {t.weight_versions[i] for i in sampled} == {1}
            [learner_lps] = group.compute_logprobs([t.token_ids])
            assert max(abs(learner_lps[i - 1] - t.logprobs[i]) for i in sampled) < 1e-3
            after = ray.get(w.prompt_logprobs.remote(seq))
            assert max(abs(a - b) for a, b in zip(after, want)) < 1e-4
    finally:
        group.shutdown()
        ray.get(second.shutdown.remote())
        ray.kill(second)
        publish_model(rollout_worker, warm_model_dir, 0)  # later tests sample from the warm model


def test_a_rollout_in_flight_across_a_publish_goes_on_with_the_new_weights(
    rollout_worker, ledger_data: Path, tiny_model_dir: Path, warm_model_dir: Path
) -> None:
    """A publish pauses the engine between two steps, loads, and resumes the rollouts it held.
    Publishing a clearly different model (the tiny model before its warm start) mid-turn: the
    rollouts complete; each token's version is the old one up to one boundary and the new one
    after; tokens before it carry the old model's logprobs, tokens after it the NEW model's
    given their whole context (neither the old weights nor KV they computed sampled them), and
    the old model's logprobs of those later tokens differ (the check can tell the two apart)."""
    publish_model(rollout_worker, warm_model_dir, 0)  # the old weights, whatever ran before
    # Flattened sampling rarely picks eos: long turns that a publish can land in the middle of.
    settings = SamplingSettings(temperature=2.0, max_tokens_per_turn=1200, max_episode_steps=4)
    stats = ray.get(rollout_worker.engine_stats.remote())
    *long, probe = requests_for(ledger_data / "valid.jsonl", 5, step=4)
    refs = [rollout_worker.rollout.remote(r, settings) for r in long]
    # A short rollout submitted after the long ones: once it ends, they have sampled tokens too.
    probed = ray.get(rollout_worker.rollout.remote(probe, SamplingSettings(temperature=2.0, max_tokens_per_turn=8, max_episode_steps=0)))
    new_version = 100
    try:
        publish_model(rollout_worker, tiny_model_dir, new_version)
        trajs = ray.get(refs)
        # A rollout may fill the whole context (it ends budget_exhausted); the engine scores at
        # most max_model_len - 1 tokens, as it must have room to generate one.
        scored = [t.token_ids[: 2048 - 1] for t in trajs]
        by_new = [ray.get(rollout_worker.prompt_logprobs.remote(ids)) for ids in scored]
    finally:
        ray.get(refs)
        publish_model(rollout_worker, warm_model_dir, 0)  # later tests sample from the warm model
    by_old = [ray.get(rollout_worker.prompt_logprobs.remote(ids)) for ids in scored]
    crossed = 0
    for t, ids, new, old in zip(trajs, scored, by_new, by_old):
        assert t.status in (RolloutStatus.OK, RolloutStatus.BUDGET_EXHAUSTED), t.error  # ended as agent loops end
        sampled = [i for i, m in enumerate(t.loss_mask[: len(ids)]) if m]
        versions = [t.weight_versions[i] for i in sampled]
        boundary = versions.index(new_version) if new_version in versions else len(versions)
        assert set(versions[:boundary]) <= {0} and set(versions[boundary:]) <= {new_version}  # one boundary
        crossed += 0 < boundary < len(versions)
        before, after = sampled[:boundary], sampled[boundary:]
        # Each token's logprob is that of the weights its version names, given its whole context.
        assert all(abs(old[i - 1] - t.logprobs[i]) < 1e-3 for i in before)
        assert all(abs(new[i - 1] - t.logprobs[i]) < 1e-3 for i in after)
        if after:  # and the old weights would have given the later tokens other logprobs
            assert sum(abs(old[i - 1] - t.logprobs[i]) for i in after) / len(after) > 0.1
    assert crossed, "the publish should land mid-turn in some rollout"
    counts = ray.get(rollout_worker.engine_stats.remote())
    assert counts["generated_tokens"] - stats["generated_tokens"] == sum(t.generated_tokens for t in [*trajs, probed])


def test_a_turns_sampling_seed_repeats_in_another_process() -> None:
    """A seeded run repeats: the seed of a turn does not depend on the process's hash salt."""
    import subprocess
    import sys

    from rft_cluster.rollout_worker import turn_seed

    code = "from rft_cluster.rollout_worker import turn_seed; print(turn_seed(7, 'trace_ab', 2))"
    others = {subprocess.run([sys.executable, "-c", code], env={**os.environ, "PYTHONHASHSEED": salt}, check=True,
                             capture_output=True, text=True).stdout.strip() for salt in ("1", "2")}
    assert others == {str(turn_seed(7, "trace_ab", 2))}
    assert len({turn_seed(7, "trace_ab", t) for t in range(4)} | {turn_seed(8, "trace_ab", 2)}) == 5
    assert 0 <= turn_seed(7, "trace_ab", 2) < 2**31
