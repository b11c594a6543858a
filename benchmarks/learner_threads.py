"""A GRPO step's time by the learner's torch thread count (`cluster.learner.cpu_threads`).

    .venv/bin/python benchmarks/learner_threads.py [--model DIR] [--threads 1 2] [--repeats 3]

A learner actor of `resources.learner.cpus: 1` gets one thread from Ray (OMP_NUM_THREADS). In the demo's
synchronous loop the engine waits while the learner trains, so the learner may use both cores.
This times the demo's step side by side at each thread count, alternating them on one learner:
32 rollouts of 600-1400 tokens, micro-batches of 8, ZeRO 2, the KL reference on. It writes
benchmarks/results/learner-threads.json. Without --model it builds an untrained tiny model, whose
step costs the same as a trained one's.
"""

from __future__ import annotations

import argparse
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from rft_cluster.config import LearnerSpec
from rft_cluster.learner import Learner
from rft_cluster.types import TrainSample

from common import RESULTS, write_result  # benchmarks/common.py, beside this script


def demo_batch(learner: Learner, n: int = 32, seed: int = 0) -> list[TrainSample]:
    """n agent-shaped rollouts: a ~350-token prompt, then sampled turns (trained) between tool
    outputs (not trained); rollout logprobs are the learner's own."""
    rng = random.Random(seed)
    vocab = len(learner.tokenizer)
    ids, masks = [], []
    for _ in range(n):
        mask, length = [0] * 350, rng.randint(600, 1400)
        while len(mask) < length:
            mask += [1] * rng.randint(15, 40) + [0] * rng.randint(20, 120)
        masks.append(mask)
        ids.append([rng.randrange(10, vocab) for _ in mask])
    logprobs = learner.compute_logprobs(ids)
    return [TrainSample(t, m, [0.0] + lp, rng.choice([-1.0, 1.0])) for t, m, lp in zip(ids, masks, logprobs)]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an HF model directory (default: a tiny untrained one, built now)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        model = args.model
        if model is None:
            from rft_cluster.tiny_model import make_tiny_model

            model = str(make_tiny_model(Path(tmp) / "tiny", pretrain_steps=0))
        learner = Learner(model, LearnerSpec(micro_batch_size=8, zero_stage=2), 3e-4, 0.2, seed=0, kl_coef=0.1)
        batch = demo_batch(learner)
        learner.train_step(batch)  # first-step allocations, not counted
        seconds: dict[int, list[float]] = {n: [] for n in args.threads}
        for r in range(args.repeats):
            for n in args.threads:
                torch.set_num_threads(n)
                t0 = time.perf_counter()
                learner.train_step(batch)
                seconds[n].append(round(time.perf_counter() - t0, 2))
                print(f"[bench] repeat {r + 1}/{args.repeats}, {n} thread(s): {seconds[n][-1]:.1f} s", flush=True)
    median = {n: statistics.median(s) for n, s in seconds.items()}
    base = args.threads[0]
    result = {
        "batch": {"rollouts": len(batch), "tokens": sum(len(s.token_ids) for s in batch)},
        "seconds": {str(n): s for n, s in seconds.items()},
        "median_s": {str(n): m for n, m in median.items()},
        f"speedup_vs_{base}": {str(n): round(median[base] / m, 2) for n, m in median.items()},
    }
    write_result(args.results, "learner-threads.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
