"""GRPO maths: group-relative advantages and the clipped, importance-weighted policy loss.

Pure functions over lists and tensors, so they can be checked by hand; the learner
(`learner.py`) batches trajectories into these shapes.
"""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from typing import Literal

import torch

# exp() of a log-ratio beyond this overflows fp32 (exp(89) = inf), and inf * a negative
# advantage would make the loss infinite; a ratio of e^20 is already fully clipped anyway.
_MAX_LOG_RATIO = 20.0

# `policy_loss` stats that are maxima over the tokens: combined over micro-batches and ranks by
# max, where every other stat, a token mean, is weighted by its tokens.
MAX_STATS = frozenset({"mismatch_max", "ratio_dev_max"})


def shaped_reward(
    score: float,
    tool_calls: int,
    reasoning_tokens: int,
    tool_call_penalty: float,
    mode: Literal["subtract", "scale"],
    reasoning_token_penalty: float,
) -> float:
    """The reward trained on. "subtract": score - penalty * calls. "scale": score * max(0, 1 -
    penalty * calls), so a wrong answer is not made worse by its calls: with group-normalised
    advantages, a subtracted penalty in a group that all failed would reward the rollout that
    gave up soonest, teaching the policy to answer without looking. Either way the reasoning
    penalty is subtracted per token."""
    if mode == "scale":
        tool_part = score * max(0.0, 1.0 - tool_call_penalty * tool_calls)
    else:
        tool_part = score - tool_call_penalty * tool_calls
    return tool_part - reasoning_token_penalty * reasoning_tokens


def group_advantages(rewards: list[float], group_ids: list[str], scale: bool = True, eps: float = 1e-6) -> list[float]:
    """GRPO advantage of each rollout: (r - mean of its group) / (std of its group + eps).

    With `scale=False` the advantage is r - mean alone (Dr. GRPO): dividing by the std gives a
    group's one right answer the same advantage whatever its reward, so a penalty that only
    lowers that reward (tool calls, "scale" mode) would teach nothing in such groups.

    The std is the sample std (Bessel-corrected), as TRL and veRL compute it. A group whose
    rewards are all equal, or of size 1, carries no learning signal and gets 0 for every
    member (tested for equality exactly: float round-off in the mean must not become a
    huge advantage once divided by eps).
    """
    if len(rewards) != len(group_ids):
        raise ValueError(f"{len(rewards)} rewards but {len(group_ids)} group ids")
    # Graders' scores are finite and bounded (`score_range`); a non-finite reward here is a bug
    # upstream, and would turn every advantage of its group into NaN, and the weights after them.
    if bad := [r for r in rewards if not math.isfinite(r)]:
        raise ValueError(f"rewards must be finite, got {bad[0]!r}")
    groups: dict[str, list[float]] = defaultdict(list)
    for r, g in zip(rewards, group_ids):
        groups[g].append(r)
    stats: dict[str, tuple[float, float] | None] = {
        g: None if len(set(rs)) == 1 else (statistics.fmean(rs), statistics.stdev(rs)) for g, rs in groups.items()
    }
    out = []
    for r, g in zip(rewards, group_ids):
        s = stats[g]
        out.append(0.0 if s is None else (r - s[0]) / (s[1] + eps if scale else 1.0))
    return out


def token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor) -> torch.Tensor:
    """Logprob of each next token: out[b, t] = log p(token_ids[b, t+1] | token_ids[b, :t+1]).

    logits: [B, T, V] from a causal LM over token_ids [B, T]; returns [B, T-1]. The softmax
    runs in fp32 because bf16 logprobs are too coarse for the importance ratio.
    """
    logp = torch.log_softmax(logits[:, :-1].float(), dim=-1)
    return logp.gather(-1, token_ids[:, 1:].unsqueeze(-1)).squeeze(-1)


def policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    clip_eps: float,
    ref_logprobs: torch.Tensor | None = None,
    kl_coef: float = 0.0,
    engine_logprobs: torch.Tensor | None = None,
    tis_cap: float | None = None,
) -> tuple[torch.Tensor, dict[str, float]]:
    """PPO/GRPO clipped surrogate, averaged over the masked tokens of the whole batch, plus
    `kl_coef` times the KL to a reference policy when `ref_logprobs` ([B, T], no grad) are given.

    logprobs: [B, T] the trainer's, with grad. old_logprobs: [B, T] the old policy's, the PPO
    ratio's denominator: ratio = exp(logprobs - old_logprobs). They are either the rollout
    engine's sampling logprobs (then the ratio is also the importance weight for the
    trainer/engine mismatch: other kernels, stale weights in async mode), or the trainer's own
    recomputed before the update, with the engine's then given as `engine_logprobs` [B, T]:
    that mismatch is measured (stats below), and with `tis_cap` each token's surrogate is
    multiplied by the truncated importance weight w = min(exp(old_logprobs - engine_logprobs),
    tis_cap), detached (TIS). advantages: broadcastable to [B, T] ([B, 1] per sequence).
    mask: [B, T], true on tokens the policy sampled; all others are ignored entirely.

    The mean is over tokens, not per sequence then over sequences: every generated token
    weighs the same, so long trajectories are not down-weighted per token (DAPO's argument)
    and the loss does not depend on how the batch is split into micro-batches.

    stats (over masked tokens): clip_fraction (share whose gradient the clip removes),
    approx_kl (k3 estimator: mean of (ratio - 1) - log ratio), logprob_gap (mean
    |logprob - old_logprob|: the rollout/trainer gap when the engine's are the old),
    ratio_mean, ratio_dev_max (max |ratio - 1|), and with a reference ref_kl (GRPO's
    per-token k3 estimate of KL(policy || reference): e^d - d - 1 with d = ref - logprob,
    never negative, zero with zero gradient where the two agree); with `engine_logprobs`
    mismatch_mean and mismatch_max (mean and max |old_logprob - engine_logprob|), and with
    `tis_cap` tis_truncated (share whose weight the cap lowered). The `MAX_STATS` are maxima,
    every other stat a token mean.
    """
    if tis_cap is not None and engine_logprobs is None:
        raise ValueError("tis_cap needs engine_logprobs: the weight is old_logprobs over the engine's")
    mask = mask.bool()
    # Masked positions may hold arbitrary old logprobs (0.0 for prompt tokens): zero their
    # log-ratio so nothing non-finite can leak into the sums through them.
    diff = torch.where(mask, logprobs - old_logprobs, 0.0)
    log_ratio = diff.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
    ratio = torch.exp(log_ratio)
    advantages = advantages.to(ratio.dtype)
    unclipped = ratio * advantages
    clipped = ratio.clamp(1.0 - clip_eps, 1.0 + clip_eps) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    n = mask.sum().clamp(min=1)

    def masked_mean(x: torch.Tensor) -> torch.Tensor:
        return torch.where(mask, x, 0.0).sum() / n

    def masked_max(x: torch.Tensor) -> float:  # of x >= 0
        return torch.where(mask, x, 0.0).max().item()

    stats: dict[str, float] = {}
    if engine_logprobs is not None:
        mismatch = torch.where(mask, old_logprobs - engine_logprobs, 0.0).detach()
        stats |= {"mismatch_mean": masked_mean(mismatch.abs()).item(), "mismatch_max": masked_max(mismatch.abs())}
        if tis_cap is not None:
            weight = torch.exp(mismatch.clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO))
            stats["tis_truncated"] = masked_mean((weight > tis_cap).float()).item()
            per_token = per_token * weight.clamp(max=tis_cap)
    loss = masked_mean(per_token)
    ref_kl = None
    if ref_logprobs is not None:
        d = torch.where(mask, ref_logprobs - logprobs, 0.0).clamp(-_MAX_LOG_RATIO, _MAX_LOG_RATIO)
        ref_kl = masked_mean(torch.exp(d) - d - 1.0)
        loss = loss + kl_coef * ref_kl
    with torch.no_grad():
        stats |= {
            "clip_fraction": masked_mean((clipped < unclipped).float()).item(),
            "approx_kl": masked_mean((ratio - 1.0) - log_ratio).item(),
            "logprob_gap": masked_mean(diff.abs()).item(),
            "ratio_mean": masked_mean(ratio).item(),
            "ratio_dev_max": masked_max((ratio - 1.0).abs()),
        }
    if ref_kl is not None:
        stats["ref_kl"] = ref_kl.item()
    return loss, stats
