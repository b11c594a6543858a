"""The learner: a DeepSpeed engine that takes GRPO steps and publishes its weights.

A plain class; the driver makes it an actor with `ray.remote(num_cpus=1, num_gpus=...)`.
Each actor is a one-process DeepSpeed world (gloo on CPU, nccl on GPU).

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
from typing import Any

import torch

from rft_cluster.config import LearnerSpec
from rft_cluster.grpo import policy_loss, token_logprobs
from rft_cluster.storage import RunStorage
from rft_cluster.types import TrainSample
from rft_cluster.weight_sync import pack_buckets


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _init_distributed(use_cuda: bool) -> None:
    """A one-process world, unless a launcher already set the rank variables."""
    if not use_cuda:
        os.environ.setdefault("DS_ACCELERATOR", "cpu")  # read once, at deepspeed's import
    import deepspeed
    import torch.distributed as dist

    if dist.is_initialized():  # several learners in one process (tests)
        return
    for key, value in (("MASTER_ADDR", "127.0.0.1"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        os.environ.setdefault(key, value)
    # A port we pick is ours alone: left in the environment it would be inherited by processes
    # started later (e.g. a Ray cluster after `sft` ran in the driver) and collide there.
    own_port = "MASTER_PORT" not in os.environ
    if own_port:
        os.environ["MASTER_PORT"] = str(_free_port())
    if not use_cuda and os.environ["WORLD_SIZE"] == "1":
        # On CPU DeepSpeed JIT-compiles a shared-memory allreduce (~45 s on 2 cores, once per
        # machine) that a one-process world never uses. Edits to this op table persist by
        # design (see deepspeed/ops/__init__.py); marking the op unavailable skips the build.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
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
    """GRPO learner over one DeepSpeed engine (ZeRO stage 0-3)."""

    def __init__(
        self,
        model: str,
        spec: LearnerSpec,
        learning_rate: float,
        clip_epsilon: float,
        seed: int,
        warmup_steps: int = 0,
        kl_coef: float = 0.0,
    ):
        from transformers import AutoModelForCausalLM, AutoTokenizer, set_seed

        set_seed(seed)
        self.spec = spec
        self.clip_epsilon = clip_epsilon
        self.kl_coef = kl_coef
        use_cuda = torch.cuda.is_available()
        if spec.cpu_threads and not use_cuda:
            torch.set_num_threads(spec.cpu_threads)
        _init_distributed(use_cuda)
        import deepspeed

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
        old = self._shifted([s.rollout_logprobs for s in chunk], width, torch.float32).to(logprobs.device)
        adv = torch.tensor([s.advantage for s in chunk], dtype=torch.float32, device=logprobs.device)[:, None]
        ref = None
        if self.reference is not None:
            with torch.no_grad():
                ref = token_logprobs(self.reference(input_ids=ids, attention_mask=attn).logits, ids)
        return policy_loss(logprobs, old, adv, mask, self.clip_epsilon, ref, self.kl_coef)

    def _optimize(self, samples: list[TrainSample], chunk_loss: ChunkLoss) -> dict[str, float]:
        t0 = time.perf_counter()
        # Token 0 has no prefix, so only loss_mask[1:] can be trained.
        usable = sorted((s for s in samples if any(s.loss_mask[1:])), key=lambda s: len(s.token_ids))  # less padding
        total_tokens = sum(sum(s.loss_mask[1:]) for s in usable)
        metrics: dict[str, float] = defaultdict(float, loss=0.0, grad_norm=0.0)
        if not usable:
            return dict(metrics) | {"tokens": 0.0, "samples": 0.0, "lr": self._lr(), "seconds": time.perf_counter() - t0}

        self.engine.train()
        mbs = self.spec.micro_batch_size
        for start in range(0, len(usable), mbs):
            chunk = usable[start : start + mbs]
            ids, attn = self._collate([s.token_ids for s in chunk])
            mask = self._shifted([s.loss_mask for s in chunk], ids.shape[1], torch.bool).to(ids.device)
            loss, stats = chunk_loss(chunk, ids, attn, self._next_token_logprobs(ids, attn), mask)
            # The loss is a mean over this chunk's tokens; weighting by its share of the
            # batch's tokens makes the accumulated gradient that of the batch-wide token mean.
            share = mask.sum().item() / total_tokens
            self.engine.backward(loss * share, scale_wrt_gas=False)
            metrics["loss"] += loss.item() * share
            for key, value in stats.items():
                metrics[key] += value * share
        lr = self._lr()  # the rate this step uses: stepping moves the schedule on
        metrics["grad_norm"] = self._step()
        return dict(metrics) | {
            "tokens": float(total_tokens),
            "samples": float(len(usable)),
            "lr": lr,
            "seconds": time.perf_counter() - t0,
        }

    def _step(self) -> float:
        """Clips, steps, and returns the gradient norm before clipping.

        DeepSpeed's optimizer wrappers record that norm; fp32 at stage 0 steps the bare torch
        optimizer, which does not, so it is taken here from the still-unreduced gradients
        (equal to the reduced ones in this one-process world)."""
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

    def named_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        """Full HF-named weights as CPU copies, one at a time (ZeRO-3 partitions gathered).

        `named_parameters()` lists a tied weight once (as embed_tokens), which is what
        inference engines expect: vLLM rejects lm_head.weight without embed_tokens when tied.
        """
        import deepspeed

        for name, param in self.model.named_parameters():
            # A no-op below stage 3; the copy is taken before the gathered data is freed.
            with deepspeed.zero.GatheredParameters([param]):
                yield name, param.detach().to("cpu", copy=True)

    def publish(self, workers: list[Any], version: int) -> dict[str, float]:
        """Loads the current weights into every rollout worker, bucket by bucket.

        Each bucket is put into the object store once and the same ref goes to all workers.
        One bucket is in flight at a time (loads into an engine must not interleave with
        `begin`/`finish`), while the next one is packed. Returns the bytes published (one
        copy of the weights), seconds, GB/s (bytes / 1e9 / s) and the number of buckets.
        """
        import ray

        t0 = time.perf_counter()
        ray.get([w.begin_weight_sync.remote() for w in workers])
        nbytes, buckets, pending = 0, 0, []
        for bucket in pack_buckets(self.named_weights(), self.spec.weight_bucket_mb << 20):
            ref = ray.put(bucket)
            nbytes += bucket.nbytes
            buckets += 1
            ray.get(pending)
            pending = [w.load_weight_bucket.remote(ref) for w in workers]
        ray.get(pending)
        ray.get([w.finish_weight_sync.remote(version) for w in workers])
        seconds = time.perf_counter() - t0
        return {
            "weight_sync_bytes": float(nbytes),
            "weight_sync_s": seconds,
            "weight_sync_gbps": nbytes / 1e9 / seconds,
            "weight_sync_buckets": float(buckets),
        }

    def save_hf(self, storage: RunStorage, rel: str) -> str:
        """Writes a plain HF model directory (config, safetensors, tokenizer with its chat
        template, generation config) that transformers and vLLM load directly, to `rel` in the
        run's storage; returns its location. Every rank must call it (gathering ZeRO-3 shards
        is collective); rank 0 alone writes."""
        import torch.distributed as dist

        writer = dist.get_rank() == 0
        weights = {name: t for name, t in self.named_weights() if writer}
        if writer:
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
