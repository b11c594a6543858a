"""The FinQA demo over several RL seeds: the main job's targets, measured (issue 4).

    .venv/bin/python benchmarks/finqa_demo.py [--seeds 1 2 3] [--output runs/finqa-bench]

Runs `rft-cluster demo --seed S` once per seed, one after another, into one output directory:
the first run builds the environment, the tiny model and the warm start (its wall time is the
main job's, from nothing); later seeds reuse them, so the seeds differ only in the RL run (prompt
order, sampling). Then writes `benchmarks/results/finqa-demo.md` (mean ± sd over the seeds, plots,
per-seed tables) and `benchmarks/results/finqa-demo.json`.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

from rft_cluster.report import load_metrics, write_report

from common import RESULTS, metadata, write_result  # benchmarks/common.py, beside this script


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--output", default="runs/finqa-bench")
    parser.add_argument("--results", default=str(RESULTS), help="where the report and JSON go")
    args = parser.parse_args()
    out = Path(args.output).resolve()
    commit = metadata()["commit"]
    wall: dict[int, float] = {}
    for seed in args.seeds:
        print(f"[bench] seed {seed}: rft-cluster demo --seed {seed} --output {out}", flush=True)
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "rft_cluster.cli", "demo", "--seed", str(seed), "--output", str(out)], check=True)
        wall[seed] = round(time.perf_counter() - t0, 1)
        print(f"[bench] seed {seed}: {wall[seed]:.0f} s", flush=True)
    results = Path(args.results)
    runs = {f"seed {seed}": load_metrics(out / f"run-seed{seed}") for seed in args.seeds}
    first = args.seeds[0]
    preamble = (
        f"Commit `{commit}`. Each seed ran `rft-cluster demo --seed S` (the README's main job) on a "
        f"{metadata()['machine']['cpus']}-core machine; seed {first} built everything from nothing in {wall[first]:.0f} s (the main "
        f"job's wall time), later seeds reused its environment, tiny model and warm start and took "
        + ", ".join(f"{wall[s]:.0f} s" for s in args.seeds[1:])
        + ". Evaluation: the 64 validation questions, one rollout each, at step 0 (the warm-started "
        "baseline) and after the last step."
    )
    summary = write_report(runs, results / "finqa-demo", title="FinQA agent RFT demo: step 0 vs final over seeds", preamble=preamble)
    # One report: moved next to the JSON, its plot links pointing into finqa-demo/.
    report = results / "finqa-demo" / "report.md"
    (results / "finqa-demo.md").write_text(report.read_text().replace("](", "](finqa-demo/"))
    report.unlink()
    write_result(results, "finqa-demo.json", {
        "wall_time_s": wall[first],
        "wall_time_s_per_seed": {str(s): wall[s] for s in args.seeds},
        "seeds": [{**entry, "seed": seed} for seed, entry in zip(args.seeds, summary["seeds"])],
        "mean": summary["mean"],
    })
    print(f"[bench] report: {results / 'finqa-demo.md'}; figures: {results / 'finqa-demo.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
