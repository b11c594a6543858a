"""Checkpoints of a run: HF model directories at validation steps (the best few kept) and the
resume state (learner weights + optimizer, and the driver's step), under the run's output.

    <run>/checkpoints/step-000012/        HF model directory (vLLM and transformers load it)
    <run>/checkpoints/index.json          [{step, valid_reward_mean, path}], best first
    <run>/state/learner/                  DeepSpeed checkpoint of the latest checkpoint step
    <run>/state/driver.json               {"step": 12}: the last step whose state is saved

Batches are a pure function of (seed, step), so the step is the whole data position.
"""

from __future__ import annotations

import json
import math
import os
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path


@dataclass
class Checkpoint:
    step: int
    valid_reward_mean: float | None
    path: str


def _write_json(path: Path, obj: object) -> None:
    """Atomic: a kill mid-write leaves the previous file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(obj, indent=1))
    os.replace(tmp, path)


class CheckpointDir:
    def __init__(self, run: Path, keep: int = 3):
        self.dir = run / "checkpoints"
        self.state = run / "state"
        self.keep = keep

    def model_dir(self, step: int) -> Path:
        return self.dir / f"step-{step:06d}"

    def index(self) -> list[Checkpoint]:
        path = self.dir / "index.json"
        return [Checkpoint(**c) for c in json.loads(path.read_text())] if path.exists() else []

    def add(self, step: int, valid_reward_mean: float | None) -> list[Checkpoint]:
        """Records the model saved at `model_dir(step)` and deletes all but the best `keep`
        (by valid_reward_mean, later steps first among equals; unvalidated ones rank last)."""
        entries = [c for c in self.index() if c.step != step]
        entries.append(Checkpoint(step, valid_reward_mean, str(self.model_dir(step))))
        reward = lambda c: c.valid_reward_mean if c.valid_reward_mean is not None and math.isfinite(c.valid_reward_mean) else -math.inf
        entries.sort(key=lambda c: (reward(c), c.step), reverse=True)
        kept, dropped = entries[: self.keep], entries[self.keep :]
        self.dir.mkdir(parents=True, exist_ok=True)
        _write_json(self.dir / "index.json", [asdict(c) for c in kept])
        for c in dropped:
            shutil.rmtree(c.path, ignore_errors=True)
        return kept

    def learner_state(self) -> Path:
        return self.state / "learner"

    def save_step(self, step: int) -> None:
        """Marks the learner state just written as that of `step` (written after it, so a kill
        in between resumes from the previous, complete state)."""
        _write_json(self.state / "driver.json", {"step": step})

    def resumable_step(self) -> int | None:
        path = self.state / "driver.json"
        return json.loads(path.read_text())["step"] if path.exists() else None
