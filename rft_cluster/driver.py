"""The driver: wires the actors and runs the streaming RL loop.

    rollout fleet (rollout workers, tool proxies) --each rollout as it ends--> grader actors
        --each step's batch, once every rollout of it has ended--> learner
        --new weights, between the engines' generation steps--> rollout fleet

Sampling runs up to `max_staleness` steps ahead of training: with 0 each step samples on the
newest weights (synchronous); with k the fleet samples steps s+1..s+k while the learner trains
step s, and no rollout is trained on whose oldest token is more than k learner updates old.
A step trains on its own prompts (`batch_size` groups, in the order they were started), so a
resumed run sees the same prompts. The fleet is elastic and outlives its workers (`fleet.py`);
tool proxies and graders are restarted by Ray and their calls retried.

Everything a run writes goes to its storage (a local directory or a pyarrow.fs URI, see
`rft_cluster.storage`): `trajectories/` (Parquet), `metrics.jsonl`, `wandb/` (offline run),
`checkpoints/`, `state/`, `final/` (HF model directory). The driver writes the first two, the
learner the model directories and its state, each through its own filesystem client.
"""

from __future__ import annotations

import logging
import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import ray
from ray.exceptions import RayActorError

from rft_cluster.actor_restarts import restartable
from rft_cluster.checkpoints import CheckpointDir
from rft_cluster.config import JobSpec, ResolvedHyperparameters
from rft_cluster.dataset import load_rows, row_item
from rft_cluster.fleet import Lost, RolloutFleet, Slot
from rft_cluster.grader_actor import GraderActor
from rft_cluster.grpo import group_advantages, shaped_reward
from rft_cluster.learner_group import LearnerGroup
from rft_cluster.metrics import (
    RunLogger, StepPrinter, format_metrics, grader_warning, parsers_line, rollout_metrics, signal_metrics, signal_warning,
    unread_calls,
)
from rft_cluster.pipeline import Batch, Staleness, drop_stale, lost_trajectory
from rft_cluster.redact import Redactor, redact_logs
from rft_cluster.placement import Placement, actor_nodes, place
from rft_cluster.rollout_worker import SamplingSettings
from rft_cluster.storage import RunStorage
from rft_cluster.trajectory_store import TrajectoryStore
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.types import GradeResult, RolloutRequest, RolloutStatus, TrainSample, Trajectory, new_trace_id
from rft_cluster.weight_transfer import Publish, publish_from

# Rollouts in these states are graded and trained on; the rest are discarded (docs/architecture.md §4).
# A rollout that ran out of budget still teaches: its (usually low) reward is the budget pressure.
GRADED = (RolloutStatus.OK, RolloutStatus.BUDGET_EXHAUSTED, RolloutStatus.FORMAT_FAILED)


@dataclass
class Cluster:
    """Handles of every actor of a run, and the placement groups that hold them."""

    fleet: RolloutFleet
    proxies: list[Any]
    graders: list[Any]
    learner: LearnerGroup | None  # None: sampling only (precheck)
    placement: Placement
    startup: dict[str, float] = field(default_factory=dict)
    services: dict[str, list[str]] = field(default_factory=dict)  # role -> node id of each actor, but the fleet's

    @property
    def nodes(self) -> dict[str, list[str]]:
        """Role -> node id of each actor (rollout workers: those up now)."""
        return {"rollout_worker": self.fleet.node_ids(), **self.services}

    def roles(self) -> dict[str, int]:
        return {role: len(ids) for role, ids in self.nodes.items()}


def start_cluster(job: JobSpec, hp: ResolvedHyperparameters, learner: bool = True) -> Cluster:
    """Places the learner (unless `learner` is False: sampling only), proxies and graders
    (placement.place: fails fast with what is missing), then the fleet's slots; engines and
    learner ranks start in parallel."""
    c = job.cluster
    rl = job.rl
    placement = place(c, learner)
    fleet = None
    try:
        restart = restartable(c.actor_max_restarts)
        proxies = [ray.remote(ToolProxy).options(**o, **restart).remote(rl.tools, rl.tool_settings, job.redactor) for o in placement["tool_proxy"].all_options()]
        graders = [ray.remote(GraderActor).options(**o, **restart).remote(rl.grader, rl.tool_settings, job.redactor) for o in placement["grader"].all_options()]
        model = str(_model_path(job))
        fleet = RolloutFleet(c, model, job.seed, proxies)
        fleet.launch()  # engines start while the learner's ranks do
        fleet.placed()
        ranks = LearnerGroup(
            model, c.learner, hp.learning_rate, hp.clip_epsilon, job.seed, hp.warmup_steps, hp.kl_coef,
            placement["learner"].all_options(), old_logprobs=hp.old_logprobs, tis_cap=hp.tis_cap,
        ) if learner else None
        startup = fleet.start()
        services = {role: actor_nodes(actors) for role, actors in {"tool_proxy": proxies, "grader": graders}.items()}
        if ranks is not None:
            services["learner"] = [r.node_id for r in ranks.ranks]
    except BaseException:
        if fleet is not None:
            fleet.remove()
        placement.remove()  # kills whatever started in it
        raise
    return Cluster(fleet, proxies, graders, ranks, placement, startup, services)


def _model_path(job: JobSpec) -> str | Path:
    """A local directory (relative to the job file) or a hub name, passed on unchanged."""
    local = job.resolve_path(job.model)
    return local if local.exists() else job.model


def _request(row: dict, index: int, step: int, split: str) -> RolloutRequest:
    """One rollout of a row; the `group_size` rollouts of a row in a step share a group id."""
    prompt_id = str(row.get("id", f"{split}-{index}"))
    return RolloutRequest(
        trace_id=new_trace_id(),
        prompt_id=prompt_id,
        group_id=f"{split}-{step}-{prompt_id}",
        step=step,
        messages=row["messages"],
        tools=row.get("tools", []),
        item=row_item(row),
    )


# How much of an error text the driver records (a rollout's, a grade's): enough to act on.
ERROR_TEXT_CHARS = 500


def _cause(e: Exception, redactor: Redactor) -> str:
    """An actor's exception as `Type: message` (a RayTaskError's own text is a whole traceback),
    redacted, then cut."""
    cause = getattr(e, "cause", None) or e
    return f"{type(cause).__name__}: {redactor.clip(str(cause), ERROR_TEXT_CHARS)}"


def failed_rollout(request: RolloutRequest, stage: str, e: Exception, redactor: Redactor) -> Trajectory:
    """The record of a rollout that an exception in our code ended at `stage`."""
    return replace(lost_trajectory(request, f"{stage}: {_cause(e, redactor)}", None), status=RolloutStatus.INTERNAL_ERROR)


def batches(n_rows: int, batch_size: int, seed: int) -> Iterator[list[int]]:
    """Row indices per step: each epoch is a fresh seeded shuffle; a step is a pure function of
    (seed, step), so a resumed run draws the same prompts."""
    epoch = 0
    while True:
        order = list(range(n_rows))
        random.Random(seed * 1_000_003 + epoch).shuffle(order)
        for i in range(0, n_rows - batch_size + 1, batch_size):
            yield order[i : i + batch_size]
        epoch += 1


class Trainer:
    """One run: actors, data, outputs. `run()` executes the configured steps."""

    def __init__(
        self, job: JobSpec, output: RunStorage, max_steps: int | None = None, resume: bool = False, printer: StepPrinter | None = None
    ):
        self.job = job
        redact_logs(job.redactor)  # the driver's own log records
        self.storage = output
        self.checkpoints = CheckpointDir(output)
        self.resume_from = self.checkpoints.resumable_step() if resume else None
        if resume and self.resume_from is None:
            raise SystemExit(f"--resume: {output.uri_for()} holds no checkpoint to resume from (state/driver.json)")
        self.train_rows = load_rows(job.resolve_path(job.training_file))
        self.valid_rows = load_rows(job.resolve_path(job.validation_file)) if job.validation_file else []
        self.hp = job.rl.hyperparameters.resolved(len(self.train_rows))
        self.steps = min(self.hp.total_steps, max_steps) if max_steps else self.hp.total_steps
        self.settings = SamplingSettings(
            temperature=self.hp.temperature,
            max_tokens_per_turn=self.hp.max_tokens_per_turn,
            max_episode_steps=job.rl.max_episode_steps,
            rollout_timeout_s=job.rl.tool_settings.rollout_timeout_s,
            reasoning_effort=None if job.rl.hyperparameters.reasoning_effort == "default" else job.rl.hyperparameters.reasoning_effort,
        )
        self.store = TrajectoryStore(output, job.redactor)
        # OpenAI's graders that score on a scale carry it; string_check and multi do not.
        self.pass_threshold: float | None = getattr(job.rl.grader, "pass_threshold", None)
        self.printer = printer or StepPrinter(redactor=job.redactor)
        self.cluster: Cluster | None = None
        # The loop's state: what is in flight, and the weight version the engines hold.
        self._rollouts: dict[Any, tuple[Batch, RolloutRequest]] = {}  # rollout ref -> its batch and request
        self._grades: dict[Any, tuple[Batch, Trajectory]] = {}  # grade ref -> (batch, rollout)
        self._backlog: list[tuple[list[RolloutRequest], Batch]] = []  # groups waiting for a worker
        self._batches: dict[int, Batch] = {}  # train step -> its batch
        self._next_grader = 0
        self.version = 0
        self.staleness = Staleness(0)
        self._busy_mark: tuple[float, dict[Any, float]] = (time.perf_counter(), {})  # (when, worker -> busy seconds)

    # ------------------------------------------------------------------ rollouts in flight

    def submit(self, rows: list[dict], indices: list[int], group: int, step: int, kind: str) -> Batch:
        """Starts `group` rollouts of each row, each group on one worker."""
        split = "train" if kind == "train" else "valid"
        batch = Batch(kind, step, expected=len(indices) * group)
        for i in indices:
            requests = [_request(rows[i], i, step, split) for _ in range(group)]
            self._dispatch(requests, batch)
        return batch

    def _dispatch(self, requests: list[RolloutRequest], batch: Batch) -> None:
        for r in requests:
            batch.items[r.trace_id] = r.item
        if not self.cluster.fleet.workers:  # every worker lost: wait for a replacement
            self._backlog.append((requests, batch))
            return
        for ref, request in zip(self.cluster.fleet.submit_group(requests, self.settings), requests):
            self._rollouts[ref] = batch, request

    def pump(self, timeout: float) -> None:
        """Waits up to `timeout` for rollouts, grades or engines, and handles all that are ready."""
        fleet = self.cluster.fleet
        refs = [*self._rollouts, *self._grades, *fleet.pending()]
        if not refs:  # rollouts wait for a worker, and none is up or starting
            raise RuntimeError("no rollout worker is left to run the waiting rollouts (every slot gave up; see the lines above)")
        ready, _ = ray.wait(refs, num_returns=1, timeout=timeout)
        if ready:  # and everything else already done
            ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        for ref in ready:
            if ref in self._rollouts:
                self._rollout_ended(ref)
            elif ref in self._grades:
                self._graded(ref)
        for slot in fleet.poll(ready):
            self._join(slot)

    def _rollout_ended(self, ref: Any) -> None:
        batch, request = self._rollouts.pop(ref)
        try:
            out = self.cluster.fleet.result(ref)
        except Exception as e:  # the worker raised (or its result did not deserialize): this rollout ends, not the run
            out = failed_rollout(request, "returning the rollout", e, self.job.redactor)
        if out.error:  # a worker holds no redactor and sends its error texts whole: redacted, then cut, here
            out.error = self.job.redactor.clip(out.error, ERROR_TEXT_CHARS)
        if isinstance(out, Lost):
            batch.record_lost(out.request, out.error, out.node_id)
            rerun = replace(out.request, trace_id=new_trace_id())
            self.printer.note(f"[rft] {out.error}: re-running {out.request.trace_id} as {rerun.trace_id}")
            self._dispatch([rerun], batch)
            return
        batch.sampled()
        if out.status not in GRADED:
            batch.end(out)
            return
        graders = self.cluster.graders
        grader = graders[self._next_grader % len(graders)]
        self._next_grader += 1
        self._grades[grader.grade.remote(out.sample, batch.items[out.trace_id], out.trace_id)] = (batch, out)

    def _graded(self, ref: Any) -> None:
        """Scores the rollout; a grader failure (or a grader actor out of restarts) becomes `grader_failed`."""
        batch, t = self._grades.pop(ref)
        try:
            g = ray.get(ref)
        except RayActorError as e:
            g = GradeResult(score=None, error=f"grader actor died: {type(e).__name__}")
        except Exception as e:  # the grader actor raised: this grade fails, not the run
            g = GradeResult(score=None, error=f"grading raised {_cause(e, self.job.redactor)}")
        hp = self.hp
        t.grader_latency_s = g.latency_s
        if g.score is None:
            t.status, t.grader_error = RolloutStatus.GRADER_FAILED, g.error
        else:
            t.score = g.score
            t.reward = shaped_reward(g.score, len(t.tool_calls), t.reasoning_tokens, hp.tool_call_penalty,
                                     hp.tool_call_penalty_mode, hp.reasoning_token_penalty)
        batch.end(t)

    def _join(self, slot: Slot) -> None:
        """A worker that came up after the start (new node, replacement) gets the current
        weights, then takes rollouts (and any that waited for a worker)."""
        t0 = time.perf_counter()
        # Version 0 is the model the engine loaded itself.
        if self.version != 0 and not self._send_weights([slot.worker], self.version):
            return  # died while loading them: replaced again
        self.cluster.fleet.joined(slot, self.version, time.perf_counter() - t0)
        j = self.cluster.fleet.joins[-1]
        self.printer.note(f"[rft] rollout worker {slot.index} joined on node {slot.node_id} at weight version {self.version} "
                          f"({j['start_s']:.1f} s after it was asked for; weights loaded in {j['weights_s']:.2f} s)")
        backlog, self._backlog = self._backlog, []
        for requests, batch in backlog:
            self._dispatch(requests, batch)

    def wait_for(self, batch: Batch) -> float:
        """Pumps until `batch` is complete; returns the seconds spent waiting."""
        t0 = time.perf_counter()
        while not batch.complete:
            self.pump(1.0)
        return time.perf_counter() - t0

    @staticmethod
    def train_samples(trajs: list[Trajectory], scale_advantages: bool = True) -> list[TrainSample]:
        """Group-relative advantages over the rollouts that were graded; discarded rollouts
        take no part in their group's statistics. A rollout with zero advantage (its group's
        rewards were all equal) adds no gradient, so it is not sent to the learner at all."""
        kept = [t for t in trajs if t.status in GRADED and t.reward is not None]
        adv = group_advantages([t.reward for t in kept], [t.group_id for t in kept], scale_advantages)
        return [TrainSample(t.token_ids, t.loss_mask, t.logprobs, a) for t, a in zip(kept, adv) if a != 0.0]

    def warm_up(self) -> float:
        """Each rollout worker samples the first turns of a GRPO group on one of the first
        prompts, and keeps nothing: a cold engine (kernels not yet built, caches not allocated)
        would make the baseline evaluation look slower than every later one. No tool or grader is
        called: the users' endpoints see only rollouts that are stored."""
        t0 = time.perf_counter()
        rows = self.valid_rows or self.train_rows
        fleet = self.cluster.fleet
        calls = [(w, w.warm_up.remote(_request(rows[i % len(rows)], i, 0, "warmup"), self.settings, self.hp.group_size))
                 for i, w in enumerate(fleet.workers)]
        for worker, ref in calls:
            try:
                ray.get(ref)
            except RayActorError:  # replaced; the replacement joins as any other
                fleet.lost(worker, "died during the warm-up")
        return time.perf_counter() - t0

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation rollouts on the current weights (no publish happens until they end), stored as kind=eval."""
        batch = self.submit(self.valid_rows, list(range(len(self.valid_rows))), self.hp.eval_samples, step, "eval")
        self.wait_for(batch)
        self.store.append(batch.trajs, kind="eval")
        return {**rollout_metrics(batch.trajs, prefix="valid", pass_threshold=self.pass_threshold), "timing.step.eval": batch.completed_at - batch.submitted_at}

    # ------------------------------------------------------------------ loop

    def start(self, learner: bool = True) -> Cluster:
        """Starts the run's actors: what `run()` trains with, and (without the learner, which it
        never needs) what `rft-cluster precheck` samples with."""
        self.cluster = start_cluster(self.job, self.hp, learner)
        return self.cluster

    def run(self) -> dict[str, Any]:
        # Engines take a minute or more to start: say so before the wait.
        self.printer.note(f"[rft] starting {self.job.cluster.fleet.min} rollout engine(s), the learner, tool proxies and graders ...")
        c = self.start()
        fleet = c.fleet.spec.fleet
        self.printer.note(
            f"[rft] actors up in {c.startup['startup_s']:.1f} s: {c.roles()} "
            f"on {len({n for ids in c.nodes.values() for n in ids})} node(s)"
            + (f" (rollout fleet {fleet.min}..{fleet.max})" if fleet.min != fleet.max else "")
            + f"; {self.steps} steps × {self.hp.batch_size} prompts × {self.hp.group_size} rollouts, max_staleness {self.hp.max_staleness}"
        )
        self.printer.note(parsers_line(c.startup["parsers"]))
        name = (self.job.suffix or "rft") + (f"-resumed-at-{self.resume_from}" if self.resume_from else "")
        logger = RunLogger(
            self.storage,
            name,
            {"job": self.job.model_dump(mode="json"), "resolved": self.hp.model_dump(), "nodes": c.nodes},
            wandb_mode=self.job.wandb.mode,
            project=self.job.wandb.project,
            redactor=self.job.redactor,
        )
        if self.job.wandb.mode != "disabled":
            self.printer.note(f"[rft] W&B run ({self.job.wandb.mode}) in {self.storage.uri_for('wandb')}")
        try:
            order = batches(len(self.train_rows), self.hp.batch_size, self.job.seed)
            first = 1
            if self.resume_from is not None:
                first = self._restore(self.resume_from, logger)
            elif self.valid_rows:
                warm = self.warm_up()
                self.printer.note(f"[rft] engines warmed up in {warm:.1f} s (no tool or grader called); baseline evaluation next")
                logger.log(0, {**self.evaluate(0), "timing.warmup": warm}, nodes=c.nodes)
            for _ in range(first - 1):
                next(order)
            next_submit, last_done = first, time.perf_counter()
            self._engine_busy()  # the mark the first step's busy share is measured from
            for step in range(first, self.steps + 1):
                # Sampling runs ahead: steps up to `step + max_staleness` are in flight.
                while next_submit <= self.steps and next_submit - step <= self.hp.max_staleness:
                    self._batches[next_submit] = self.submit(self.train_rows, next(order), self.hp.group_size, next_submit, "train")
                    next_submit += 1
                batch = self._batches[step]
                waiting = self.wait_for(batch)
                del self._batches[step]
                metrics = self.train(step, batch)
                metrics["timing.step.waiting"] = waiting
                # The step's own time: evaluations and checkpoints are timed apart.
                metrics["timing.step.full_iteration"] = time.perf_counter() - last_done
                validate = self.valid_rows and (step % self.hp.eval_interval == 0 or step == self.steps)
                if validate:
                    metrics.update(self.evaluate(step))
                if validate or step % self.hp.eval_interval == 0:
                    self.checkpoint(step, metrics.get("valid_reward_mean"))
                    logger.upload_wandb()
                logger.log(step, metrics, nodes=c.nodes)
                self.printer.print_step(step, metrics)
                if warning := signal_warning(metrics, self.hp.group_size):
                    self.printer.note(warning)
                if warning := grader_warning(metrics):
                    self.printer.note(warning)
                if unread := unread_calls(metrics, c.startup["parsers"]["tool_call_parser"]):
                    self.printer.note(f"[rft] warning: {unread}")
                last_done = time.perf_counter()
            final = c.learner.save_hf(self.storage, "final")
            self.printer.note(f"[rft] final policy saved to {final}")
            return {"final": final, "output": self.storage.uri_for(), "steps": self.steps, "roles": c.roles(),
                    "fleet": {"losses": c.fleet.losses, "joins": c.fleet.joins}}
        finally:
            logger.finish()

    def train(self, step: int, batch: Batch) -> dict[str, float]:
        """One learner step on a complete batch, then its weights to the fleet."""
        c = self.cluster
        trajs = batch.trajs
        pipeline = drop_stale(trajs, self.staleness, self.hp.max_staleness, GRADED)
        t0 = time.perf_counter()
        samples = self.train_samples(trajs, self.hp.scale_advantages)
        # No signal in the batch: no step, so the engines' weights are still current.
        learner_stats = c.learner.train_step(samples) if samples else {}
        t1 = time.perf_counter()
        sync = self.publish(step) if samples else {}
        t2 = time.perf_counter()
        self.store.append(trajs, kind="train")
        later = [b for s, b in self._batches.items() if s > step]
        pipeline.update({
            "pipeline/buffered_rollouts": float(sum(b.ended for b in later)),
            "pipeline/inflight_rollouts": float(len(self._rollouts)),
            "pipeline/rollout_workers": float(len(c.fleet.workers)),
            "pipeline/worker_losses": float(c.fleet.losses),
            "pipeline/engine_busy": self._engine_busy(),
        })
        return {
            **rollout_metrics(trajs, prefix="train", pass_threshold=self.pass_threshold),
            **signal_metrics(trajs),
            **format_metrics(trajs),
            "train/trained_samples": float(len(samples)),
            **{f"train/{k}": float(v) for k, v in learner_stats.items()},
            **{f"train/{k}": float(v) for k, v in sync.items()},
            **pipeline,
            "timing.step.sampling": (batch.sampled_at or batch.completed_at) - batch.submitted_at,
            "timing.step.grading": batch.completed_at - (batch.sampled_at or batch.completed_at),
            "timing.step.training": t1 - t0,
            "timing.step.weight_sync": t2 - t1,
        }

    def _engine_busy(self) -> float:
        """The share of the wall time since the last call that the engines had work, averaged
        over the workers up at both ends (a worker lost meanwhile is not asked)."""
        workers = self.cluster.fleet.workers
        now = time.perf_counter()
        busy = {}
        for w, ref in [(w, w.engine_stats.remote()) for w in workers]:
            try:
                busy[w] = ray.get(ref)["busy_s"]
            except RayActorError:  # died just now: its rollouts come back as lost
                pass
        (then, before), self._busy_mark = self._busy_mark, (now, busy)
        both = [w for w in busy if w in before]
        if not both or now <= then:
            return 0.0
        return sum(busy[w] - before[w] for w in both) / (len(both) * (now - then))

    def publish(self, version: int) -> dict[str, float]:
        """The learner's weights to every worker that is up, as `version`; a worker found dead
        is replaced (its rollouts come back as lost)."""
        stats = self._send_weights(self.cluster.fleet.workers, version)
        self.version = version
        self.staleness.published(version)
        return stats

    def _send_weights(self, workers: list[Any], version: int) -> dict[str, float]:
        """Publishes to `workers`; those found dead are replaced. Returns the stats, empty when none survived."""
        engine = self.job.cluster.engine
        job = Publish(workers, version, self.job.cluster.learner.weight_bucket_mb << 20, self.cluster.startup["weight_transfer"],
                      None if engine.dtype == "auto" else engine.dtype, engine.tensor_parallel_size)
        result = publish_from(self.cluster.learner, job)
        for i in result.lost:
            self.cluster.fleet.lost(workers[i], "died during a weight publish")
        return result.stats() if len(result.lost) < len(workers) else {}

    def checkpoint(self, step: int, valid_reward_mean: float | None) -> None:
        """An HF model directory (best few kept), then the resume state, then the step marker:
        a kill anywhere in between resumes from the previous complete state."""
        learner, ckpt = self.cluster.learner, self.checkpoints
        learner.save_hf(self.storage, ckpt.model_rel(step))
        ckpt.add(step, valid_reward_mean)
        learner.save_state(self.storage, ckpt.LEARNER_STATE, ckpt.state_tag(step))
        ckpt.save_step(step)

    def _restore(self, step: int, logger: RunLogger) -> int:
        """Loads the learner state of `step`, publishes it to the engines and forgets every
        output of later steps (they are redone). Returns the first step to run."""
        learner = self.cluster.learner
        learner.load_state(self.storage, CheckpointDir.LEARNER_STATE, CheckpointDir.state_tag(step))
        self.publish(step)
        self.staleness = Staleness(step)
        dropped = self.store.drop_after(step)
        logger.drop_after(step)
        self.printer.note(f"[rft] resumed after step {step}; {dropped} later step file(s) will be redone")
        return step + 1

    def shutdown(self) -> None:
        """Stops the engines and the learner's ranks, and closes the HTTP sessions of proxies and graders."""
        if self.cluster is not None:
            c = self.cluster
            ray.get([a.close.remote() for a in c.proxies + c.graders])
            c.fleet.remove()
            if c.learner is not None:
                c.learner.shutdown()
            c.placement.remove()
            self.cluster = None


def init_ray(job: JobSpec, verbose: bool = False) -> None:
    """Connects to `cluster.ray_address`, else to RAY_ADDRESS (set for a Ray job's driver, so
    `ray job submit ... -- rft-cluster train job.yaml` runs in the cluster it was submitted to),
    else starts a fresh local cluster (never one a `ray start` left recorded in Ray's temp dir).
    Unless `verbose`, the actors' output stays in Ray's session logs (`worker_logs_dir`) instead
    of being forwarded to this console, vLLM logs warnings only, and Ray's own driver lines too."""
    if ray.is_initialized():
        return
    quiet = {} if verbose else {"log_to_driver": False, "logging_level": logging.WARNING, "runtime_env": _quiet_runtime_env()}
    source = "cluster.ray_address" if job.cluster.ray_address else "RAY_ADDRESS"
    address = job.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", include_dashboard=False, **quiet)
        return
    # ray.init retries an unreachable GCS for minutes; a refused connection is reported at once.
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as e:
            raise SystemExit(f"cannot connect to the Ray cluster at {address} ({source}): {e.strerror or e}") from None
    ray.init(address=address, **quiet)


def _quiet_runtime_env() -> dict[str, Any] | None:
    """VLLM_LOGGING_LEVEL for every actor and the engine processes they start (env_vars reach
    both, on a local or a joined cluster). A level already set here wins: a submitted job's
    forwarded variable is in this environment, and Ray refuses the same key twice."""
    return None if "VLLM_LOGGING_LEVEL" in os.environ else {"env_vars": {"VLLM_LOGGING_LEVEL": "WARNING"}}


def worker_logs_dir() -> Path | None:
    """This node's Ray session logs (`<ray temp dir>/session_*/logs`), where each actor process's
    stdout and stderr land as worker-*.out|err; None when this driver has no node of its own (Ray Client)."""
    node = getattr(ray._private.worker.global_worker, "node", None)
    return Path(node.get_logs_dir_path()) if node is not None else None


def _of_job(log: Path, job_id: str) -> bool:
    """Ray names a worker's files after the job it started for; a worker started before any job
    (`ffffffff`) writes `:job_id:<id>` first once a job's task or actor runs on it."""
    if f"-{job_id}-" in log.name:
        return True
    with log.open(errors="replace") as f:
        return f.readline().strip() == f":job_id:{job_id}"


def keep_worker_logs(storage: RunStorage, redactor: Redactor) -> Path | None:
    """Copies (redacted) this job's non-empty worker logs on this node into the run's `logs/`
    when the run is a local directory; returns that directory, else None (object stores: left as they are)."""
    source, target = worker_logs_dir(), storage.local_path("logs")
    if source is None or target is None:
        return None
    job_id = ray.get_runtime_context().get_job_id()
    target.mkdir(parents=True, exist_ok=True)
    for log in sorted(source.glob("worker-*")):
        if log.suffix in (".out", ".err") and log.stat().st_size and _of_job(log, job_id):
            (target / log.name).write_text(redactor.text(log.read_text(errors="replace")))
    return target


DEFAULT_OUTPUT = "runs/train"


def run_storage(job: JobSpec, output: str | Path | None = None) -> RunStorage:
    """Where a run writes: `output` (`--output`) wins, else the job's `storage` (a relative path
    resolves against the job file, as its other paths do), else runs/train."""
    if output is None and job.storage:
        output = job.storage if "://" in job.storage else job.resolve_path(job.storage)
    return RunStorage(output or DEFAULT_OUTPUT)


def train(
    job: JobSpec, output: str | Path | None = None, max_steps: int | None = None, resume: bool = False, verbose: bool = False
) -> dict[str, Any]:
    """Runs the job, writing to `run_storage(job, output)`; the actors' logs end up in its `logs/` (local runs)."""
    trainer = Trainer(job, run_storage(job, output), max_steps, resume)
    init_ray(job, verbose)
    logs = worker_logs_dir()
    if logs is not None:
        shown = "also shown here" if verbose else "not shown here: --verbose shows them"
        trainer.printer.note(f"[rft] actor and engine logs: {logs}/worker-*.out|err ({shown})")
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
        kept = keep_worker_logs(trainer.storage, job.redactor)
        if kept is not None:
            trainer.printer.note(f"[rft] actor and engine logs copied to {kept}")
