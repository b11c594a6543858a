"""Checkpoints of a run: HF model directories at validation steps (the best few kept) and the
resume state (learner weights + optimizer, and the driver's step), in the run's storage.

    <run>/checkpoints/step-000012/        HF model directory (vLLM and transformers load it)
    <run>/checkpoints/index.json          [{step, valid_reward_mean, path}], best first
    <run>/state/learner/step-12/          DeepSpeed checkpoint of the latest checkpoint step
    <run>/state/driver.json               {"step": 12}: the last step whose state is saved

`<run>` is a local path or a pyarrow.fs URI (`rft_cluster.storage`); `path` in index.json is the
checkpoint's local path or URI (without the URI's query options). The learner writes the model
directories and the DeepSpeed state; this class writes the two JSON files, each atomically, after
what they name is complete. Batches are a pure function of (seed, step), so the step is the
whole data position.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

from rft_cluster.storage import RunStorage


@dataclass
class Checkpoint:
    step: int
    valid_reward_mean: float | None
    path: str


class CheckpointDir:
    INDEX = "checkpoints/index.json"
    DRIVER = "state/driver.json"
    LEARNER_STATE = "state/learner"

    def __init__(self, run: RunStorage | str | Path, keep: int = 3):
        self.storage = run if isinstance(run, RunStorage) else RunStorage(run)
        self.keep = keep

    @staticmethod
    def model_rel(step: int) -> str:
        return f"checkpoints/step-{step:06d}"

    @staticmethod
    def state_tag(step: int) -> str:
        """The DeepSpeed tag of `step`'s learner state, under LEARNER_STATE."""
        return f"step-{step}"

    def index(self) -> list[Checkpoint]:
        if not self.storage.exists(self.INDEX):
            return []
        return [Checkpoint(**c) for c in json.loads(self.storage.read_text(self.INDEX))]

    def add(self, step: int, valid_reward_mean: float | None) -> list[Checkpoint]:
        """Records the model saved at `model_rel(step)` and deletes all but the best `keep`
        (by valid_reward_mean, later steps first among equals; unvalidated ones rank last)."""
        entries = [c for c in self.index() if c.step != step]
        entries.append(Checkpoint(step, valid_reward_mean, self.storage.uri_for(self.model_rel(step))))
        reward = lambda c: c.valid_reward_mean if c.valid_reward_mean is not None and math.isfinite(c.valid_reward_mean) else -math.inf
        entries.sort(key=lambda c: (reward(c), c.step), reverse=True)
        kept, dropped = entries[: self.keep], entries[self.keep :]
        self.storage.write_text(self.INDEX, json.dumps([asdict(c) for c in kept], indent=1))
        for c in dropped:
            self.storage.delete(self.model_rel(c.step))
        return kept

    def save_step(self, step: int) -> None:
        """Marks the learner state just written as that of `step` (written after it, so a kill
        in between resumes from the previous, complete state), then deletes older states."""
        self.storage.write_text(self.DRIVER, json.dumps({"step": step}))
        for name in self.storage.list(self.LEARNER_STATE):
            if name.startswith("step-") and name != self.state_tag(step):
                self.storage.delete(f"{self.LEARNER_STATE}/{name}")

    def resumable_step(self) -> int | None:
        return json.loads(self.storage.read_text(self.DRIVER))["step"] if self.storage.exists(self.DRIVER) else None
