"""A training report from one or more runs' metrics.jsonl: step 0 vs final table, plots, JSON.

Each run directory holds `metrics.jsonl` (written by `metrics.RunLogger`): step 0 has only the
baseline evaluation (`valid_*`), steps 1..N the training metrics (`train_*`, `timing.step.*`),
and evaluation steps also `valid_*`. Several runs (e.g. seeds of one recipe) are summarised
together as mean ± sample sd across runs, so a change can be weighed against run-to-run noise.

    load_metrics(run_dir)        records, one per step, sorted
    baseline_and_final(records)  valid_* at the first and last evaluation, by short key
    plot_runs(runs, out_dir)     reward.png, tool_calls.png, latency.png
    write_report(runs, out_dir, title=...)  the above + report.md; returns the JSON summary
"""

from __future__ import annotations

import json
from pathlib import Path
from statistics import fmean, stdev
from typing import Any

Record = dict[str, Any]

# Short key (the JSON summary's schema) -> (metrics.jsonl suffix after `train_`/`valid_`, label,
# format spec). Ordered as the report's rows.
TABLE_METRICS: dict[str, tuple[str, str, str]] = {
    "valid_reward_mean": ("reward_mean", "valid reward mean", ".3f"),
    "tool_calls_per_rollout": ("tool_calls_per_rollout", "tool calls / rollout", ".2f"),
    "repeated_tool_bigram_fraction": (
        "repeated_tool_bigram_fraction",
        "repeated tool bigram fraction",
        ".3f",
    ),
    "rollout_latency_s": ("rollout_latency_mean_s", "rollout latency (s)", ".2f"),
    "tokens_per_rollout": ("generated_tokens_mean", "generated tokens / rollout", ".1f"),
}

# The evaluation marker: a step "was evaluated" when it logged its validation rollout count, which
# is written even when no rollout could be scored (then the reward mean is absent, shown as such).
_EVAL_KEY = "valid_rollouts"
PLOT_FILES = ("reward.png", "tool_calls.png", "latency.png")
_MISSING = "—"


# --- loading -----------------------------------------------------------------------------------


def load_metrics(run_dir: str | Path) -> list[Record]:
    """The run's records sorted by step, one per step.

    A resumed run logs its steps again after the restored one, so the last line of a step is the
    one that belongs to the run's final history. A bad line is reported as `file:line` so a
    truncated or hand-edited file can be fixed rather than silently misread.
    """
    path = Path(run_dir) / "metrics.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no metrics file (is {run_dir} a run directory?)")
    by_step: dict[int, Record] = {}
    for lineno, line in enumerate(path.read_text().splitlines(), start=1):
        if not line.strip():
            continue
        record = _parse_line(line, path, lineno)
        by_step[record["step"]] = record
    return [by_step[step] for step in sorted(by_step)]


def _parse_line(line: str, path: Path, lineno: int) -> Record:
    """One metrics.jsonl line as a record; errors name the file and line."""
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from e
    if not isinstance(record, dict) or type(record.get("step")) is not int:
        raise ValueError(f"{path}:{lineno}: expected a JSON object with an integer 'step'")
    return record


# --- baseline vs final -------------------------------------------------------------------------


def eval_steps(records: list[Record]) -> list[int]:
    """Steps that hold an evaluation (a validation rollout count), in order."""
    return [r["step"] for r in records if r.get(_EVAL_KEY) is not None]


def valid_values(record: Record) -> dict[str, float | None]:
    """The record's valid_* table metrics by short key; None where not logged (e.g. no pairs)."""
    return {key: record.get(f"valid_{suffix}") for key, (suffix, _, _) in TABLE_METRICS.items()}


def baseline_and_final(
    records: list[Record], *, name: str = "run"
) -> tuple[dict[str, float | None], dict[str, float | None]]:
    """valid_* values (short keys) at the first and the last evaluation.

    The first evaluation is the untrained baseline (step 0), the last the final policy; with
    fewer than two there is nothing to compare, which is an error rather than a zero change.
    `name` identifies the run in that error.
    """
    steps = eval_steps(records)
    if len(steps) < 2:
        raise ValueError(
            f"{name}: {len(steps)} evaluation(s) with {_EVAL_KEY} (steps {steps}); "
            "a baseline and a final evaluation are needed"
        )
    by_step = {r["step"]: r for r in records}
    return valid_values(by_step[steps[0]]), valid_values(by_step[steps[-1]])


def mean_sd(values: list[float | None]) -> dict[str, float | int | None]:
    """Mean and sample sd of the non-null values, with their count.

    sd is 0.0 for a single value (no spread can be estimated; the report shows it as ± 0) and
    both are None when no run logged the metric.
    """
    xs = [v for v in values if v is not None]
    if not xs:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": fmean(xs), "sd": stdev(xs) if len(xs) > 1 else 0.0, "n": len(xs)}


def summarize(runs: dict[str, list[Record]]) -> dict[str, Any]:
    """The machine-readable summary: per run baseline/final, and mean ± sd across runs.

    `change` is computed per run (final - baseline, over runs that logged both) and then
    averaged, so its sd is that of the paired differences: run-to-run offsets cancel.
    `relative` is the mean change over the mean baseline of those same runs (None at 0).
    """
    if not runs:
        raise ValueError("no runs to summarize")
    seeds = []
    for label, records in runs.items():
        baseline, final = baseline_and_final(records, name=label)
        steps = eval_steps(records)
        seeds.append(
            {"seed": label, "baseline_step": steps[0], "final_step": steps[-1],
             "baseline": baseline, "final": final}
        )
    mean: dict[str, dict[str, Any]] = {"baseline": {}, "final": {}, "change": {}}
    for key in TABLE_METRICS:
        mean["baseline"][key] = mean_sd([s["baseline"][key] for s in seeds])
        mean["final"][key] = mean_sd([s["final"][key] for s in seeds])
        mean["change"][key] = _change(
            [(s["baseline"][key], s["final"][key]) for s in seeds]
        )
    return {"seeds": seeds, "mean": mean}


def _change(pairs: list[tuple[float | None, float | None]]) -> dict[str, Any]:
    """Mean ± sd of paired differences, plus the relative change of the means."""
    paired = [(b, f) for b, f in pairs if b is not None and f is not None]
    out: dict[str, Any] = mean_sd([f - b for b, f in paired])
    base = fmean([b for b, _ in paired]) if paired else None
    out["relative"] = out["mean"] / abs(base) if out["mean"] is not None and base else None
    return out


# --- plots -------------------------------------------------------------------------------------


def _series(records: list[Record], key: str) -> tuple[list[int], list[float]]:
    """(steps, values) of a metric, skipping steps where it is absent or null."""
    points = [(r["step"], r[key]) for r in records if r.get(key) is not None]
    return [s for s, _ in points], [v for _, v in points]


def plot_runs(runs: dict[str, list[Record]], out_dir: str | Path) -> list[Path]:
    """reward.png, tool_calls.png and latency.png in out_dir; returns their paths.

    Training values (every step) are lines and validation values (evaluation steps only, a
    different set of prompts) are markers in the same colour, one colour per run, so a run's
    train/valid gap and the spread between runs are both visible.
    """
    # Agg through its canvas directly: no pyplot global state, no display needed.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    charts = [
        ("reward.png", "reward_mean", "Reward (grader score mean)", "reward mean"),
        ("tool_calls.png", "tool_calls_per_rollout", "Tool calls per rollout", "calls / rollout"),
        ("latency.png", "rollout_latency_mean_s", "Rollout latency", "mean latency (s)"),
    ]
    paths = []
    for filename, suffix, title, ylabel in charts:
        fig = Figure(figsize=(8, 4.5), dpi=100, layout="constrained")
        FigureCanvasAgg(fig)
        ax = fig.add_subplot()
        for i, (label, records) in enumerate(runs.items()):
            colour = f"C{i % 10}"
            xs, ys = _series(records, f"train_{suffix}")
            if xs:
                # A lone point draws no line segment: give it a marker so it is not lost.
                ax.plot(xs, ys, color=colour, linewidth=1.8, marker="." if len(xs) == 1 else None,
                        label=f"{label} train")
            xs, ys = _series(records, f"valid_{suffix}")
            if xs:
                ax.plot(xs, ys, color=colour, linestyle="none", marker="o", markersize=7,
                        markeredgecolor="black", markeredgewidth=0.6, label=f"{label} valid")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize="small")
        path = out / filename
        fig.savefig(path)
        paths.append(path)
    return paths


# --- Markdown ----------------------------------------------------------------------------------


def _fmt(value: float | None, spec: str, sign: bool = False) -> str:
    if value is None:
        return _MISSING
    return format(value, ("+" if sign else "") + spec)


def _fmt_mean_sd(stat: dict[str, Any], spec: str, sign: bool = False) -> str:
    """`mean ± sd`; `± 0` when a single run gives no spread estimate."""
    if stat["mean"] is None:
        return _MISSING
    sd = "0" if stat["n"] < 2 else _fmt(stat["sd"], spec)
    return f"{_fmt(stat['mean'], spec, sign)} ± {sd}"


def _cell(text: str) -> str:
    """Escapes what would break a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")


def _table(header: list[str], rows: list[list[str]], align: str) -> list[str]:
    """A Markdown table; `align` has one character per column, 'l' or 'r'."""
    rule = ["---:" if a == "r" else ":---" for a in align]
    lines = [header, rule, *rows]
    return ["| " + " | ".join(_cell(c) for c in line) + " |" for line in lines]


def _summary_table(summary: dict[str, Any]) -> list[str]:
    """Step 0 vs final, mean ± sd across runs, one row per metric."""
    mean = summary["mean"]
    rows = []
    for key, (_, label, spec) in TABLE_METRICS.items():
        change = mean["change"][key]
        rel = change["relative"]
        rows.append([
            label,
            _fmt_mean_sd(mean["baseline"][key], spec),
            _fmt_mean_sd(mean["final"][key], spec),
            _fmt_mean_sd(change, spec, sign=True),
            _MISSING if rel is None else f"{rel * 100:+.1f}%",
        ])
    return _table(["metric", "step 0", "final", "change", "relative"], rows, "lrrrr")


def _per_run_table(summary: dict[str, Any]) -> list[str]:
    """One row per run: baseline → final of each metric."""
    header = ["run", "final step"] + [label for _, label, _ in TABLE_METRICS.values()]
    rows = []
    for seed in summary["seeds"]:
        cells = [seed["seed"], str(seed["final_step"])]
        for key, (_, _, spec) in TABLE_METRICS.items():
            before, after = _fmt(seed["baseline"][key], spec), _fmt(seed["final"][key], spec)
            cells.append(f"{before} → {after}")
        rows.append(cells)
    return _table(header, rows, "lr" + "r" * len(TABLE_METRICS))


# Per-step table columns: (header, metrics.jsonl key, format spec).
_STEP_COLUMNS = [
    ("train reward", "train_reward_mean", ".3f"),
    ("valid reward", "valid_reward_mean", ".3f"),
    ("train calls/rollout", "train_tool_calls_per_rollout", ".2f"),
    ("valid calls/rollout", "valid_tool_calls_per_rollout", ".2f"),
    ("train latency (s)", "train_rollout_latency_mean_s", ".2f"),
    ("valid latency (s)", "valid_rollout_latency_mean_s", ".2f"),
]


def _step_table(records: list[Record]) -> list[str]:
    """A run's history, one row per step; `—` where a step did not log the metric."""
    rows = [
        [str(r["step"])] + [_fmt(r.get(key), spec) for _, key, spec in _STEP_COLUMNS]
        for r in records
    ]
    return _table(["step"] + [h for h, _, _ in _STEP_COLUMNS], rows, "r" * (1 + len(_STEP_COLUMNS)))


def _warm_up_sentence(runs: dict[str, list[Record]]) -> str:
    """Says that step 0 ran on warmed engines, when every run logged its warm-up."""
    warm = [next((r.get("timing.warmup") for r in records if r["step"] == 0), None) for records in runs.values()]
    if not warm or None in warm:
        return ""
    return (f" Before step 0 each rollout worker ran one warm-up group that was not stored ({min(warm):.1f}–{max(warm):.1f} s), "
            "so step 0's latencies are measured on warm engines, as every later step's are.")


def render_markdown(
    runs: dict[str, list[Record]], summary: dict[str, Any], plots: list[Path], *, title: str,
    preamble: str = "",
) -> str:
    """report.md's text; plots are linked by file name (report.md sits beside them)."""
    n = len(runs)
    lines = [f"# {title}", ""]
    if preamble:
        lines += [preamble.strip(), ""]
    lines += [
        "## Step 0 vs final",
        "",
        f"Validation metrics at the first evaluation (step 0, before training) and the last, "
        f"mean ± sample sd over {n} run{'s' if n != 1 else ''}"
        f"{' (± 0: one run, no spread estimate)' if n == 1 else ''}. "
        "Change is final − baseline per run, averaged; relative is that over the mean baseline."
        + _warm_up_sentence(runs),
        "",
        *_summary_table(summary),
        "",
        "## Per run",
        "",
        "Baseline → final validation values.",
        "",
        *_per_run_table(summary),
        "",
        "## Plots",
        "",
        "Lines: training rollouts, every step. Markers: validation, at evaluation steps.",
        "",
    ]
    for path in plots:
        lines += [f"![{path.stem}]({path.name})", ""]
    lines += ["## Per-step metrics", ""]
    for label, records in runs.items():
        lines += [f"### {label}", "", *_step_table(records), ""]
    return "\n".join(lines)


def write_report(
    runs: dict[str, list[Record]], out_dir: str | Path, *, title: str, preamble: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Writes the plots and report.md into out_dir; returns the summary merged with `extra`.

    The summary is computed first, so a run without two evaluations fails before any file is
    written. `extra` (commit, wall time, ...) may not shadow the summary's own keys.
    """
    summary = summarize(runs)
    extra = extra or {}
    clash = sorted(set(extra) & set(summary))
    if clash:
        raise ValueError(f"extra keys {clash} would overwrite the summary's")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    plots = plot_runs(runs, out)
    text = render_markdown(runs, summary, plots, title=title, preamble=preamble)
    (out / "report.md").write_text(text)
    return {**summary, **extra}
