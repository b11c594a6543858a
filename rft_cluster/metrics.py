"""Step metrics: computed from trajectories, written to metrics.jsonl and W&B, printed per step.

Names follow OpenAI's Agent RFT metrics where they exist (`train_reward_mean`,
`valid_reward_mean`, `timing.step.*`); use prefix "train" for training rollouts and "valid" for
evaluation rollouts. A mean over an empty set (e.g. tool latency when no tool was called) is
left out rather than reported as 0 or NaN, so charts show a gap instead of a false value.
"""

from __future__ import annotations

import json
import math
import shutil
import sys
import tempfile
import uuid
from collections import Counter
from pathlib import Path
from statistics import fmean, pstdev
from typing import Any, Literal

from rich.console import Console
from rich.text import Text

from rft_cluster.redact import Redactor
from rft_cluster.storage import RunStorage
from rft_cluster.types import RolloutStatus, ToolCallStatus, Trajectory

# A malformed call may name no declared tool, its name being arbitrary model text; all such calls
# share one key instead of minting a new W&B metric per typo.
MALFORMED_TOOL_KEY = "_malformed"


def rollout_metrics(trajs: list[Trajectory], prefix: str = "train", pass_threshold: float | None = None) -> dict[str, float]:
    """Aggregates one step's rollouts into `{prefix}_...` metrics.

    - `reward_mean`: the grader's score, over rollouts it scored (failed ones have none);
      `shaped_reward_mean`: the reward trained on (score minus penalties), over the same.
    - `pass_rate` (when the grader sets `pass_threshold`): the fraction of scored rollouts whose
      score is at least the threshold.
    - `tool_calls_per_rollout[/<tool>]`: calls (of that tool; `_malformed` for unparseable calls)
      divided by all rollouts.
    - `tool_latency_mean_s`: over all calls; `tool_errors`: calls whose status is not `ok`.
    - `repeated_tool_bigram_fraction`: of all consecutive call pairs within rollouts, the
      fraction naming the same tool twice in a row.
    - `rollout_latency_mean_s`, `generated_tokens_mean`, `reasoning_tokens_mean`, `turns_mean`:
      over all rollouts.
    - `grader_latency_mean_s`: over rollouts the grader ran on (scored or `grader_failed`);
      `grader_failed_frac`: the share of those it failed on (`grader_warning` shouts above a share).
    - `status/<status>`: count per RolloutStatus, zeros included; `rollouts`: the total.
    """
    p = prefix
    calls = [c for t in trajs for c in t.tool_calls]
    out: dict[str, float] = {f"{p}_rollouts": float(len(trajs))}

    def put_mean(name: str, values: list[float]) -> None:
        if values:
            out[f"{p}_{name}"] = fmean(values)

    put_mean("reward_mean", [t.score for t in trajs if t.score is not None])
    put_mean("shaped_reward_mean", [t.reward for t in trajs if t.reward is not None])
    if pass_threshold is not None:
        put_mean("pass_rate", [float(t.score >= pass_threshold) for t in trajs if t.score is not None])
    # Graded = the grader ran: it returned a score or failed; other rollouts never reached it.
    graded = [t for t in trajs if t.reward is not None or t.status == RolloutStatus.GRADER_FAILED]
    put_mean("grader_latency_mean_s", [t.grader_latency_s for t in graded])
    put_mean("grader_failed_frac", [float(t.status == RolloutStatus.GRADER_FAILED) for t in graded])
    put_mean("rollout_latency_mean_s", [t.latency_s for t in trajs])
    put_mean("generated_tokens_mean", [float(t.generated_tokens) for t in trajs])
    put_mean("reasoning_tokens_mean", [float(t.reasoning_tokens) for t in trajs])
    put_mean("turns_mean", [float(t.num_turns) for t in trajs])
    put_mean("tool_latency_mean_s", [c.latency_s for c in calls])

    if trajs:
        out[f"{p}_tool_calls_per_rollout"] = len(calls) / len(trajs)
        per_tool = Counter(
            MALFORMED_TOOL_KEY if c.status == ToolCallStatus.MALFORMED else c.name for c in calls
        )
        for tool, n in sorted(per_tool.items()):
            out[f"{p}_tool_calls_per_rollout/{tool}"] = n / len(trajs)
    out[f"{p}_tool_errors"] = float(sum(c.status != ToolCallStatus.OK for c in calls))

    # Pooled over all consecutive pairs of the step, so long rollouts weigh by their pair count.
    pairs = [(a.name, b.name) for t in trajs for a, b in zip(t.tool_calls, t.tool_calls[1:])]
    if pairs:
        out[f"{p}_repeated_tool_bigram_fraction"] = sum(a == b for a, b in pairs) / len(pairs)

    statuses = Counter(t.status for t in trajs)
    for status in RolloutStatus:
        out[f"{p}_status/{status.value}"] = float(statuses[status])
    return out


# Above this share of a step's groups without signal, `train` warns (signal_warning).
NO_SIGNAL_WARN_FRAC = 0.5
# Above this share of rollouts with a turn that looks like an unread call, `train` warns and
# `precheck` says NO-GO (unread_calls).
UNPARSED_WARN_FRAC = 0.5
# Above this share of a step's grades failing, the step row and `train` shout and `precheck` says
# NO-GO: a grader failing on some answers trains on the others only (a biased signal, not a quiet one).
GRADER_FAILED_WARN_FRAC = 0.2


def signal_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """The GRPO learning signal of one step's (or a pre-check's) rollouts, over those trained on
    (a reward, not dropped as stale), grouped by group id:

    - `signal/groups`: groups with at least one such rollout;
    - `signal/groups_no_signal_frac`: the share of them whose advantages are all zero (rewards
      all equal, or a single rollout), which add no gradient;
    - `signal/group_reward_std_mean`: the mean within-group std of the reward (0 for a group of one).
    """
    groups: dict[str, list[float]] = {}
    for t in trajs:
        if t.reward is not None and t.status != RolloutStatus.STALE:
            groups.setdefault(t.group_id, []).append(t.reward)
    if not groups:
        return {"signal/groups": 0.0}
    # A group's advantages are all zero exactly when its rewards do not spread.
    spread = [pstdev(rewards) for rewards in groups.values()]
    return {
        "signal/groups": float(len(groups)),
        "signal/groups_no_signal_frac": sum(s == 0.0 for s in spread) / len(groups),
        "signal/group_reward_std_mean": fmean(spread),
    }


def format_metrics(trajs: list[Trajectory]) -> dict[str, float]:
    """Turns that look like a tool call the tool-call parser did not read (`format/unparsed_call_like`),
    per parser likely to read them (`.../<parser>`), and the share of rollouts with any
    (`format/unparsed_call_like_rollouts_frac`): a wrong parser shows here, not as a quiet run."""
    likely = Counter(p for t in trajs for p in t.unparsed_call_like)
    out = {"format/unparsed_call_like": float(sum(likely.values()))}
    if trajs:
        out["format/unparsed_call_like_rollouts_frac"] = sum(bool(t.unparsed_call_like) for t in trajs) / len(trajs)
    out.update({f"format/unparsed_call_like/{parser}": float(n) for parser, n in sorted(likely.items())})
    return out


def unread_calls(metrics: dict[str, float], tool_call_parser: str) -> str | None:
    """What is wrong when most rollouts wrote what looks like a call the parser did not read, else None."""
    frac = metrics.get("format/unparsed_call_like_rollouts_frac", 0.0)
    if frac <= UNPARSED_WARN_FRAC:
        return None
    likely = max((k for k in metrics if k.startswith("format/unparsed_call_like/")), key=metrics.__getitem__).rsplit("/", 1)[1]
    why = (f"calls in its own format that the {likely} parser could not read (malformed)" if likely == tool_call_parser
           else f"what looks like {likely} tool calls, which the {tool_call_parser} parser does not read: set cluster.engine.tool_call_parser: {likely}")
    return f"{frac:.0%} of rollouts wrote {why}"


def parsers_line(parsers: dict[str, str]) -> str:
    """The one line saying how turns are read: `RolloutWorker.start`'s parsers."""
    chosen = f" (chosen from the chat template: {parsers['chosen']})" if parsers["chosen"] else ""
    return (f"[rft] turns read by vLLM's parsers: tool_call_parser {parsers['tool_call_parser']}, "
            f"reasoning_parser {parsers['reasoning_parser']}{chosen}")


def grader_failing(metrics: dict[str, float], prefix: str = "train") -> float | None:
    """The share of graded rollouts the grader failed on, when it is over GRADER_FAILED_WARN_FRAC; else None."""
    frac = metrics.get(f"{prefix}_grader_failed_frac")
    return frac if frac is not None and frac > GRADER_FAILED_WARN_FRAC else None


def grader_warning(metrics: dict[str, float], prefix: str = "train") -> str | None:
    """A warning line when the grader failed on too many of a step's rollouts, else None."""
    frac = grader_failing(metrics, prefix)
    if frac is None:
        return None
    return (f"[rft] WARNING: the grader failed on {frac:.0%} of this step's graded rollouts: they are not trained on, so the "
            "others' rewards are a biased signal. Their `grader_error` is in trajectories/; try `rft-cluster grader-run`")


def signal_warning(metrics: dict[str, float], group_size: int) -> str | None:
    """A warning line when most of a step's groups carried no signal, else None."""
    frac = metrics.get("signal/groups_no_signal_frac")
    if frac is None or frac <= NO_SIGNAL_WARN_FRAC:
        return None
    return (f"[rft] warning: {frac:.0%} of this step's groups carry no signal at group_size {group_size} "
            "(their rewards are all equal): see `rft-cluster precheck` (docs/own-domain.md)")


class RunLogger:
    """Writes each step's metrics to `<run>/metrics.jsonl` and to W&B (offline by default).

    The run is a local path or a pyarrow.fs URI (`rft_cluster.storage`). Object stores cannot
    append, so the lines are kept here and the whole (small) file is rewritten atomically per
    step; a run into an output that already has one continues it. W&B writes only to a local
    directory: for a local run that is `<run>/wandb/` itself; otherwise a temporary directory
    that `upload_wandb()` (at checkpoints) and `finish()` copy into `<run>/wandb/`, so a killed
    run keeps what was last uploaded. The config and every record pass through `redactor`.
    """

    METRICS = "metrics.jsonl"
    WANDB_ID = "wandb/run_id"

    def __init__(
        self,
        run: RunStorage | str | Path,
        job_name: str,
        config: dict[str, Any],
        wandb_mode: Literal["offline", "online", "disabled"] = "offline",
        project: str = "rft-cluster",
        redactor: Redactor | None = None,
    ):
        self.storage = run if isinstance(run, RunStorage) else RunStorage(run)
        self._redact = redactor or Redactor()
        self._lines = self.storage.read_text(self.METRICS).splitlines(keepends=True) if self.storage.exists(self.METRICS) else []
        self._run = None
        self._staging: Path | None = None  # a temporary W&B directory, for a run that is not local
        self.wandb_run_dir: Path | None = None  # W&B's local run directory; `wandb sync` it
        if wandb_mode != "disabled":
            import wandb  # imported only when used: it is slow to import

            local = self.storage.local_path()
            if local is None:
                self._staging = Path(tempfile.mkdtemp(prefix="rft-wandb-"))
            parent = local or self._staging
            parent.mkdir(parents=True, exist_ok=True)
            # One W&B run per output: a resumed run continues the id the first one recorded.
            run_id = self.storage.read_text(self.WANDB_ID).strip() if self.storage.exists(self.WANDB_ID) else uuid.uuid4().hex[:12]
            # Silent: W&B's banner and end-of-run history would sit between the step rows; the
            # driver prints where the run is instead.
            self._run = wandb.init(mode=wandb_mode, dir=parent, project=self._redact.text(project), name=self._redact.text(job_name),
                                   config=self._redact(config), id=run_id, resume="allow", settings=wandb.Settings(silent=True))
            self.storage.write_text(self.WANDB_ID, run_id)
            self.wandb_run_dir = Path(self._run.dir).parent

    def log(self, step: int, metrics: dict[str, float], nodes: dict[str, list[str]] | None = None) -> None:
        """`nodes` (role -> node id of each actor) goes into the JSONL record only; W&B gets it
        once, in the run's config, since its step values are numbers."""
        metrics = self._redact(metrics)  # once, for both sinks
        # Strict JSON has no NaN/Infinity; write null so every JSON reader accepts the file.
        record = {"step": step, **{k: v if math.isfinite(v) else None for k, v in metrics.items()}}
        if nodes is not None:
            record["nodes"] = self._redact(nodes)
        self._lines.append(json.dumps(record) + "\n")
        self.storage.write_text(self.METRICS, "".join(self._lines))
        if self._run is not None:
            self._run.log(metrics, step=step)

    def drop_after(self, step: int) -> None:
        """Forgets logged steps after `step` in metrics.jsonl (a resumed run logs them again)."""
        self._lines = [x for x in self._lines if json.loads(x)["step"] <= step]
        self.storage.write_text(self.METRICS, "".join(self._lines))

    def upload_wandb(self, *, final: bool = False) -> None:
        """Copies the W&B run directory into `<run>/wandb/` when W&B does not write there
        itself (it flushes on its own schedule: the latest records may wait for the next upload).
        A snapshot taken while W&B writes can meet a file it just removed: that upload is
        reported and left to the next one, only the final upload's failure is an error."""
        if self._staging is None or self.wandb_run_dir is None:
            return
        try:
            self.storage.upload_dir(self.wandb_run_dir, f"wandb/{self.wandb_run_dir.name}", replace=False)
        except OSError as e:
            if final:
                raise
            print(self._redact.text(f"[rft] W&B upload to {self.storage.uri_for('wandb')} skipped until the next checkpoint: {e}"), file=sys.stderr)

    def finish(self) -> None:
        if self._run is not None:
            import wandb

            self._run.finish()
            # wandb 0.31's finish() returns before its service has written the offline run's
            # log (seen empty 1 time in 6); teardown waits for the service to flush and exit.
            wandb.teardown()
            self._run = None
            self.upload_wandb(final=True)
        if self._staging is not None:
            shutil.rmtree(self._staging, ignore_errors=True)
            self._staging = None


# Short labels keep the status column narrow; statuses that did not occur are not shown.
_STATUS_LABELS = {
    RolloutStatus.OK: "ok",
    RolloutStatus.BUDGET_EXHAUSTED: "budget",
    RolloutStatus.TOOL_FAILED: "tool",
    RolloutStatus.GRADER_FAILED: "grader",
    RolloutStatus.ENGINE_FAILED: "engine",
    RolloutStatus.TIMEOUT: "timeout",
    RolloutStatus.WORKER_LOST: "lost",
    RolloutStatus.STALE: "stale",
    RolloutStatus.FORMAT_FAILED: "format",
    RolloutStatus.INTERNAL_ERROR: "internal",
}
_TIMINGS = {
    "sampling": "timing.step.sampling",
    "grading": "timing.step.grading",
    "training": "timing.step.training",
    "weight_sync": "timing.step.weight_sync",
    "total": "timing.step.full_iteration",
}
# Printed columns as format specs: numbers right-aligned, the status words left-aligned.
_COLUMNS = [("step", ">6"), ("reward", ">8"), ("calls/roll", ">10"), ("unparsed", ">8"), ("no signal", ">9"), ("status", "<30")] + [
    (title, ">11") for title in _TIMINGS
]


class StepPrinter:
    """One aligned row per step under a header printed once.

    On a terminal the header and reward are styled; elsewhere (CI logs, files) rich emits plain
    text, and soft wrapping keeps each step on one line whatever the console width. Notes pass
    through `redactor` (they may quote an error). Not a `rich.table.Table`: a table renders once,
    whole, while a step's row must reach the log the moment the step ends.
    """

    def __init__(self, console: Console | None = None, prefix: str = "train", redactor: Redactor | None = None):
        self.console = console or Console()
        self.prefix = prefix
        self._redact = redactor or Redactor()
        self._header_printed = False

    def note(self, text: str) -> None:
        """A progress line, as is (no markup), on one line whatever the console width."""
        self.console.print(self._redact.text(text), markup=False, soft_wrap=True)

    def print_step(self, step: int, metrics: dict[str, float]) -> None:
        if not self._header_printed:
            header = " ".join(format(title, spec) for title, spec in _COLUMNS) + "  (seconds)"
            self.console.print(Text(header, style="bold"), soft_wrap=True)
            self._header_printed = True
        p = self.prefix
        reward = metrics.get(f"{p}_reward_mean")
        failing = grader_failing(metrics, p)
        statuses = " ".join(
            # A grader over its failure share is shouted in plain text too (CI logs have no colour).
            f"GRADER {metrics[key]:.0f} ({failing:.0%})" if status == RolloutStatus.GRADER_FAILED and failing else f"{label} {metrics[key]:.0f}"
            for status, label in _STATUS_LABELS.items()
            if metrics.get(key := f"{p}_status/{status.value}")
        )
        cells = [
            (str(step), ""),
            (_fmt(reward, ".3f"), "green" if reward is not None else "dim"),
            (_fmt(metrics.get(f"{p}_tool_calls_per_rollout"), ".2f"), ""),
            (_fmt(metrics.get("format/unparsed_call_like"), ".0f"), "red" if metrics.get("format/unparsed_call_like") else ""),
            (_fmt(metrics.get("signal/groups_no_signal_frac"), ".0%"), ""),
            (statuses, "bold red" if failing else ""),
        ] + [(_fmt(metrics.get(key), ".1f"), "") for key in _TIMINGS.values()]
        row = Text(" ").join(
            Text(format(text, spec), style=style) for (text, style), (_, spec) in zip(cells, _COLUMNS)
        )
        self.console.print(row, soft_wrap=True)


def _fmt(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)
