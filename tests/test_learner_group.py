"""The learner as a group of Ray actors: a 2-rank DeepSpeed world (gloo, CPU) must take the
same step as one rank and publish weights the engine reproduces; buckets of any dtype."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Literal

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from rft_cluster.config import LearnerSpec
from rft_cluster.learner_group import LearnerGroup, split_by_tokens
from rft_cluster.types import TrainSample
from rft_cluster.weight_transfer import NamedWeights, Publish, publish, publish_from
from tests.test_learner import CLIP, LR, assert_same_weights, make_batch
from tests.test_weight_transfer import RecordingWorker

pytestmark = pytest.mark.slow


def test_split_by_tokens_balances_sequence_lengths() -> None:
    samples = [TrainSample([1] * n, [1] * n, [0.0] * n, 1.0) for n in (9, 1, 4, 4, 2)]
    shares = split_by_tokens(samples, 2)
    assert sorted(sum(len(s.token_ids) for s in share) for share in shares) == [10, 10]
    assert sorted(len(s.token_ids) for share in shares for s in share) == [1, 2, 4, 4, 9]


def test_several_ranks_need_a_zero_stage_that_reduces_gradients() -> None:
    from pydantic import ValidationError

    with pytest.raises(ValidationError, match="ranks > 1 needs zero_stage 1, 2 or 3"):
        LearnerSpec(ranks=2, zero_stage=0)
    assert LearnerSpec(ranks=2, zero_stage=1).ranks == 2


def start_group(
    model_dir: Path, ranks: int, learning_rate: float = LR, env: dict[str, str] | None = None,
    old_logprobs: Literal["learner", "engine"] = "learner", tis_cap: float | None = 2.0, **spec: object,
) -> LearnerGroup:
    """`env`: variables the ranks' processes get (the session's Ray started before the test set them)."""
    options = [{"num_cpus": 1, "runtime_env": {"env_vars": env}}] * ranks if env else None
    return LearnerGroup(str(model_dir), LearnerSpec(ranks=ranks, **spec), learning_rate, CLIP, seed=0, actor_options=options,
                        old_logprobs=old_logprobs, tis_cap=tis_cap)


def group_weights(group: LearnerGroup) -> dict[str, torch.Tensor]:
    """The group's weights as a rollout worker receives them."""
    worker = RecordingWorker.remote()
    publish_from(group, Publish([worker], 0, 64 << 20, "rft_shm", None))
    _, tensors = ray.get(worker.recorded.remote())
    ray.kill(worker)
    return tensors


def group_batch(group: LearnerGroup, model_dir: Path, advantages: list[float], seed: int, off_policy: float = 0.0) -> list[TrainSample]:
    scorer = SimpleNamespace(tokenizer=AutoTokenizer.from_pretrained(model_dir), compute_logprobs=group.compute_logprobs)
    return make_batch(scorer, advantages, seed, off_policy)


@pytest.fixture
def groups() -> Iterator[list[LearnerGroup]]:
    """Groups a test starts; none outlives it."""
    started: list[LearnerGroup] = []
    yield started
    for g in started:
        g.shutdown()


@pytest.mark.parametrize(("stage", "old_logprobs"), [(2, "engine"), (3, "learner")])
def test_two_ranks_take_the_one_rank_step(
    tiny_model_dir: Path, ray_local: None, groups: list[LearnerGroup], stage: int, old_logprobs: Literal["learner", "engine"]
) -> None:
    # Five samples over two ranks: one rank has more micro-batches than the other (and runs an
    # empty one, in the recompute too, so that the ZeRO collectives pair up). Off-policy
    # logprobs make some tokens clip (engine logprobs as the old policy) or some TIS weights
    # truncate (the learner's recomputed, with a cap of 1.1); maxima must be maxed over ranks.
    tis_cap = 1.1 if old_logprobs == "learner" else None
    runs = []
    for ranks in (1, 2):
        group = start_group(tiny_model_dir, ranks, zero_stage=stage, micro_batch_size=1, old_logprobs=old_logprobs, tis_cap=tis_cap)
        groups.append(group)
        assert [r.rank for r in group.ranks] == list(range(ranks))
        batch = group_batch(group, tiny_model_dir, [1.5, -0.5, 0.7, -1.2, 0.3], seed=2, off_policy=0.3)
        before = group_weights(group)
        t0 = time.perf_counter()
        stats = group.train_step(batch)
        runs.append((stats, time.perf_counter() - t0, before, group_weights(group)))
    (m1, s1, before, w1), (m2, s2, _, w2) = runs
    assert (m1["tis_truncated"] if tis_cap else m1["clip_fraction"]) > 0
    stats = ("mismatch_mean", "mismatch_max", "tis_truncated") if tis_cap else ("clip_fraction", "approx_kl", "logprob_gap")
    for key in ("loss", "grad_norm", *stats, "ratio_dev_max", "tokens", "samples"):
        assert m2[key] == pytest.approx(m1[key], rel=1e-5, abs=1e-7), key
    gaps = {name: (w2[name] - w1[name]).abs().max().item() for name in w1}
    for name in w1:
        assert not torch.equal(w1[name], before[name]), name
        torch.testing.assert_close(w2[name], w1[name], rtol=0, atol=1e-7, msg=name)
    print(f"\nstage {stage}: step 1 rank {s1:.2f} s, 2 ranks {s2:.2f} s; loss {m1['loss']:.8f} vs {m2['loss']:.8f} "
          f"(rel {abs(m2['loss'] - m1['loss']) / abs(m1['loss']):.1e}); grad_norm rel "
          f"{abs(m2['grad_norm'] - m1['grad_norm']) / m1['grad_norm']:.1e}; max weight gap {max(gaps.values()):.1e}")


def fp32_weights(model_dir: Path) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in AutoModelForCausalLM.from_pretrained(model_dir).named_parameters()}


@pytest.fixture
def restore_engine(rollout_worker, warm_model_dir: Path) -> Iterator[None]:
    """The session's engine serves the warm model at version 0 again after the test (later
    tests sample from it), exactly: it scores a sequence as it did before."""
    seq = make_batch_ids(warm_model_dir)
    start = ray.get(rollout_worker.prompt_logprobs.remote(seq))
    yield
    publish(NamedWeights.of(fp32_weights(warm_model_dir)), [rollout_worker], version=0, bucket_bytes=64 << 20)
    assert engine_gap(rollout_worker, seq, start) == 0.0


def engine_gap(rollout_worker, seq: list[int], want: list[float]) -> float:
    got = ray.get(rollout_worker.prompt_logprobs.remote(seq))
    assert len(got) == len(want) == len(seq) - 1
    return max(abs(a - b) for a, b in zip(got, want))


def test_engine_matches_a_two_rank_zero3_learner_after_its_publish(
    rollout_worker, warm_model_dir: Path, ray_local: None, groups: list[LearnerGroup], restore_engine: None
) -> None:
    """Rank 0 gathers the ZeRO-3 shards and publishes; the engine then scores a sequence as the
    group does (fp32 on both sides; bound as in test_rollout's single-rank proof)."""
    group = start_group(warm_model_dir, 2, learning_rate=5e-3, zero_stage=3)
    groups.append(group)
    batch = group_batch(group, warm_model_dir, [1.0, -1.0, 0.5, -0.5], seed=8)
    group.train_step(batch)
    seq = batch[0].token_ids
    [want] = group.compute_logprobs([seq])
    assert engine_gap(rollout_worker, seq, want) > 1e-2, "the step should have changed the weights"
    sync = publish_from(group, Publish([rollout_worker], 1, 1 << 20, "rft_shm", None))
    gap = engine_gap(rollout_worker, seq, want)
    print(f"\n2-rank ZeRO-3 publish: {sync.bytes / 1e6:.2f} MB in {sync.buckets} "
          f"buckets, {sync.seconds:.2f} s; engine-vs-learner logprob gap {gap:.1e}")
    assert gap < 1e-4
    assert sync.buckets > 1


def test_bf16_buckets_load_into_an_fp32_engine_exactly(
    rollout_worker, warm_model_dir: Path, tiny_model_dir: Path, restore_engine: None
) -> None:
    """bfloat16 buckets (what a bf16 GPU learner sends) into the shared fp32 engine: vLLM's
    loader widens bf16 to fp32, which is exact, so the engine must score like transformers
    holding the same bf16-rounded values in fp32 (bound 1e-4, as for fp32 publishes). The
    weights are the untrained tiny model's, far from the warm model the engine serves, so a
    publish that did not land would show."""
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir).eval()
    rounded = {n: p.detach().to(torch.bfloat16) for n, p in model.named_parameters()}
    seq = make_batch_ids(tiny_model_dir)
    exact = reference_logprobs(model, seq)  # the unrounded fp32 weights
    with torch.no_grad():
        for n, p in model.named_parameters():
            p.copy_(rounded[n])  # bf16 -> fp32: exact
    want = reference_logprobs(model, seq)
    assert engine_gap(rollout_worker, seq, want) > 1e-2
    sync = publish(NamedWeights.of(rounded), [rollout_worker], version=1, bucket_bytes=1 << 20)
    gap = engine_gap(rollout_worker, seq, want)
    print(f"\nbf16 publish: {sync.bytes / 1e6:.2f} MB ({sync.buckets} buckets, "
          f"{sync.seconds:.2f} s); engine vs bf16-rounded reference {gap:.1e}; rounding itself moved "
          f"logprobs by up to {max(abs(a - b) for a, b in zip(want, exact)):.1e}")
    assert gap < 1e-4
    n_params = sum(t.numel() for t in rounded.values())
    assert sync.bytes == 2 * n_params  # half an fp32 publish


def make_batch_ids(model_dir: Path) -> list[int]:
    """A fixed chat-shaped sequence."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    messages = [{"role": "user", "content": "What is the balance of account 7?"}, {"role": "assistant", "content": "Let me look it up."}]
    return tok.apply_chat_template(messages, tokenize=True, return_dict=False)


def reference_logprobs(model: torch.nn.Module, seq: list[int]) -> list[float]:
    from rft_cluster.grpo import token_logprobs

    ids = torch.tensor([seq])
    with torch.no_grad():
        return token_logprobs(model(ids).logits, ids)[0].tolist()


CPU_RUNS_BF16 = "avx512_bf16" in Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else False


@pytest.mark.skipif(not CPU_RUNS_BF16, reason="vLLM's CPU bf16 engine needs avx512_bf16")
def test_bf16_engine_takes_bf16_buckets(ray_local: None, tiny_model_dir: Path, warm_model_dir: Path) -> None:
    """bf16 buckets into a bf16 engine (the GPU path's dtypes), started on the tiny model.
    vLLM's bf16 kernels and torch's round differently, so the engine is held to transformers
    within a bf16 bound, and to itself exactly: publishing the weights it started with brings
    back its starting logprobs."""
    from rft_cluster.config import EngineSpec
    from rft_cluster.rollout_worker import RolloutWorker

    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(str(tiny_model_dir), EngineSpec(dtype="bfloat16", max_model_len=512), 0, [])
    try:
        ray.get(worker.start.remote())
        seq = make_batch_ids(warm_model_dir)
        start = ray.get(worker.prompt_logprobs.remote(seq))
        warm = AutoModelForCausalLM.from_pretrained(warm_model_dir, dtype=torch.bfloat16).eval()
        rounded = {n: p.detach() for n, p in warm.named_parameters()}  # kept bf16 by .float() below
        want = reference_logprobs(warm.float(), seq)  # the bf16 values, computed in fp32
        before = max(abs(a - b) for a, b in zip(start, want))

        sync = publish(NamedWeights.of(rounded), [worker], version=1, bucket_bytes=1 << 20)
        gap = engine_gap(worker, seq, want)
        publish(NamedWeights.of({n: t.to(torch.bfloat16) for n, t in fp32_weights(tiny_model_dir).items()}), [worker], version=2, bucket_bytes=1 << 20)
        back = engine_gap(worker, seq, start)
        print(f"\nbf16 engine: {sync.bytes / 1e6:.2f} MB; engine vs transformers {gap:.1e} "
              f"(before the publish {before:.1e}); republished start weights reproduce start logprobs to {back:.1e}")
        assert sync.bytes == 2 * sum(t.numel() for t in rounded.values())
        assert gap < before / 20
        assert back < 1e-6
    finally:
        ray.get(worker.shutdown.remote())
        ray.kill(worker)


def test_two_zero3_ranks_checkpoint_to_s3_and_resume_identically(
    tiny_model_dir: Path, ray_local: None, groups: list[LearnerGroup], s3_server, s3_prefix: str, tmp_path: Path
) -> None:
    """No shared disk: each rank stages its own DeepSpeed shards and uploads only those; rank 0
    alone gathers into the HF directory. A fresh 2-rank group restored from the bucket holds the
    same weights and takes the same next step (Adam's moments came back with every shard)."""
    from rft_cluster.storage import RunStorage

    st = RunStorage(s3_server.uri(s3_prefix))
    # The credentials every node of a real cluster would have in its environment.
    env = {k: os.environ[k] for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_DEFAULT_REGION")}
    a = start_group(tiny_model_dir, 2, env=env, zero_stage=3, micro_batch_size=2)
    groups.append(a)
    batch1 = group_batch(a, tiny_model_dir, [1.0, -1.0, 0.5, -0.3], seed=4)
    batch2 = group_batch(a, tiny_model_dir, [-0.5, 1.0, 0.2, 0.8], seed=5)
    a.train_step(batch1)
    a.save_state(st, "state", "step-1")
    a.save_hf(st, "hf")
    keys = s3_server.keys(s3_prefix)
    for rank in (0, 1):
        assert any(k.startswith(f"state/step-1/zero_pp_rank_{rank}_") for k in keys), (rank, keys)
    assert "state/latest" in keys and "hf/config.json" in keys

    wa = group_weights(a)
    assert_same_weights(wa, fp32_weights(st.download_dir("hf", tmp_path / "hf")))

    b = start_group(tiny_model_dir, 2, env=env, zero_stage=3, micro_batch_size=2)
    groups.append(b)
    b.load_state(st, "state", "step-1")
    assert_same_weights(wa, group_weights(b))
    ma, mb = a.train_step(batch2), b.train_step(batch2)
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
    assert_same_weights(group_weights(a), group_weights(b))
