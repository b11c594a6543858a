"""GRPO maths by hand, and the DeepSpeed learner for real on CPU (ZeRO stages 0-3)."""

from __future__ import annotations

import math
import random
from pathlib import Path
from typing import Literal

import pytest
import ray
import torch

from rft_cluster.config import LearnerSpec
from rft_cluster.grpo import group_advantages, policy_loss, token_logprobs
from rft_cluster.learner import Learner
from rft_cluster.staging import Mappings, Staging, pack
from rft_cluster.storage import RunStorage
from rft_cluster.types import TrainSample
from rft_cluster.weight_transfer import Publish, publish_from
from tests.conftest import RunLocation
from tests.test_weight_transfer import RecordingWorker, read_bucket

LR = 2e-5
CLIP = 0.2

# ---------------------------------------------------------------- GRPO maths


def test_group_advantages_normalise_within_each_group() -> None:
    rewards = [1.0, 2.0, 0.0, 2.0, 0.5, 7.0]
    groups = ["a", "b", "a", "b", "a", "c"]
    adv = group_advantages(rewards, groups, eps=0.0)
    # group a: mean 0.5, sample std sqrt((0.25 + 0.25 + 0) / 2) = 0.5
    assert adv[0] == pytest.approx(1.0) and adv[2] == pytest.approx(-1.0) and adv[4] == 0.0
    assert adv[1] == adv[3] == 0.0  # b: all equal
    assert adv[5] == 0.0  # c: a group of one


def test_unscaled_advantages_keep_the_reward_gap_that_scaling_erases() -> None:
    # Two groups, each with one right answer: 2 tool calls (reward 0.8) and 6 (reward 0.4).
    rewards, groups = [0.8, 0.0, 0.0, 0.0, 0.4, 0.0, 0.0, 0.0], ["few"] * 4 + ["many"] * 4
    scaled = group_advantages(rewards, groups, scale=True)
    assert scaled[0] == pytest.approx(scaled[4], rel=1e-5)  # the std division makes them equal
    unscaled = group_advantages(rewards, groups, scale=False)
    assert unscaled[:2] == pytest.approx([0.6, -0.2]) and unscaled[4:6] == pytest.approx([0.3, -0.1])
    assert group_advantages([0.3, 0.3], ["g", "g"], scale=False) == [0.0, 0.0]


def test_group_advantages_equal_rewards_are_exactly_zero() -> None:
    # mean(0.1, 0.1, 0.1) != 0.1 in floats; divided by eps that would be a large advantage
    assert group_advantages([0.1, 0.1, 0.1], ["g"] * 3) == [0.0, 0.0, 0.0]
    # mean 0.5, sample std sqrt(0.5): +-0.5 / (sqrt(0.5) + eps)
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    assert group_advantages([1.0, 0.0], ["g", "g"], eps=1e-6) == pytest.approx([a, -a])
    with pytest.raises(ValueError):
        group_advantages([1.0], ["a", "b"])


def test_token_logprobs_pairs_each_position_with_the_next_token() -> None:
    logits = torch.randn(2, 4, 7, dtype=torch.bfloat16)
    ids = torch.tensor([[1, 2, 3, 4], [6, 5, 0, 0]])
    out = token_logprobs(logits, ids)
    assert out.shape == (2, 3) and out.dtype == torch.float32
    expected = torch.log_softmax(logits[1, 0].float(), -1)[5]
    assert out[1, 0] == pytest.approx(expected.item())


def _ratios_case(adv: float) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """Ratios 1.5, 0.5, 1.1 on three sampled tokens; the fourth is masked, and its
    log-ratio (1000) would overflow exp() if it were not ignored."""
    logprobs = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1), 0.0]], requires_grad=True)
    old = torch.tensor([[0.0, 0.0, 0.0, -1000.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, torch.tensor([[adv]]), mask, clip_eps=0.2)
    loss.backward()
    return loss, logprobs.grad, stats


def test_policy_loss_positive_advantage_clips_above() -> None:
    loss, grad, stats = _ratios_case(+1.0)
    # min(r*A, clip(r)*A): 1.5 -> 1.2 (clipped), 0.5 -> 0.5, 1.1 -> 1.1
    assert loss.item() == pytest.approx(-(1.2 + 0.5 + 1.1) / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    # the clipped token and the masked one get no gradient; d(-r*A/3)/dlogp = -r*A/3
    assert grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3, -1.1 / 3, 0.0])
    kl = ((0.5 - math.log(1.5)) + (-0.5 - math.log(0.5)) + (0.1 - math.log(1.1))) / 3
    assert stats["approx_kl"] == pytest.approx(kl, rel=1e-5)
    assert stats["logprob_gap"] == pytest.approx((math.log(1.5) + math.log(2) + math.log(1.1)) / 3, rel=1e-5)
    assert stats["ratio_mean"] == pytest.approx((1.5 + 0.5 + 1.1) / 3, rel=1e-5)


def test_policy_loss_negative_advantage_clips_below() -> None:
    loss, grad, stats = _ratios_case(-1.0)
    # -1.5 vs -1.2 -> -1.5; -0.5 vs -0.8 -> -0.8 (clipped); -1.1 vs -1.1
    assert loss.item() == pytest.approx((1.5 + 0.8 + 1.1) / 3)
    assert stats["clip_fraction"] == pytest.approx(1 / 3)
    assert grad.tolist()[0] == pytest.approx([1.5 / 3, 0.0, 1.1 / 3, 0.0])


def test_kl_term_is_zero_at_the_reference_and_pulls_the_policy_back_to_it() -> None:
    mask = torch.tensor([[1, 1, 0]])
    old = torch.zeros(1, 3)
    ref = torch.tensor([[-1.0, -2.0, 5.0]])  # the masked third token's value must not count
    for adv in (0.0, 1.0):
        at_ref = ref.clone().requires_grad_(True)
        loss, stats = policy_loss(at_ref, old, torch.tensor([[adv]]), mask, 0.2, ref.clone(), kl_coef=0.5)
        plain, _ = policy_loss(ref.clone(), old, torch.tensor([[adv]]), mask, 0.2)
        assert stats["ref_kl"] == 0.0 and loss.item() == pytest.approx(plain.item())

    drifted = torch.tensor([[-0.5, -3.0, 0.0]], requires_grad=True)  # token 1 up, token 2 down
    loss, stats = policy_loss(drifted, drifted.detach(), torch.zeros(1, 1), mask, 0.2, ref, kl_coef=0.5)
    loss.backward()
    d = torch.tensor([-0.5, 1.0])  # ref - logprob on the sampled tokens
    assert stats["ref_kl"] == pytest.approx((torch.exp(d) - d - 1).mean().item())
    # descending the gradient moves each logprob back toward the reference's
    assert drifted.grad[0, 0] > 0 and drifted.grad[0, 1] < 0 and drifted.grad[0, 2] == 0


def test_tis_weight_truncates_at_the_cap_and_multiplies_the_clipped_surrogate() -> None:
    # Learner old logprobs 0; the engine's put the weight exp(old - engine) at 3 (truncated to
    # the cap 2), 0.5 and 1; the masked fourth's -1000 would overflow exp() if it counted.
    # Ratios 1.5 (clipped to 1.2 at A = 1), 1, 1.
    logprobs = torch.tensor([[math.log(1.5), 0.0, 0.0, 0.0]], requires_grad=True)
    old = torch.zeros(1, 4)
    engine = torch.tensor([[-math.log(3), math.log(2), 0.0, -1000.0]])
    mask = torch.tensor([[1, 1, 1, 0]])
    loss, stats = policy_loss(logprobs, old, torch.tensor([[1.0]]), mask, 0.2, engine_logprobs=engine, tis_cap=2.0)
    loss.backward()
    assert loss.item() == pytest.approx(-(2 * 1.2 + 0.5 * 1 + 1 * 1) / 3)
    # the weight is detached: the clipped token has no gradient, the others -w * r * A / 3
    assert logprobs.grad.tolist()[0] == pytest.approx([0.0, -0.5 / 3, -1 / 3, 0.0])
    assert stats["tis_truncated"] == pytest.approx(1 / 3)
    assert stats["mismatch_mean"] == pytest.approx((math.log(3) + math.log(2)) / 3, rel=1e-6)
    assert stats["mismatch_max"] == pytest.approx(math.log(3), rel=1e-6)
    assert stats["ratio_dev_max"] == pytest.approx(0.5, rel=1e-6)

    # Without a cap the mismatch is still measured, and nothing weighs the surrogate.
    plain, _ = policy_loss(logprobs, old, torch.tensor([[1.0]]), mask, 0.2)
    uncapped, stats = policy_loss(logprobs, old, torch.tensor([[1.0]]), mask, 0.2, engine_logprobs=engine)
    assert uncapped.item() == plain.item() == pytest.approx(-(1.2 + 1 + 1) / 3)
    assert "tis_truncated" not in stats and stats["mismatch_max"] == pytest.approx(math.log(3), rel=1e-6)
    with pytest.raises(ValueError, match="tis_cap needs engine_logprobs"):
        policy_loss(logprobs, old, torch.tensor([[1.0]]), mask, 0.2, tis_cap=2.0)


def test_policy_loss_is_a_token_mean_over_the_whole_batch() -> None:
    # Two sequences with 1 and 3 sampled tokens, on-policy: loss = -(1*A0 + 3*A1) / 4.
    logprobs = torch.zeros(2, 3)
    mask = torch.tensor([[1, 0, 0], [1, 1, 1]])
    loss, _ = policy_loss(logprobs, logprobs, torch.tensor([[2.0], [-1.0]]), mask, clip_eps=0.2)
    assert loss.item() == pytest.approx(-(2.0 - 3.0) / 4)


# ---------------------------------------------------------------- the learner (DeepSpeed on CPU)


@pytest.fixture(scope="module")
def model_dir(tiny_model_dir: Path) -> Path:
    """The session's tiny model (learners only read it): built once, not once more per module."""
    return tiny_model_dir


def make_learner(
    model_dir: Path, learning_rate: float = LR, warmup_steps: int = 0, kl_coef: float = 0.0,
    old_logprobs: Literal["learner", "engine"] = "learner", tis_cap: float | None = 2.0, **spec: object,
) -> Learner:
    return Learner(str(model_dir), LearnerSpec(**spec), learning_rate, CLIP, seed=0, warmup_steps=warmup_steps, kl_coef=kl_coef,
                   old_logprobs=old_logprobs, tis_cap=tis_cap)


def make_batch(learner: Learner, advantages: list[float], seed: int, off_policy: float = 0.0) -> list[TrainSample]:
    """Agent-shaped samples of varied length: prompt, a generated turn, a tool output, a
    generated turn. Rollout logprobs are the learner's own, shifted by up to `off_policy`."""
    rng = random.Random(seed)
    ids, masks = [], []
    for _ in advantages:
        spans = [(rng.randint(3, 8), 0), (rng.randint(2, 10), 1), (rng.randint(1, 5), 0), (rng.randint(1, 8), 1)]
        masks.append([m for n, m in spans for _ in range(n)])
        ids.append([rng.randrange(10, len(learner.tokenizer)) for _ in masks[-1]])
    trainer = learner.compute_logprobs(ids)
    samples = []
    for tok, mask, lps, adv in zip(ids, masks, trainer, advantages):
        rollout = [0.0] + [lp + rng.uniform(-off_policy, off_policy) if m else 0.0 for lp, m in zip(lps, mask[1:])]
        samples.append(TrainSample(tok, mask, rollout, adv))
    return samples


def weights(learner: Learner) -> dict[str, torch.Tensor]:
    return dict(learner.named_weights())


def assert_same_weights(want: dict[str, torch.Tensor], got: dict[str, torch.Tensor]) -> None:
    """Bit-for-bit equal, tensor by tensor (named on failure)."""
    for name in want:
        assert torch.equal(want[name], got[name]), name


def masked_mean_logprob(learner: Learner, samples: list[TrainSample]) -> float:
    lps = learner.compute_logprobs([s.token_ids for s in samples])
    vals = [lp for s, row in zip(samples, lps) for lp, m in zip(row, s.loss_mask[1:]) if m]
    return sum(vals) / len(vals)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [2, 3])
def test_train_steps_lower_the_loss_and_follow_the_advantages(model_dir: Path, stage: int) -> None:
    # The batch keeps the logprobs it was sampled with as the old policy, so repeated steps on
    # it move the ratio away from 1 (recomputed learner logprobs would reset it every step).
    learner = make_learner(model_dir, zero_stage=stage, micro_batch_size=2, old_logprobs="engine", tis_cap=None)
    adv = group_advantages([1.0, 0.0, 1.0, 0.0, 0.0, 1.0], ["a", "a", "a", "b", "b", "b"])
    batch = make_batch(learner, adv, seed=1)
    unusable = TrainSample([5, 6, 7], [1, 0, 0], [0.0, 0.0, 0.0], 1.0)  # only token 0, which has no prefix
    pos = [s for s in batch if s.advantage > 0]
    neg = [s for s in batch if s.advantage < 0]
    before = masked_mean_logprob(learner, pos), masked_mean_logprob(learner, neg)

    history = [learner.train_step(batch + [unusable]) for _ in range(5)]

    losses = [m["loss"] for m in history]
    assert losses[-1] < losses[0] - 0.05, losses
    first = history[0]
    assert first["samples"] == len(batch)
    assert first["tokens"] == sum(sum(s.loss_mask[1:]) for s in batch)
    assert first["logprob_gap"] < 1e-4 and first["clip_fraction"] == 0.0  # on-policy at step 1
    # A step's gradient vanishes only once the clip has removed it from every token.
    assert history[-1]["approx_kl"] > 0 and first["grad_norm"] > 0
    assert all(m["grad_norm"] > 0 or m["clip_fraction"] > 0.999 for m in history)
    assert first["lr"] == LR
    after = masked_mean_logprob(learner, pos), masked_mean_logprob(learner, neg)
    assert after[0] > before[0] and after[1] < before[1]


@pytest.mark.slow
def test_a_batch_with_nothing_to_train_changes_nothing(model_dir: Path) -> None:
    learner = make_learner(model_dir, zero_stage=2)
    w0 = weights(learner)
    m = learner.train_step([TrainSample([5, 6, 7], [0, 0, 0], [0.0] * 3, 1.0)])
    assert m["tokens"] == 0 and m["samples"] == 0
    for name, t in weights(learner).items():
        assert torch.equal(t, w0[name]), name


def plain_torch_step(model_dir: Path, batch: list[TrainSample], tis_cap: float | None = None) -> tuple[float, float]:
    """Loss and gradient norm of the batch as ONE padded batch through plain transformers:
    the reference the learner must match however it micro-batches. With `tis_cap`, as
    old_logprobs "learner" computes it: the old policy is the model's own logprobs."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir)
    width = max(len(s.token_ids) for s in batch)

    def pad(rows: list[list], value: float) -> torch.Tensor:
        return torch.tensor([r + [value] * (width - len(r)) for r in rows])

    ids = pad([s.token_ids for s in batch], 0)
    attn = pad([[1] * len(s.token_ids) for s in batch], 0)
    logprobs = token_logprobs(model(input_ids=ids, attention_mask=attn).logits, ids)
    engine = pad([s.rollout_logprobs for s in batch], 0.0)[:, 1:]
    mask = pad([s.loss_mask for s in batch], 0)[:, 1:]
    adv = torch.tensor([[s.advantage] for s in batch])
    if tis_cap is None:
        loss, _ = policy_loss(logprobs, engine, adv, mask, CLIP)
    else:
        loss, _ = policy_loss(logprobs, logprobs.detach(), adv, mask, CLIP, engine_logprobs=engine, tis_cap=tis_cap)
    loss.backward()
    return loss.item(), math.sqrt(sum(p.grad.double().square().sum().item() for p in model.parameters()))


@pytest.mark.slow
@pytest.mark.parametrize(("stage", "checkpointing", "old_logprobs"), [
    (0, False, "engine"), (1, False, "learner"), (2, False, "engine"), (3, True, "learner"),
])
def test_micro_batching_does_not_change_the_step(model_dir: Path, stage: int, checkpointing: bool, old_logprobs: str) -> None:
    # Five samples of different token counts, split 1+1+1+1+1 and 4+1: both must give the
    # loss and gradient of the whole batch's token mean (gradient checkpointing too).
    # Off-policy logprobs make some tokens clip (engine logprobs as the old policy) or some
    # TIS weights truncate (the learner's recomputed, with a cap of 1.1).
    advantages = [1.5, -0.5, 0.7, -1.2, 0.3]
    tis_cap = 1.1 if old_logprobs == "learner" else None
    runs = []
    for mbs in (1, 4):
        learner = make_learner(model_dir, zero_stage=stage, micro_batch_size=mbs, gradient_checkpointing=checkpointing,
                               old_logprobs=old_logprobs, tis_cap=tis_cap)
        batch = make_batch(learner, advantages, seed=2, off_policy=0.3)
        before = weights(learner)
        runs.append((learner.train_step(batch), before, weights(learner)))
    (m1, before, w1), (m4, _, w4) = runs
    ref_loss, ref_grad_norm = plain_torch_step(model_dir, batch, tis_cap)
    assert (m1["tis_truncated"] if tis_cap else m1["clip_fraction"]) > 0
    for m in (m1, m4):
        assert m["loss"] == pytest.approx(ref_loss, rel=1e-5)
        assert m["grad_norm"] == pytest.approx(ref_grad_norm, rel=1e-5)
    stats = ("mismatch_mean", "mismatch_max", "tis_truncated") if tis_cap else ("clip_fraction", "approx_kl", "logprob_gap")
    for key in (*stats, "ratio_dev_max", "tokens"):
        assert m1[key] == pytest.approx(m4[key], rel=1e-5, abs=1e-7), key
    # Adam's first step is about lr * sign(grad) whatever the gradient's scale, so weights are a
    # coarse check (the gradient norm above is the sharp one); every tensor must have moved.
    for name in w1:
        assert not torch.equal(w1[name], before[name]), name
        torch.testing.assert_close(w1[name], w4[name], rtol=0, atol=LR / 10, msg=name)


def mismatch_by_hand(learner: Learner, batch: list[TrainSample], cap: float) -> tuple[float, float, float]:
    """Mean and max |learner - engine logprob| over the trained tokens, and the share whose
    weight exp(learner - engine) exceeds `cap`, from the learner's logprobs before its step."""
    gaps = [lp - s.rollout_logprobs[t + 1] for s, row in zip(batch, learner.compute_logprobs([s.token_ids for s in batch]))
            for t, lp in enumerate(row) if s.loss_mask[t + 1]]
    return sum(map(abs, gaps)) / len(gaps), max(map(abs, gaps)), sum(g > math.log(cap) for g in gaps) / len(gaps)


@pytest.mark.slow
def test_recomputed_old_logprobs_put_the_ratio_at_one_and_measure_the_engine_gap(model_dir: Path) -> None:
    # Engine logprobs off by up to 1 nat (a mismatch larger than bf16's, so that some weights
    # pass the cap of 2); micro-batches of one sample, so the step's max must be the max over
    # micro-batches, not their token-weighted mean.
    learner = make_learner(model_dir, zero_stage=2, micro_batch_size=1)
    batch = make_batch(learner, [1.0, -1.0, 0.5, -0.5], seed=9, off_policy=1.0)
    mean, biggest, truncated = mismatch_by_hand(learner, batch, 2.0)
    recomputed = learner.train_step(batch)
    assert recomputed["ratio_mean"] == pytest.approx(1.0, abs=1e-6) and recomputed["ratio_dev_max"] < 1e-5
    assert recomputed["clip_fraction"] == 0.0
    assert recomputed["mismatch_mean"] == pytest.approx(mean, abs=1e-5)
    assert recomputed["mismatch_max"] == pytest.approx(biggest, abs=1e-5) and biggest > 1.5 * mean
    assert recomputed["tis_truncated"] == pytest.approx(truncated) and truncated > 0

    engine = make_learner(model_dir, zero_stage=2, micro_batch_size=1, old_logprobs="engine", tis_cap=None).train_step(batch)
    assert engine["ratio_dev_max"] > 0.5 and engine["clip_fraction"] > 0.1
    assert not {"mismatch_mean", "mismatch_max", "tis_truncated", "recompute_seconds"} & engine.keys()
    with pytest.raises(ValueError, match="tis_cap needs old_logprobs 'learner'"):
        make_learner(model_dir, old_logprobs="engine")


@pytest.mark.slow
def test_the_weight_source_gathers_partitioned_weights_into_buckets_as_its_metadata_says(model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    learner = make_learner(model_dir, zero_stage=3)  # partitioned: the source must gather
    source, mappings = learner.weight_source(), Mappings()
    buckets, unpacked = 0, {}
    for b in pack(source, [Staging()], 1 << 20):  # one area: each bucket read before the next
        buckets += 1
        unpacked |= read_bucket(b, mappings)
    assert [(m.name, m.shape, m.dtype) for m in source.metadata()] == [(n, tuple(t.shape), t.dtype) for n, t in unpacked.items()]

    reference = AutoModelForCausalLM.from_pretrained(model_dir)
    assert reference.config.tie_word_embeddings
    expected = dict(reference.named_parameters())
    assert buckets > 1
    assert "lm_head.weight" not in unpacked and "model.embed_tokens.weight" in unpacked
    assert unpacked.keys() == expected.keys()
    for name, t in unpacked.items():
        assert torch.equal(t, expected[name].detach()), name


@pytest.mark.slow
def test_save_hf_loads_in_transformers_with_the_same_logprobs(model_dir: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    learner = make_learner(model_dir, zero_stage=3)
    batch = make_batch(learner, [1.0, -1.0], seed=3)
    seqs = [s.token_ids for s in batch]
    initial = learner.compute_logprobs(seqs)
    learner.train_step(batch)  # the saved weights must be the trained ones, not the initial
    path = learner.save_hf(RunStorage(tmp_path), "hf")
    assert path == str(tmp_path / "hf")

    model = AutoModelForCausalLM.from_pretrained(path).eval()
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert tokenizer.chat_template == learner.tokenizer.chat_template
    assert (Path(path) / "generation_config.json").exists()
    ours = learner.compute_logprobs(seqs)
    with torch.no_grad():
        for ids, mine, before in zip(seqs, ours, initial):
            theirs = token_logprobs(model(torch.tensor([ids])).logits, torch.tensor([ids]))[0].tolist()
            assert theirs == pytest.approx(mine, abs=1e-5)
            assert theirs != pytest.approx(before, abs=1e-5)


@pytest.mark.slow
def test_save_state_and_load_state_resume_identically(model_dir: Path, run_location: RunLocation) -> None:
    st = RunStorage(run_location.uri)
    a = make_learner(model_dir, zero_stage=2)
    batch1 = make_batch(a, [1.0, -1.0, 0.5], seed=4)
    batch2 = make_batch(a, [-0.5, 1.0, 0.2], seed=5)
    a.train_step(batch1)
    a.save_state(st, "state", "step-1")
    files = run_location.files()
    assert "state/latest" in files and "state/step-1/mp_rank_00_model_states.pt" in files
    assert any(f.startswith("state/step-1/zero_pp_rank_0_") for f in files)  # the rank's optimizer shard

    b = make_learner(model_dir, zero_stage=2)
    b.load_state(st, "state", "step-1")
    assert_same_weights(weights(a), weights(b))
    # Adam's second step depends on the moments from the first: identical updates mean the
    # optimizer state came back too (a fresh Adam would step by about lr * sign(grad)).
    ma, mb = a.train_step(batch2), b.train_step(batch2)
    assert ma["loss"] == mb["loss"] and ma["grad_norm"] == mb["grad_norm"]
    assert_same_weights(weights(a), weights(b))
    with pytest.raises(FileNotFoundError, match="step-2"):
        b.load_state(st, "state", "step-2")


@pytest.mark.slow
def test_warmup_ramps_the_rate_and_a_resumed_run_continues_the_ramp(model_dir: Path, tmp_path: Path) -> None:
    a = make_learner(model_dir, warmup_steps=2, zero_stage=2)
    batch = make_batch(a, [1.0, -1.0, 0.5], seed=6)
    rates = [a.train_step(batch)["lr"]]
    a.save_state(RunStorage(tmp_path), "ckpt", "step-1")
    rates += [a.train_step(batch)["lr"] for _ in range(3)]
    assert rates == pytest.approx([LR / 3, 2 * LR / 3, LR, LR])

    b = make_learner(model_dir, warmup_steps=2, zero_stage=2)
    b.load_state(RunStorage(tmp_path), "ckpt", "step-1")
    assert b.train_step(batch)["lr"] == pytest.approx(2 * LR / 3)  # a fresh schedule would be back at LR / 3


@pytest.mark.slow
def test_kl_coef_anchors_training_to_the_starting_weights(model_dir: Path) -> None:
    learner = make_learner(model_dir, learning_rate=1e-3, kl_coef=0.1, zero_stage=2)
    batch = make_batch(learner, [1.0, -1.0, 0.5], seed=7)
    first, second = learner.train_step(batch), learner.train_step(batch)
    assert first["ref_kl"] < 1e-6  # the policy starts as the reference
    assert second["ref_kl"] > 1e-4  # one step later it has moved, and the loss says by how much
    assert "ref_kl" not in make_learner(model_dir, zero_stage=2).train_step(batch)  # no reference, no term


@pytest.mark.slow
def test_publish_sends_every_bucket_to_every_worker_between_start_and_finish(model_dir: Path, ray_local: None) -> None:
    learner = make_learner(model_dir, zero_stage=2)
    workers = [RecordingWorker.remote() for _ in range(2)]
    try:
        result = publish_from(learner, Publish(workers, 7, 1 << 20, "rft_shm", None))
        recorded = ray.get([w.recorded.remote() for w in workers])
    finally:
        for w in workers:
            ray.kill(w)

    n = result.buckets
    assert n > 1
    expected = weights(learner)
    assert result.bytes == sum(t.numel() * t.element_size() for t in expected.values())
    assert result.lost == []
    for calls, tensors in recorded:
        assert calls == ["init", "start"] + ["update"] * n + ["finish 7"]
        assert tensors.keys() == expected.keys()
        for name, t in tensors.items():
            assert torch.equal(t, expected[name]), name


@pytest.mark.slow
def test_cpu_threads_overrides_the_thread_count_ray_gives_a_learner_actor(model_dir: Path, ray_local: None) -> None:
    # Ray caps an actor's OMP_NUM_THREADS at its num_cpus; a sync run's learner may use the cores
    # the idle engine leaves it.
    threads = []
    for cpu_threads in (None, 2):
        actor = ray.remote(num_cpus=1)(Learner).remote(str(model_dir), LearnerSpec(cpu_threads=cpu_threads), LR, CLIP, 0)
        threads.append(ray.get(actor.__ray_call__.remote(lambda _: torch.get_num_threads())))
        ray.kill(actor)
    assert threads == [1, 2]
