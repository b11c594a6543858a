"""An SFT epoch's time with length-grouped batches (what `rft-cluster sft` does) against
random batches of the same demonstrations.

    .venv/bin/python benchmarks/sft_batching.py [--demo-dir runs/local]

A batch is padded to its longest demonstration, so random batches compute on padding. This
trains one epoch each way, side by side on one learner (grouped first, then random), on the
demo's 320 demonstrations and tiny model from a demo output directory (`rft-cluster demo`
writes them), and writes benchmarks/results/sft-batching.json.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch
from transformers import AutoTokenizer

from rft_cluster.chat import ChatCodec
from rft_cluster.config import LearnerSpec
from rft_cluster.learner import Learner
from rft_cluster.sft import epoch_batches, load_demonstrations, padding_fraction

from common import RESULTS, write_result  # benchmarks/common.py, beside this script

BATCH = 8  # the demo's SFT batch


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--demo-dir", default="runs/local", help="a demo output directory with tiny-model/ and data/sft.jsonl")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    demo = Path(args.demo_dir)
    model = str(demo / "tiny-model")
    samples = load_demonstrations(demo / "data" / "sft.jsonl", ChatCodec(AutoTokenizer.from_pretrained(model)))
    lengths = [len(s.token_ids) for s in samples]
    order = torch.randperm(len(samples), generator=torch.Generator().manual_seed(0)).tolist()
    orders = {
        "length_grouped": epoch_batches(lengths, BATCH, torch.Generator().manual_seed(0)),
        "random": [order[i : i + BATCH] for i in range(0, len(order), BATCH)],
    }
    learner = Learner(model, LearnerSpec(micro_batch_size=BATCH), 2e-3, clip_epsilon=0.2, seed=0)
    learner.sft_step([samples[i] for i in orders["random"][0]])  # first-step allocations, not counted
    result: dict[str, dict[str, float]] = {}
    for name, batches in orders.items():
        t0 = time.perf_counter()
        for n, batch in enumerate(batches, start=1):
            learner.sft_step([samples[i] for i in batch])
            if n % 10 == 0:
                print(f"[bench] {name}: batch {n}/{len(batches)} ({time.perf_counter() - t0:.0f} s)", flush=True)
        padding = padding_fraction(lengths, batches)
        result[name] = {"epoch_s": round(time.perf_counter() - t0, 1), "padded_tokens": round(sum(lengths) / (1 - padding)), "padding_fraction": round(padding, 3)}
        print(f"[bench] {name}: {result[name]}", flush=True)
    summary = {
        "demonstrations": len(samples),
        "tokens": sum(lengths),
        "batch_size": BATCH,
        **result,
        "speedup": round(result["random"]["epoch_s"] / result["length_grouped"]["epoch_s"], 2),
    }
    write_result(args.results, "sft-batching.json", summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
