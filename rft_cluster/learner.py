"""The learner: a DeepSpeed engine that takes GRPO steps and hands out its weights (how they
travel to the engines is `weight_sync`'s).

A plain class. Alone it is a one-process DeepSpeed world (tests, `sft`); `LearnerGroup` runs
`ranks` of them as Ray actors forming one world (gloo on CPU, nccl on GPU), data parallel.

Gradient accumulation: a batch holds a varying number of samples, so the number of
micro-batches varies per step. DeepSpeed's `managed_gradient_accumulation: false` lets the
caller own the boundary (backward only accumulates; `step()` reduces and updates), and
`gradient_accumulation_steps: 1` means DeepSpeed never divides the loss itself. We scale
each micro-batch so the summed gradient is that of the token-level mean over the batch.
"""

from __future__ import annotations

import os
from collections import defaultdict
import socket
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

import torch

from rft_cluster.config import LearnerSpec
from rft_cluster.grpo import MAX_STATS, policy_loss, token_logprobs
from rft_cluster.types import TrainSample
from rft_cluster.weight_transfer import NamedWeights, Publish, PublishResult, WeightMeta

if TYPE_CHECKING:  # storage needs pyarrow, which a GPU check without it does not load (benchmarks/gpu_check.py)
    from rft_cluster.storage import RunStorage


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return s.getsockname()[1]


@dataclass(frozen=True)
class Rendezvous:
    """One rank's place in a multi-process DeepSpeed world (torchrun's variables)."""

    rank: int
    world_size: int
    local_rank: int
    master_addr: str
    master_port: int


def _init_distributed(use_cuda: bool, rendezvous: Rendezvous | None) -> None:
    """Joins the world `rendezvous` describes; without one, a one-process world (unless a
    launcher already set the rank variables)."""
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at deepspeed's import
    import deepspeed
    import torch.distributed as dist

    if not use_cuda:
        # On CPU DeepSpeed JIT-compiles a shared-memory allreduce (~45 s on 2 cores, once per
        # machine); without it, collectives fall back to gloo's, which is all a CPU learner
        # needs. Edits to this op table persist by design (see deepspeed/ops/__init__.py);
        # marking the op unavailable skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if dist.is_initialized():  # several one-process learners in one process (tests)
        return
    own_port = False
    if rendezvous is not None:
        r = rendezvous
        os.environ.update(MASTER_ADDR=r.master_addr, MASTER_PORT=str(r.master_port), RANK=str(r.rank),
                          LOCAL_RANK=str(r.local_rank), WORLD_SIZE=str(r.world_size))
    else:
        for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
            os.environ.setdefault(key, value)
        # A port we pick is ours alone: left in the environment it would be inherited by
        # processes started later (e.g. a Ray cluster after `sft` ran in the driver) and collide.
        own_port = "MASTER_PORT" not in os.environ
        if own_port:
            os.environ["MASTER_PORT"] = str(free_port())
    try:
        deepspeed.init_distributed(dist_backend="nccl" if use_cuda else "gloo")
    finally:
        if own_port:
            del os.environ["MASTER_PORT"]



# (micro-batch samples, their padded input ids and attention mask [B, T], next-token logprobs
# [B, T-1], loss mask [B, T-1]) -> (mean loss, stats)
ChunkLoss = Callable[
    [list[TrainSample], torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor], tuple[torch.Tensor, dict[str, float]]
]


def _nll_loss(
    chunk: list[TrainSample], ids: torch.Tensor, attn: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    return -torch.where(mask, logprobs, 0.0).sum() / mask.sum(), {}


class Learner:
    """GRPO learner over one DeepSpeed engine (ZeRO stage 0-3), alone or one rank of a
    data-parallel world (`rendezvous`; see `LearnerGroup`).

    In a world of several ranks every rank must make the same calls: steps, logprobs, weight
    gathers and checkpoints are collectives (ZeRO-3 gathers parameters in every forward)."""

    def __init__(
        self,
        model: str,
        spec: LearnerSpec,
        learning_rate: float,
        clip_epsilon: float,
        seed: int,
        warmup_steps: int = 0,
        kl_coef: float = 0.0,
        old_logprobs: Literal["learner", "engine"] = "learner",
        tis_cap: float | None = 2.0,
        rendezvous: Rendezvous | None = None,
    ):
        """`old_logprobs` and `tis_cap`: the job's `hyperparameters` of those names (defaults alike)."""
        import torch.distributed as dist
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        if old_logprobs == "engine" and tis_cap is not None:
            raise ValueError("tis_cap needs old_logprobs 'learner': it weights the learner's old logprobs against the engine's")
        set_seed(seed)
        self.spec = spec
        self.clip_epsilon = clip_epsilon
        self.kl_coef = kl_coef
        self.old_logprobs = old_logprobs
        self.tis_cap = tis_cap
        use_cuda = torch.cuda.is_available()
        if spec.cpu_threads and not use_cuda:
            torch.set_num_threads(spec.cpu_threads)
        _init_distributed(use_cuda, rendezvous)
        import deepspeed

        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()

        bf16 = use_cuda and spec.dtype == "bfloat16"  # CPU trains in fp32 whatever the spec says
        self.tokenizer = AutoTokenizer.from_pretrained(model)
        module = AutoModelForCausalLM.from_pretrained(model, dtype=torch.bfloat16 if bf16 else torch.float32)
        module.config.use_cache = False  # no KV cache while training
        if spec.gradient_checkpointing:
            module.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        # Padded positions are masked out of attention and loss: any valid id does.
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else self.tokenizer.eos_token_id
        config = {
            "train_micro_batch_size_per_gpu": spec.micro_batch_size,
            "gradient_accumulation_steps": 1,
            "managed_gradient_accumulation": False,
            "gradient_clipping": 1.0,
            "zero_optimization": {"stage": spec.zero_stage},
            "bf16": {"enabled": bf16},
            "steps_per_print": 2**31 - 1,  # DeepSpeed's progress lines; we report our own
        }
        optimizer = torch.optim.AdamW(module.parameters(), lr=learning_rate, weight_decay=0.0)
        # Adam's first steps move every weight by about the full rate, whatever the gradient's
        # size: a linear ramp over `warmup_steps` keeps one noisy early batch from wrecking a
        # small policy. DeepSpeed steps the schedule with the optimizer and checkpoints it.
        warmup = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: min(1.0, (step + 1) / (warmup_steps + 1)))
        self.engine, *_ = deepspeed.initialize(model=module, optimizer=optimizer, lr_scheduler=warmup, config=config)
        self.model = self.engine.module
        # The KL anchor: the starting weights, frozen (a resumed run reloads the same ones).
        self.reference = None
        if kl_coef > 0:
            self.reference = AutoModelForCausalLM.from_pretrained(model, dtype=module.dtype).to(self.engine.device).eval()
            self.reference.requires_grad_(False)

    # ---------------------------------------------------------------- batching

    def _collate(self, seqs: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-pads to the longest sequence: (input_ids, attention_mask) on the engine's device."""
        width = max(len(s) for s in seqs)
        ids = torch.full((len(seqs), width), self.pad_id, dtype=torch.long)
        attn = torch.zeros((len(seqs), width), dtype=torch.long)
        for i, s in enumerate(seqs):
            ids[i, : len(s)] = torch.tensor(s)
            attn[i, : len(s)] = 1
        return ids.to(self.engine.device), attn.to(self.engine.device)

    def _next_token_logprobs(self, ids: torch.Tensor, attn: torch.Tensor) -> torch.Tensor:
        return token_logprobs(self.engine(input_ids=ids, attention_mask=attn).logits, ids)

    @staticmethod
    def _shifted(rows: Sequence[Sequence[float]], width: int, dtype: torch.dtype) -> torch.Tensor:
        """Per-token rows aligned with next-token logprobs: entry t holds row[t + 1] (0 as padding)."""
        out = torch.zeros((len(rows), width - 1), dtype=dtype)
        for i, r in enumerate(rows):
            out[i, : len(r) - 1] = torch.tensor(r[1:], dtype=dtype)
        return out

    # ---------------------------------------------------------------- training

    def train_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One GRPO optimizer step over the whole batch; its loss is the token-level mean over
        all masked tokens, however the batch is split into micro-batches."""
        return self._optimize(samples, self._policy_loss)

    def sft_step(self, samples: list[TrainSample]) -> dict[str, float]:
        """One supervised step (warm start): mean negative log-likelihood of the masked tokens."""
        return self._optimize(samples, _nll_loss)

    def _policy_loss(
        self, chunk: list[TrainSample], ids: torch.Tensor, attn: torch.Tensor, logprobs: torch.Tensor, mask: torch.Tensor
    ) -> tuple[torch.Tensor, dict[str, float]]:
        width = logprobs.shape[1] + 1
        engine = self._shifted([s.rollout_logprobs for s in chunk], width, torch.float32).to(logprobs.device)
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=logprobs.device)[:, None]
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs(self.reference(input_ids=ids, attention_mask=attn).logits, ids)
        if self.old_logprobs == "engine":
            return policy_loss(logprobs, engine, adv, mask, self.clip_epsilon, ref, self.kl_coef)
        # The old policy's logprobs on the learner: a step is one optimizer update over the whole
        # batch, so the weights before the update are the ones this forward ran on, and its
        # logprobs, detached, are exactly what a separate no-grad pass would recompute (a second
        # pass would cost a forward per micro-batch for the same numbers). In async mode tokens
        # may have been sampled by older weights: the ratio's old policy is the learner's
        # current one, and the TIS weight (old over the engine's logprob) corrects for staleness
        # as well as for kernel mismatch.
        return policy_loss(logprobs, logprobs.detach(), adv, mask, self.clip_epsilon, ref, self.kl_coef, engine, self.tis_cap)

    def _optimize(self, samples: list[TrainSample], chunk_loss: ChunkLoss) -> dict[str, float]:
        """Across ranks, `samples` is this rank's share of the batch: the loss and every stat
        are those of the whole batch, and every rank returns them."""
        t0 = time.perf_counter()
        # Token 0 has no prefix, so only loss_mask[1:] can be trained.
        usable = sorted((s for s in samples if any(s.loss_mask[1:])), key=lambda s: len(s.token_ids))  # less padding
        mbs = self.spec.micro_batch_size
        chunks = [usable[i : i + mbs] for i in range(0, len(usable), mbs)]
        total_tokens, n_samples, n_chunks = self._batch_totals(sum(sum(s.loss_mask[1:]) for s in usable), len(usable), len(chunks))
        metrics: dict[str, float] = defaultdict(float, loss=0.0, grad_norm=0.0)
        if not total_tokens:
            return dict(metrics) | {"tokens": 0.0, "samples": 0.0, "lr": self._lr(), "seconds": time.perf_counter() - t0}

        self.engine.train()
        # ZeRO-2/3 reduce gradients in every backward (and ZeRO-3 gathers weights in every
        # forward): a rank with fewer micro-batches than the busiest one runs empty ones.
        for chunk in chunks + [[]] * (n_chunks - len(chunks)):
            if not chunk:
                ids, attn = self._collate([[self.pad_id] * 2])
                self.engine.backward(self._next_token_logprobs(ids, attn).sum() * 0.0, scale_wrt_gas=False)
                continue
            ids, attn = self._collate([s.token_ids for s in chunk])
            mask = self._shifted([s.loss_mask for s in chunk], ids.shape[1], torch.bool).to(ids.device)
            loss, stats = chunk_loss(chunk, ids, attn, self._next_token_logprobs(ids, attn), mask)
            # The loss is a mean over this chunk's tokens; weighting by its share of the
            # batch's tokens (all ranks') makes the accumulated gradient that of the batch-wide
            # token mean. DeepSpeed averages gradients over ranks: `world_size` undoes that.
            share = mask.sum().item() / total_tokens
            self.engine.backward(loss * (share * self.world_size), scale_wrt_gas=False)
            metrics["loss"] += loss.item() * share
            for key, value in stats.items():
                metrics[key] = max(metrics[key], value) if key in MAX_STATS else metrics[key] + value * share
        lr = self._lr()  # the rate this step uses: stepping moves the schedule on
        metrics = self._combine_over_ranks(metrics)
        metrics["grad_norm"] = self._step()
        return metrics | {
            "tokens": float(total_tokens),
            "samples": float(n_samples),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }

    def _batch_totals(self, tokens: int, samples: int, chunks: int) -> tuple[int, int, int]:
        """(tokens, samples) summed over ranks, and the most micro-batches any rank has."""
        if self.world_size == 1:
            return tokens, samples, chunks
        import torch.distributed as dist

        mine = torch.tensor([tokens, samples, chunks], dtype=torch.long, device=self.engine.device)
        every = [torch.empty_like(mine) for _ in range(self.world_size)]
        dist.all_gather(every, mine)
        every = torch.stack(every).cpu()
        return int(every[:, 0].sum()), int(every[:, 1].sum()), int(every[:, 2].max())

    def _combine_over_ranks(self, metrics: dict[str, float]) -> dict[str, float]:
        """Every rank's batch-weighted stats summed, and its `MAX_STATS` maxed (a rank without
        samples has no keys)."""
        if self.world_size == 1:
            return dict(metrics)
        import torch.distributed as dist

        every: list[dict[str, float]] = [{} for _ in range(self.world_size)]
        dist.all_gather_object(every, dict(metrics))
        keys = {k for m in every for k in m}
        return {key: (max if key in MAX_STATS else sum)(m[key] for m in every if key in m) for key in keys}

    def _step(self) -> float:
        """Clips, steps, and returns the gradient norm before clipping.

        DeepSpeed's optimizer wrappers record that norm; fp32 at stage 0 steps the bare torch
        optimizer, which does not, so it is taken here from the still-unreduced gradients
        (equal to the reduced ones only in a one-process world: config refuses stage 0 with
        several ranks)."""
        if self.engine.zero_optimization_stage() == 0 and not self.engine.bfloat16_enabled():
            grads = [p.grad for p in self.model.parameters() if p.grad is not None]
            # fp64 accumulation: torch's fp32 norm on CPU is off by ~1e-5 relative at this size
            norms = [torch.linalg.vector_norm(g, dtype=torch.float64) for g in grads]
            norm = torch.linalg.vector_norm(torch.stack(norms)).item()
            self.engine.step()
            return norm
        self.engine.step()
        return float(self.engine.get_global_grad_norm())

    def _lr(self) -> float:
        return float(self.engine.get_lr()[0])

    @torch.no_grad()
    def compute_logprobs(self, token_ids: list[list[int]]) -> list[list[float]]:
        """The trainer's logprob of each token given its prefix (len(ids) - 1 per sequence)."""
        self.engine.eval()
        out: list[list[float]] = []
        mbs = self.spec.micro_batch_size
        for start in range(0, len(token_ids), mbs):
            chunk = token_ids[start : start + mbs]
            lp = self._next_token_logprobs(*self._collate(chunk)).cpu()
            out += [lp[i, : len(s) - 1].tolist() for i, s in enumerate(chunk)]
        return out

    # ---------------------------------------------------------------- weights out

    def gathered_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named weights on the engine's device, one at a time, each valid until the next
        is requested (ZeRO-3 partitions gathered: then every rank must run through it).

        `named_parameters()` lists a tied weight once (as embed_tokens), which is what
        inference engines expect: vLLM rejects lm_head.weight without embed_tokens when tied.
        """
        import deepspeed

        for name, param in self.model.named_parameters():
            with deepspeed.zero.GatheredParameters([param]):  # a no-op below stage 3
                yield name, param.detach()

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """`gathered_weights` as CPU copies, which outlive the gather."""
        for name, t in self.gathered_weights():
            yield name, t.to("cpu", copy=True)

    def weight_source(self, dtype: str | None = None) -> NamedWeights:
        """The weights to publish (vLLM's `WeightSource`): `gathered_weights`, in `dtype` on the
        wire when given (the engines'), with their full shapes known without gathering."""
        wire = getattr(torch, dtype) if dtype else None
        meta = [WeightMeta(n, wire or p.dtype, tuple(getattr(p, "ds_shape", p.shape))) for n, p in self.model.named_parameters()]

        def produce() -> Iterator[tuple[str, torch.Tensor]]:
            for name, t in self.gathered_weights():
                yield name, t if wire is None else t.to(wire)

        return NamedWeights(meta, produce)

    def publish(self, job: Publish) -> PublishResult | None:
        """Runs `job` on this rank (every rank must: ZeRO-3 gathers are collectives); rank 0 sends
        and returns what the publish did, the others return None (`weight_transfer.publish_from`)."""
        return job(self.weight_source(job.dtype), self.rank)

    def _join_gathers(self) -> None:
        """What a rank other than 0 does while rank 0 reads the weights: at ZeRO-3 each
        parameter's gather is a collective that needs every rank; below it, nothing."""
        if self.engine.zero_optimization_stage() == 3:
            for _ in self.gathered_weights():
                pass

    def save_hf(self, storage: RunStorage, rel: str) -> str:
        """Writes a plain HF model directory (config, safetensors, tokenizer with its chat
        template, generation config) that transformers and vLLM load directly, to `rel` in the
        run's storage; returns its location. Every rank must call it (gathering ZeRO-3 shards
        is collective); rank 0 alone writes."""
        if self.rank != 0:
            self._join_gathers()
            return storage.uri_for(rel)
        weights = dict(self.named_weights())
        with storage.staged_dir(rel) as out:
            self.model.save_pretrained(out, state_dict=weights, safe_serialization=True)
            self.tokenizer.save_pretrained(out)
        return storage.uri_for(rel)

    # ---------------------------------------------------------------- resume

    def save_state(self, storage: RunStorage, rel: str, tag: str) -> None:
        """DeepSpeed checkpoint (weights, optimizer, step counters) for resuming a run, at
        `rel/tag` (and `rel/latest`). Every rank must call it: each writes its own shard files
        (rank 0 also `latest`) and uploads only those, beside the other ranks'."""
        with storage.staged_dir(rel, replace=False) as local:
            self.engine.save_checkpoint(str(local), tag=tag)

    def load_state(self, storage: RunStorage, rel: str, tag: str) -> None:
        """Restores what `save_state(storage, rel, tag)` wrote; every rank fetches the tag's
        files to its own disk (unless the storage is local) and loads its part."""
        with storage.fetched_dir(f"{rel}/{tag}") as local:
            loaded, _ = self.engine.load_checkpoint(str(local.parent), tag=tag)
        if loaded is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint at {storage.uri_for(f'{rel}/{tag}')}")
