"""The driver: wires the actors and runs the synchronous RL loop.

    for each step:  sample (rollout workers, tool proxies)  ->  grade (grader actors)
                    ->  train (learner)  ->  publish weights (learner -> rollout workers)

Everything a run writes goes to its storage (a local directory or a pyarrow.fs URI, see
`rft_cluster.storage`): `trajectories/` (Parquet), `metrics.jsonl`, `wandb/` (offline run),
`checkpoints/`, `state/`, `final/` (HF model directory). The driver writes the first two, the
learner the model directories and its state, each through its own filesystem client.
"""

from __future__ import annotations

import os
import random
import socket
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import ray

from rft_cluster.checkpoints import CheckpointDir
from rft_cluster.config import JobSpec, ResolvedHyperparameters
from rft_cluster.dataset import load_rows, row_item
from rft_cluster.grader import GraderActor
from rft_cluster.grpo import group_advantages, shaped_reward
from rft_cluster.learner_group import LearnerGroup
from rft_cluster.metrics import RunLogger, StepPrinter, rollout_metrics
from rft_cluster.placement import Placement, actor_nodes, place
from rft_cluster.rollout_worker import RolloutRequest, RolloutWorker, SamplingSettings
from rft_cluster.storage import RunStorage
from rft_cluster.store import TrajectoryStore
from rft_cluster.tool_proxy import ToolProxy
from rft_cluster.types import RolloutStatus, TrainSample, Trajectory, new_trace_id

# Rollouts in these states are graded and trained on; the rest are discarded (DESIGN §3).
# A rollout that ran out of budget still teaches: its (usually low) reward is the budget pressure.
GRADED = (RolloutStatus.OK, RolloutStatus.BUDGET_EXHAUSTED)


@dataclass
class Cluster:
    """Handles of every actor of a run, and the placement groups that hold them."""

    workers: list[Any]
    proxies: list[Any]
    graders: list[Any]
    learner: LearnerGroup
    placement: Placement
    startup: dict[str, float] = field(default_factory=dict)
    nodes: dict[str, list[str]] = field(default_factory=dict)  # role -> node id of each actor

    def roles(self) -> dict[str, int]:
        return {role: len(ids) for role, ids in self.nodes.items()}


def start_cluster(job: JobSpec, hp: ResolvedHyperparameters) -> Cluster:
    """Places every role (placement.place: fails fast with what is missing), then starts the
    actors in their bundles; engines and learner ranks start in parallel."""
    c = job.cluster
    rl = job.rl
    placement = place(c)
    try:
        proxies = [ray.remote(ToolProxy).options(**o).remote(rl.tools, rl.tool_settings) for o in placement["tool_proxy"].all_options()]
        graders = [ray.remote(GraderActor).options(**o).remote(rl.grader, rl.tool_settings) for o in placement["grader"].all_options()]
        model = str(_model_path(job))
        workers = [
            ray.remote(RolloutWorker).options(**o).remote(model, c.engine, job.seed + i, proxies)
            for i, o in enumerate(placement["rollout_worker"].all_options())
        ]
        t0 = time.perf_counter()
        starts = [w.start.remote() for w in workers]
        learner = LearnerGroup(
            model, c.learner, hp.learning_rate, hp.clip_epsilon, job.seed, hp.warmup_steps, hp.kl_coef,
            placement["learner"].all_options(),
        )
        ray.get(starts)
        startup = time.perf_counter() - t0
        nodes = {role: actor_nodes(actors) for role, actors in
                 {"rollout_worker": workers, "tool_proxy": proxies, "grader": graders}.items()}
        nodes["learner"] = [r.node_id for r in learner.ranks]
    except BaseException:
        placement.remove()  # kills whatever started in it
        raise
    return Cluster(workers, proxies, graders, learner, placement, {"startup_s": startup}, nodes)


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


def spread_groups(requests: list[RolloutRequest], n_workers: int) -> list[list[RolloutRequest]]:
    """Shares of the requests, one per worker, that keep each GRPO group on one worker (its
    rollouts share a prompt prefix, which that engine's prefix cache then computes once),
    largest groups first onto the least-loaded worker."""
    groups: dict[str, list[RolloutRequest]] = {}
    for r in requests:
        groups.setdefault(r.group_id, []).append(r)
    shares: list[list[RolloutRequest]] = [[] for _ in range(n_workers)]
    for group in sorted(groups.values(), key=len, reverse=True):
        min(shares, key=len).extend(group)
    return shares


class Trainer:
    """One run: actors, data, outputs. `run()` executes the configured steps."""

    def __init__(
        self, job: JobSpec, output: RunStorage, max_steps: int | None = None, resume: bool = False, printer: StepPrinter | None = None
    ):
        self.job = job
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
        )
        self.store = TrajectoryStore(output)
        self.printer = printer or StepPrinter()
        self.cluster: Cluster | None = None

    # ------------------------------------------------------------------ phases

    def sample(self, requests: list[RolloutRequest]) -> list[Trajectory]:
        """Spreads the requests over the rollout workers, whole groups each; one call per rollout."""
        workers = self.cluster.workers
        shares = spread_groups(requests, len(workers))
        refs = [w.rollout.remote(r, self.settings) for w, share in zip(workers, shares) for r in share]
        return ray.get(refs)

    def grade(self, trajs: list[Trajectory], items: dict[str, dict]) -> None:
        """Scores every gradable rollout in place; a grader failure becomes `grader_failed`."""
        graders, hp = self.cluster.graders, self.hp
        todo = [t for t in trajs if t.status in GRADED]
        refs = [graders[i % len(graders)].grade.remote(t.sample, items[t.trace_id], t.trace_id) for i, t in enumerate(todo)]
        for t, g in zip(todo, ray.get(refs)):
            t.grader_latency_s = g.latency_s
            if g.score is None:
                t.status, t.grader_error = RolloutStatus.GRADER_FAILED, g.error
            else:
                t.score = g.score
                t.reward = shaped_reward(g.score, len(t.tool_calls), t.reasoning_tokens, hp.tool_call_penalty,
                                         hp.tool_call_penalty_mode, hp.reasoning_token_penalty)

    @staticmethod
    def train_samples(trajs: list[Trajectory], scale_advantages: bool = True) -> list[TrainSample]:
        """Group-relative advantages over the rollouts that were graded; discarded rollouts
        take no part in their group's statistics. A rollout with zero advantage (its group's
        rewards were all equal) adds no gradient, so it is not sent to the learner at all."""
        kept = [t for t in trajs if t.status in GRADED and t.reward is not None]
        adv = group_advantages([t.reward for t in kept], [t.group_id for t in kept], scale_advantages)
        return [TrainSample(t.token_ids, t.loss_mask, t.logprobs, a) for t, a in zip(kept, adv) if a != 0.0]

    def rollouts(self, rows: list[dict], indices: list[int], group: int, step: int, split: str) -> tuple[list[Trajectory], float, float]:
        """Samples `group` rollouts per row and grades them; returns (trajectories, sampling
        seconds, grading seconds)."""
        requests = [_request(rows[i], i, step, split) for i in indices for _ in range(group)]
        t0 = time.perf_counter()
        trajs = self.sample(requests)
        t1 = time.perf_counter()
        self.grade(trajs, {r.trace_id: r.item for r in requests})
        return trajs, t1 - t0, time.perf_counter() - t1

    def evaluate(self, step: int) -> dict[str, float]:
        """Validation rollouts on the current weights, stored as kind=eval."""
        trajs, sampling, grading = self.rollouts(self.valid_rows, list(range(len(self.valid_rows))), self.hp.eval_samples, step, "valid")
        self.store.append(trajs, kind="eval")
        return {**rollout_metrics(trajs, prefix="valid"), "timing.step.eval": sampling + grading}

    # ------------------------------------------------------------------ loop

    def run(self) -> dict[str, Any]:
        self.cluster = start_cluster(self.job, self.hp)
        nodes = self.cluster.nodes
        self.printer.console.print(
            f"[rft] actors up in {self.cluster.startup['startup_s']:.1f} s: {self.cluster.roles()} "
            f"on {len({n for ids in nodes.values() for n in ids})} node(s); "
            f"{self.steps} steps × {self.hp.batch_size} prompts × {self.hp.group_size} rollouts",
            markup=False,
        )
        name = (self.job.suffix or "rft") + (f"-resumed-at-{self.resume_from}" if self.resume_from else "")
        logger = RunLogger(
            self.storage,
            name,
            {"job": self.job.model_dump(mode="json"), "resolved": self.hp.model_dump(), "nodes": nodes},
            wandb_mode=self.job.wandb.mode,
            project=self.job.wandb.project,
        )
        try:
            order = batches(len(self.train_rows), self.hp.batch_size, self.job.seed)
            first = 1
            if self.resume_from is not None:
                first = self._restore(self.resume_from, logger)
                for _ in range(self.resume_from):
                    next(order)
            elif self.valid_rows:
                logger.log(0, self.evaluate(0), nodes=nodes)
            for step in range(first, self.steps + 1):
                metrics = self.step(step, next(order))
                validate = self.valid_rows and (step % self.hp.eval_interval == 0 or step == self.steps)
                if validate:
                    metrics.update(self.evaluate(step))
                if validate or step % self.hp.eval_interval == 0:
                    self.checkpoint(step, metrics.get("valid_reward_mean"))
                    logger.upload_wandb()
                logger.log(step, metrics, nodes=nodes)
                self.printer.print_step(step, metrics)
            final = self.cluster.learner.save_hf(self.storage, "final")
            self.printer.console.print(f"[rft] final policy saved to {final}", markup=False)
            return {"final": final, "output": self.storage.uri_for(), "steps": self.steps, "roles": self.cluster.roles()}
        finally:
            logger.finish()

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
        learner.publish(self.cluster.workers, step)
        dropped = self.store.drop_after(step)
        logger.drop_after(step)
        self.printer.console.print(f"[rft] resumed after step {step}; {dropped} later step file(s) will be redone", markup=False)
        return step + 1

    def step(self, step: int, indices: list[int]) -> dict[str, float]:
        c = self.cluster
        trajs, sampling, grading = self.rollouts(self.train_rows, indices, self.hp.group_size, step, "train")
        t2 = time.perf_counter()
        samples = self.train_samples(trajs, self.hp.scale_advantages)
        # No signal in the batch: no step, so the engines' weights are still current.
        learner_stats = c.learner.train_step(samples) if samples else {}
        t3 = time.perf_counter()
        sync = c.learner.publish(c.workers, step) if samples else {}
        t4 = time.perf_counter()
        self.store.append(trajs, kind="train")
        return {
            **rollout_metrics(trajs, prefix="train"),
            "train/trained_samples": float(len(samples)),
            **{f"train/{k}": float(v) for k, v in learner_stats.items()},
            **{f"train/{k}": float(v) for k, v in sync.items()},
            "timing.step.sampling": sampling,
            "timing.step.grading": grading,
            "timing.step.training": t3 - t2,
            "timing.step.weight_sync": t4 - t3,
            "timing.step.full_iteration": sampling + grading + t4 - t2,
        }

    def shutdown(self) -> None:
        """Stops the engines and the learner's ranks, and closes the HTTP sessions of proxies and graders."""
        if self.cluster is not None:
            c = self.cluster
            ray.get([w.shutdown.remote() for w in c.workers] + [a.close.remote() for a in c.proxies + c.graders])
            c.learner.shutdown()
            c.placement.remove()
            self.cluster = None


def init_ray(job: JobSpec) -> None:
    """Connects to `cluster.ray_address`, else to RAY_ADDRESS (set for a Ray job's driver, so
    `ray job submit ... -- rft-cluster train job.yaml` runs in the cluster it was submitted to),
    else starts a fresh local cluster (never one a `ray start` left recorded in Ray's temp dir)."""
    if ray.is_initialized():
        return
    source = "cluster.ray_address" if job.cluster.ray_address else "RAY_ADDRESS"
    address = job.cluster.ray_address or os.environ.get("RAY_ADDRESS")
    if not address:
        ray.init(address="local", include_dashboard=False)
        return
    # ray.init retries an unreachable GCS for minutes; a refused connection is reported at once.
    host, _, port = address.removeprefix("ray://").rpartition(":")
    if port.isdigit():
        try:
            socket.create_connection((host, int(port)), timeout=10).close()
        except OSError as e:
            raise SystemExit(f"cannot connect to the Ray cluster at {address} ({source}): {e.strerror or e}") from None
    ray.init(address=address)


DEFAULT_OUTPUT = "runs/train"


def run_storage(job: JobSpec, output: str | Path | None = None) -> RunStorage:
    """Where a run writes: `output` (`--output`) wins, else the job's `storage` (a relative path
    resolves against the job file, as its other paths do), else runs/train."""
    if output is None and job.storage:
        output = job.storage if "://" in job.storage else job.resolve_path(job.storage)
    return RunStorage(output or DEFAULT_OUTPUT)


def train(job: JobSpec, output: str | Path | None = None, max_steps: int | None = None, resume: bool = False) -> dict[str, Any]:
    """Runs the job, writing to `run_storage(job, output)`."""
    trainer = Trainer(job, run_storage(job, output), max_steps, resume)
    init_ray(job)
    try:
        return trainer.run()
    finally:
        trainer.shutdown()
