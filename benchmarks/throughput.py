"""Throughput of the RL loop and its parts, each comparison side by side in one invocation.

    .venv/bin/python benchmarks/throughput.py [--seeds 1 2 3] [--steps 8] [--parts ...]

Writes `benchmarks/results/throughput.json` (and `throughput-*.png`); a run of some `--parts`
updates only their entries. Run it alone: on 2 cores anything beside it skews the ratios.

- `rl`: the FinQA demo's RL phase, sync (`max_staleness` 0) vs async (1, 2): rollouts/s,
  generated tokens/s, tool calls/s, engine busy fraction, the cores' utilisation;
- `time_to_reward`: wall time of the RL phase until validation reaches the sync run's final
  reward (± 0.05), sync vs async 1, per seed, as shipped and with 300 ms tools;
- `generation`, `tool_proxy`, `weight_sync`, `trl`: `bench_<part>.py` beside this file.

The demo's environment, tiny model and warm start are built once under `--output` (reused).
"""

from __future__ import annotations

import argparse
import json
import sys
import threading
import time
from pathlib import Path
from statistics import fmean
from typing import Any, Callable

from common import RESULTS, write_result  # benchmarks/common.py, beside this script

REPO = RESULTS.parent.parent
JOB = REPO / "cluster_configs" / "local.yaml"
TOLERANCE = 0.05  # "the same validation reward"
PARTS = ("rl", "time_to_reward", "generation", "tool_proxy", "weight_sync", "trl")


class CpuSampler:
    """The machine's CPU utilisation (all cores, 0..1) sampled every `period` s, with wall times."""

    def __init__(self, period: float = 0.5):
        import psutil

        self._psutil, self.period = psutil, period
        self.samples: list[tuple[float, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        self._psutil.cpu_percent(None)
        while not self._stop.wait(self.period):
            self.samples.append((time.time(), self._psutil.cpu_percent(None) / 100))

    def __enter__(self) -> "CpuSampler":
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def mean(self, start: float, end: float) -> float | None:
        inside = [u for t, u in self.samples if start <= t <= end]
        return round(fmean(inside), 3) if inside else None


def demo_environment(output: Path, tool_delay_s: float):
    """(dirs, servers context) of the demo under `output`, built once."""
    from rich.console import Console

    from rft_cluster.demo import DemoDirs, DemoSize, Stages, prepare_environment
    from rft_cluster.envs.finqa import FinQAServers

    dirs = DemoDirs(output.resolve())
    prepare_environment(dirs, DemoSize(), Stages(Console()))
    return dirs, FinQAServers(dirs.corpus, tool_delay_s=tool_delay_s)


def rl_run(output: Path, *, seed: int, steps: int, max_staleness: int, eval_interval: int, tool_delay_s: float) -> dict[str, Any]:
    """One RL run of the demo job; returns its RL-phase rates and its validation curve
    (seconds of RL phase at each evaluation -> reward). Evaluation time is not counted."""
    from rft_cluster.demo import DemoSize, Stages, load_demo_job, warm_start
    from rft_cluster.driver import Trainer, init_ray
    from rft_cluster.metrics import StepPrinter
    from rft_cluster.storage import RunStorage
    from rft_cluster.trajectory_store import TrajectoryStore
    from rich.console import Console

    dirs, servers = demo_environment(output, tool_delay_s)
    run_dir = output / f"run-k{max_staleness}-d{int(tool_delay_s * 1000)}-s{seed}"
    if run_dir.exists():
        import shutil

        shutil.rmtree(run_dir)
    printed: dict[int, float] = {}

    class Clock(StepPrinter):  # when each step's record was printed (wall time)
        def print_step(self, step: int, metrics: dict[str, float]) -> None:
            printed[step] = time.time()
            super().print_step(step, metrics)

    with servers as env, CpuSampler() as cpu:
        job = load_demo_job(JOB, dirs, env, seed)
        warm_start(dirs, DemoSize(), env, Stages(Console()))
        hp = job.rl.hyperparameters
        hp.max_staleness, hp.max_steps, hp.eval_interval = max_staleness, steps, eval_interval
        trainer = Trainer(job, RunStorage(run_dir), printer=Clock())
        init_ray(job)
        try:
            trainer.run()
        finally:
            trainer.shutdown()
    records = {r["step"]: r for r in map(json.loads, (run_dir / "metrics.jsonl").read_text().splitlines())}
    train = [r for r in TrajectoryStore(run_dir).read("train").to_pylist()]
    iterations = [records[s]["timing.step.full_iteration"] for s in range(1, steps + 1)]
    wall = sum(iterations)
    start = printed[1] - iterations[0]
    elapsed, curve = 0.0, []
    for s in range(0, steps + 1):
        elapsed += records[s].get("timing.step.full_iteration", 0.0)
        if "valid_reward_mean" in records[s]:
            curve.append((round(elapsed, 1), round(records[s]["valid_reward_mean"], 4)))
    busy = engine_busy(records, steps)
    return {
        "max_staleness": max_staleness, "seed": seed, "steps": steps, "tool_delay_s": tool_delay_s,
        "rl_wall_s": round(wall, 1),
        "step_s": round(wall / steps, 2),
        "rollouts_per_s": round(len(train) / wall, 3),
        "generated_tokens_per_s": round(sum(r["generated_tokens"] for r in train) / wall, 1),
        "tool_calls_per_s": round(sum(len(r["tool_calls"]) for r in train) / wall, 3),
        "engine_busy": busy,
        "cpu_utilisation": cpu.mean(start, start + wall),
        "staleness_mean": round(fmean(records[s].get("pipeline/staleness_mean", 0.0) for s in range(1, steps + 1)), 3),
        "valid_curve": curve,
        "final_reward": curve[-1][1] if curve else None,
    }


def engine_busy(records: dict[int, dict[str, Any]], steps: int) -> float | None:
    """The engines' busy share over steps 2..N, weighted by each step's time (step 1 starts the
    pipeline from empty, and drivers before the fix logged 0 for it)."""
    busy = [(records[s]["pipeline/engine_busy"], records[s]["timing.step.full_iteration"])
            for s in range(2, steps + 1) if "pipeline/engine_busy" in records[s]]
    return round(sum(b * t for b, t in busy) / sum(t for _, t in busy), 3) if busy else None


def time_to(curve: list[tuple[float, float]], target: float) -> float | None:
    """RL seconds at the first evaluation within TOLERANCE of `target` (None: never)."""
    return next((t for t, r in curve if r >= target - TOLERANCE), None)


def rl_part(output: Path, steps: int, seed: int) -> dict[str, Any]:
    runs = {k: rl_run(output, seed=seed, steps=steps, max_staleness=k, eval_interval=steps, tool_delay_s=0.0) for k in (0, 1, 2)}
    return {"sync": runs[0], "async": {f"max_staleness_{k}": runs[k] for k in (1, 2)}}


def time_to_reward_part(output: Path, steps: int, seeds: list[int], eval_interval: int,
                        save: Callable[[list[dict[str, Any]]], None]) -> list[dict[str, Any]]:
    """Per seed, sync and async 1 as shipped and with 300 ms tools; `save`s the rows after each
    pair of runs, so a cut-short invocation keeps the seeds it finished."""
    rows = [{"tool_delay_s": delay, "seeds": [], "sync_s": [], "async_s": [], "sync_final_reward": [],
             "async_final_reward": [], "speedup": [], "curves": {}} for delay in (0.0, 0.3)]
    for seed in seeds:
        for row in rows:
            delay = row["tool_delay_s"]
            sync = rl_run(output, seed=seed, steps=steps, max_staleness=0, eval_interval=eval_interval, tool_delay_s=delay)
            fast = rl_run(output, seed=seed, steps=steps, max_staleness=1, eval_interval=eval_interval, tool_delay_s=delay)
            target = sync["final_reward"]
            s, a = time_to(sync["valid_curve"], target), time_to(fast["valid_curve"], target)
            row["seeds"].append(seed)
            row["sync_s"].append(s)
            row["async_s"].append(a)
            row["sync_final_reward"].append(target)
            row["async_final_reward"].append(fast["final_reward"])
            row["speedup"].append(round(s / a, 2) if s and a else None)
            row["curves"][str(seed)] = {"sync": sync["valid_curve"], "async": fast["valid_curve"],
                                        "sync_step_s": sync["step_s"], "async_step_s": fast["step_s"],
                                        "sync_rollouts_per_s": sync["rollouts_per_s"], "async_rollouts_per_s": fast["rollouts_per_s"]}
            save(rows)
    return rows


def plot(result: dict[str, Any], results: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if "sync" in result:
        runs = {"sync": result["sync"], **{k.replace("max_staleness_", "async "): v for k, v in result["async"].items()}}
        fig, axes = plt.subplots(1, 3, figsize=(12, 3.5))
        for ax, key, label in zip(axes, ("rollouts_per_s", "generated_tokens_per_s", "engine_busy"),
                                  ("rollouts / s", "generated tokens / s", "engine busy fraction")):
            ax.bar(list(runs), [r[key] or 0 for r in runs.values()])
            ax.set_title(label)
        fig.tight_layout()
        fig.savefig(results / "throughput-rl.png", dpi=110)
        plt.close(fig)
    if "time_to_reward" in result:
        rows = result["time_to_reward"]
        fig, axes = plt.subplots(1, len(rows), figsize=(6 * len(rows), 3.5), squeeze=False)
        for ax, row in zip(axes[0], rows):
            for seed, c in row["curves"].items():
                for mode, style in (("sync", "--"), ("async", "-")):
                    xs, ys = zip(*c[mode]) if c[mode] else ((), ())
                    ax.plot(xs, ys, style, marker="o", label=f"{mode} seed {seed}")
            ax.set_title(f"validation reward vs RL seconds, tools +{row['tool_delay_s'] * 1000:.0f} ms")
            ax.set_xlabel("s")
            ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(results / "throughput-time-to-reward.png", dpi=110)
        plt.close(fig)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[1, 2, 3])
    parser.add_argument("--steps", type=int, default=8, help="RL steps per run")
    parser.add_argument("--eval-interval", type=int, default=2, help="validation every N steps in time_to_reward runs")
    parser.add_argument("--trl-seeds", type=int, nargs="+", default=[1], help="TRL takes minutes per step on CPU")
    parser.add_argument("--trl-steps", type=int, default=3)
    parser.add_argument("--output", default="runs/throughput", help="the demo's environment and the runs")
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args()
    results = Path(args.results)
    out_file = results / "throughput.json"
    result: dict[str, Any] = json.loads(out_file.read_text()) if out_file.exists() else {}
    output = Path(args.output).resolve()
    timings = result.setdefault("part_seconds", {})
    for part in args.parts:
        t0 = time.perf_counter()
        print(f"[bench] {part} ...", flush=True)
        if part == "rl":
            result.update(rl_part(output, args.steps, args.seeds[0]))
        elif part == "time_to_reward":
            def save(rows: list[dict[str, Any]]) -> None:
                result["time_to_reward"] = rows
                write_result(results, "throughput.json", result)

            time_to_reward_part(output, args.steps, args.seeds, args.eval_interval, save)
        elif part == "generation":
            import bench_generation

            result["agentic_over_pure"] = bench_generation.run()["agentic_over_pure"]
        elif part == "tool_proxy":
            import bench_tool_proxy

            result["tool_proxy"] = bench_tool_proxy.run()["tool_proxy"]
        elif part == "weight_sync":
            import bench_weight_sync

            result["weight_sync"] = bench_weight_sync.run()["weight_sync"]
        elif part == "trl":
            import bench_trl

            trl = bench_trl.run(seeds=args.trl_seeds, steps=args.trl_steps, output=output)
            result.update(trl=trl["trl"], rft=trl["rft"], trl_settings=trl["settings"])
        timings[part] = round(time.perf_counter() - t0, 1)
        write_result(results, "throughput.json", result)  # after each part: a crash keeps the others
    plot(result, results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
