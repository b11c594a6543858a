"""The main job on the embedded default: the FinQA demo (docs/demo.md) from nothing to a report.

    environment (reports, datasets, demonstrations)  ->  tiny model  ->  warm start (SFT)
    ->  agent RFT against the FinQA tool server and grader (baseline evaluation at step 0,
        final evaluation at the last step)  ->  report (Markdown, PNG plots, summary JSON)

The job file decides the policy: when its `model` is the demo's own `warm-model` directory the
tiny model is built and warm-started here; any other model (a hub name on a GPU machine) is
trained as it is. Every stage keeps its output under `--output`; the environment, the tiny
model and the warm start are skipped when their output exists, so a rerun (or another RL seed)
goes straight to agent RFT, which always starts over.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table

from rft_cluster.config import JobSpec, load_job
from rft_cluster.envs.finqa import (
    FinQAServers,
    Report,
    Splits,
    generate_reports,
    split_questions,
    write_corpus,
    write_datasets,
    write_demonstrations,
)
from rft_cluster.envs.finqa.corpus import N_COMPANIES, YEARS
from rft_cluster.report import TABLE_METRICS
from rft_cluster.tiny_model import PRETRAIN_STEPS


@dataclass(frozen=True)
class DemoSize:
    """How big the environment and the warm start are. The defaults are the demo's; tests shrink them."""

    n_companies: int = N_COMPANIES
    years: tuple[int, ...] = YEARS
    n_train: int = 256
    n_valid: int = 64
    n_demonstrations: int = 320
    pretrain_steps: int = PRETRAIN_STEPS  # tiny-model pre-training
    sft_epochs: int = 2  # one left the warm start at ~4 calls and a 0.15-0.28 baseline; two: ~5.4 calls, 0.34
    sft_learning_rate: float = 2e-3

    def reports(self) -> list[Report]:
        return generate_reports(ENV_SEED, self.n_companies, self.years)

    def splits(self) -> Splits:
        return split_questions(self.reports(), ENV_SEED, self.n_train, self.n_valid)


ENV_SEED = 0  # the environment (reports, questions, demonstrations) is one fixed world


class DemoDirs:
    """Where each stage writes, under the demo's --output."""

    def __init__(self, out: Path):
        self.out = out
        self.corpus = out / "corpus"
        self.data = out / "data"
        self.tiny_model = out / "tiny-model"
        self.warm_model = out / "warm-model"

    def run(self, seed: int) -> Path:
        return self.out / f"run-seed{seed}"

    def report(self, seed: int) -> Path:
        return self.out / f"report-seed{seed}"


class Stages:
    """Prints each stage as it starts and how long it took."""

    def __init__(self, console: Console):
        self.console = console
        self.t0 = time.perf_counter()

    def start(self, text: str) -> None:
        self.console.print(f"[demo] {time.perf_counter() - self.t0:6.0f} s  {text}", markup=False)


def prepare_environment(dirs: DemoDirs, size: DemoSize, stages: Stages) -> None:
    """Writes the reports, the train/valid datasets and the demonstrations' questions (once)."""
    if (dirs.data / "valid.jsonl").exists():
        stages.start(f"environment: reusing {dirs.data}")
        return
    stages.start(f"environment: writing {size.n_companies * len(size.years) * 4} reports to {dirs.corpus}")
    write_corpus(dirs.corpus, size.reports())
    write_datasets(dirs.data, size.splits())


def warm_start(dirs: DemoDirs, size: DemoSize, env: FinQAServers, stages: Stages) -> dict[str, float] | None:
    """Writes the demonstrations, builds the tiny model from the demo's own material (its
    datasets and demonstrations, as a user's `make-tiny-model --corpus` would) and fine-tunes it
    on the demonstrations (each once). Returns the SFT losses when SFT ran now."""
    from rft_cluster.sft import sft
    from rft_cluster.tiny_model import make_tiny_model

    demos = dirs.data / "sft.jsonl"
    if not demos.exists():
        pool = size.splits().demo
        if len(pool) < size.n_demonstrations:
            raise ValueError(f"{size.n_demonstrations} demonstrations asked for, but only {len(pool)} reports are left after the datasets")
        write_demonstrations(demos, env.tools, pool[: size.n_demonstrations], ENV_SEED)
    if not (dirs.tiny_model / "config.json").exists():
        stages.start(f"tiny model: building and pre-training it in {dirs.tiny_model}")
        corpus = [dirs.data / "train.jsonl", dirs.data / "valid.jsonl", demos]
        make_tiny_model(dirs.tiny_model, corpus=corpus, pretrain_steps=size.pretrain_steps)
    if (dirs.warm_model / "config.json").exists():
        stages.start(f"warm start: reusing {dirs.warm_model}")
        return None
    stages.start(f"warm start: SFT on {size.n_demonstrations} wasteful demonstrations ({demos})")
    return sft(str(dirs.tiny_model), demos, dirs.warm_model, epochs=size.sft_epochs, learning_rate=size.sft_learning_rate,
               console=stages.console)


def demo_variables(dirs: DemoDirs, env: FinQAServers) -> dict[str, str]:
    """The values of the demo job's `${RFT_DEMO_*}` references: its directory and its servers."""
    return {"RFT_DEMO_DIR": str(dirs.out), "RFT_DEMO_URL": env.base_url, "RFT_DEMO_TOKEN": env.token}


def load_demo_job(job_path: Path, dirs: DemoDirs, env: FinQAServers, seed: int | None) -> JobSpec:
    """The job with the demo's directory and servers filled in (passed to the loader, not
    through this process's environment)."""
    job = load_job(job_path, environ={**os.environ, **demo_variables(dirs, env)})
    if seed is not None:
        job.seed = seed
    return job


def run_demo(
    job_path: Path,
    output: Path,
    *,
    seed: int | None = None,
    max_steps: int | None = None,
    size: DemoSize = DemoSize(),
    console: Console | None = None,
    tool_delay_s: float = 0.0,
    verbose: bool = False,
) -> dict[str, Any]:
    """Runs every stage; returns the report's summary (see `rft_cluster.report.write_report`)
    with the SFT losses and the wall time added. `tool_delay_s` delays every tool call the
    server answers (the regime of real tools); the warm start's demonstrations are not delayed.
    `verbose`: the engines' and Ray's own lines on the console too (`driver.init_ray`)."""
    from rft_cluster.driver import train
    from rft_cluster.report import load_metrics, write_report

    console = console or Console()
    stages = Stages(console)
    dirs = DemoDirs(output.resolve())
    prepare_environment(dirs, size, stages)
    stages.start("starting the FinQA tool server and grader")
    with FinQAServers(dirs.corpus, tool_delay_s=tool_delay_s) as env:
        delay = f", every tool call delayed {tool_delay_s * 1000:.0f} ms" if tool_delay_s else ""
        stages.start(f"tool server and grader on {env.base_url}{delay}")
        job = load_demo_job(job_path, dirs, env, seed)
        sft_losses = warm_start(dirs, size, env, stages) if job.resolve_path(job.model) == dirs.warm_model else None
        run_dir = dirs.run(job.seed)
        if run_dir.exists():  # a rerun of a seed starts that RL run over, never appends to it
            stages.start(f"removing the earlier run of seed {job.seed}: {run_dir}")
            shutil.rmtree(run_dir)
        stages.start(f"agent RFT, seed {job.seed}: baseline evaluation, training, final evaluation -> {run_dir}")
        train(job, run_dir, max_steps=max_steps, verbose=verbose)
    report_dir = dirs.report(job.seed)
    summary = write_report(
        {f"seed {job.seed}": load_metrics(run_dir)},
        report_dir,
        title=f"FinQA agent RFT demo, seed {job.seed}",
        preamble=f"Job: `{job_path}`; run directory: `{run_dir}`.",
        extra={"wall_time_s": round(time.perf_counter() - stages.t0, 1), "sft": sft_losses, "tool_delay_s": tool_delay_s},
    )
    (report_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    stages.start(f"done: report in {report_dir / 'report.md'}")
    console.print(summary_table(summary, report_dir / "report.md", run_dir / "logs"))
    return summary


def summary_table(summary: dict[str, Any], report: Path, logs: Path) -> Table:
    """The few figures a person looks for at the end (baseline -> final) and where the rest is."""
    seed = summary["seeds"][0]
    table = Table(title=f"FinQA agent RFT demo, {seed['seed']}: baseline -> final", show_header=False)
    table.add_column("", style="bold")
    table.add_column("", overflow="fold")  # paths whole, whatever the width
    for key in ("valid_reward_mean", "tool_calls_per_rollout"):
        _, label, spec = TABLE_METRICS[key]
        before, after = (seed[at][key] for at in ("baseline", "final"))
        table.add_row(label, " -> ".join("-" if v is None else format(v, spec) for v in (before, after)))
    table.add_row("RL steps", str(seed["final_step"]))
    table.add_row("wall time", f"{summary['wall_time_s']:.0f} s")
    table.add_row("report", str(report))
    if logs.exists():  # the run keeps its actors' logs only on a local disk
        table.add_row("actor logs", str(logs))
    return table
