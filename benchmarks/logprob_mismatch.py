"""How far a bf16 engine's logprobs are from an fp32 learner's, what `old_logprobs` does with
that gap, and a step's time under each setting.

    PYTHONPATH=. .venv/bin/python benchmarks/logprob_mismatch.py [--model DIR] [--prompts 8 --group 4] [--repeats 3]

One bf16 vLLM engine (a `RolloutWorker`, run in this process) samples `prompts x group` ledger
rollouts with the ledger's tools and job settings; it is shut down, and two fp32 learners
(ZeRO 2, micro-batches of 8) start from the same weights, one per `old_logprobs` setting
("learner" with `tis_cap` 2, "engine" without). Their first step on those rollouts gives the
mismatch (mean and max |learner - engine logprob| over the trained tokens, share of TIS weights
truncated) and the ratio at that step's only minibatch (mean - 1 and max |ratio - 1|) under
each setting. Then each takes `repeats` more steps on the batch, alternating, and the medians
give a step's time under each.

Without --model the ledger's tiny model is built here (~1 min on 2 cores), pre-trained on the
ledger's material but not warm-started: the warm model samples its demonstrations' tokens at
logprobs of about -1e-4, where bf16's error is as small. Writes results/logprob-mismatch.json.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import tempfile
from pathlib import Path
from typing import Any

import ray

from rft_cluster.config import EngineSpec, LearnerSpec, ToolSettings
from rft_cluster.dataset import load_rows
from rft_cluster.learner import Learner
from rft_cluster.rollout_worker import RolloutWorker
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.types import RolloutRequest, TrainSample

from bench_generation import LEDGER_SEED, SETTINGS, ledger_tools, requests  # beside this script
from common import RESULTS, write_result  # benchmarks/common.py, beside this script

MODES = ("learner", "engine")


async def sample(worker: RolloutWorker, reqs: list[RolloutRequest]) -> list[TrainSample]:
    """The rollouts as the learner gets them, advantages alternating +1/-1 (any non-zero will do:
    neither the mismatch nor the first ratio depends on them)."""
    await worker.start()
    try:
        trajs = await asyncio.gather(*(worker.rollout(r, SETTINGS) for r in reqs))
    finally:
        await worker.shutdown()
    return [TrainSample(t.token_ids, t.loss_mask, t.logprobs, 1.0 - 2 * (i % 2)) for i, t in enumerate(trajs)]


def measure(model: str, batch: list[TrainSample], repeats: int) -> dict[str, Any]:
    learners = {mode: Learner(model, LearnerSpec(micro_batch_size=8, zero_stage=2), 1e-5, 0.2, seed=0, old_logprobs=mode,
                              tis_cap=2.0 if mode == "learner" else None) for mode in MODES}
    first = {mode: learner.train_step(batch) for mode, learner in learners.items()}
    steps: dict[str, list[float]] = {mode: [] for mode in MODES}
    for r in range(repeats):
        for mode, learner in learners.items():
            m = learner.train_step(batch)
            steps[mode].append(m["seconds"])
            print(f"[bench] repeat {r + 1}/{repeats}, old_logprobs {mode}: {m['seconds']:.2f} s", flush=True)
    step_s = {mode: statistics.median(s) for mode, s in steps.items()}
    mismatch = first["learner"]
    return {
        "trained_tokens": int(mismatch["tokens"]),
        "mismatch": {key: mismatch[key] for key in ("mismatch_mean", "mismatch_max", "tis_truncated")},
        "first_step": {mode: {"ratio_mean_minus_1": m["ratio_mean"] - 1.0, "ratio_dev_max": m["ratio_dev_max"],
                              "clip_fraction": m["clip_fraction"]} for mode, m in first.items()},
        "step_s_median": step_s,
        "steps_s": steps,
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="an HF model directory (default: the ledger's tiny model, built now)")
    parser.add_argument("--prompts", type=int, default=8, help="ledger training rows (at most 46)")
    parser.add_argument("--group", type=int, default=4, help="rollouts per prompt")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    from rft_cluster.envs.ledger import write_datasets, write_demonstrations

    with tempfile.TemporaryDirectory(prefix="bench-mismatch-") as tmp:
        data = Path(tmp) / "data"
        write_datasets(data, seed=LEDGER_SEED)
        model = args.model
        if model is None:  # as tests/conftest.py's tiny_model_dir
            from rft_cluster.tiny_model import make_tiny_model

            write_demonstrations(data / "sft.jsonl", seed=LEDGER_SEED, n=64)
            model = str(make_tiny_model(Path(tmp) / "tiny-model", corpus=[data / "train.jsonl", data / "valid.jsonl", data / "sft.jsonl"]))
        rows = load_rows(data / "train.jsonl")
        os.environ.setdefault("RAY_TMPDIR", tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
        ray.init(num_cpus=4, include_dashboard=False)
        try:
            with ledger_tools() as tools:
                proxy = ray.remote(num_cpus=0)(ToolProxy).remote(tools, ToolSettings())
                worker = RolloutWorker(model, EngineSpec(dtype="bfloat16", max_model_len=2048), 0, [proxy])
                batch = asyncio.run(sample(worker, requests(rows, args.prompts, args.group)))
        finally:
            ray.shutdown()
        result = {"engine_dtype": "bfloat16", "learner_dtype": "float32", "rollouts": len(batch), **measure(model, batch, args.repeats)}
    write_result(args.results, "logprob-mismatch.json", result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
