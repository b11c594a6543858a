"""Kill the driver with SIGKILL mid-run, resume it, and account for every trajectory once."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from rft_cluster.checkpoints import CheckpointDir
from rft_cluster.trajectory_store import TrajectoryStore

pytestmark = pytest.mark.slow
STEPS = 4


def start_train(job: Path, out: Path, *extra: str) -> subprocess.Popen:
    log = (out.parent / f"train{'-resume' if extra else ''}.log").open("w")
    return subprocess.Popen(
        [sys.executable, "-m", "rft_cluster.cli", "train", str(job), "--output", str(out), "--max-steps", str(STEPS), *extra],
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env={**os.environ, "WANDB_SILENT": "true"},
    )


def logged_steps(out: Path) -> list[int]:
    path = out / "metrics.jsonl"
    return [json.loads(x)["step"] for x in path.read_text().splitlines()] if path.exists() else []


def test_sigkill_then_resume_finishes_with_every_rollout_stored_once(demo_job, ledger_env, tmp_path: Path) -> None:
    demo_job.rl.hyperparameters.eval_interval = 2  # checkpoints at steps 2 and 4
    job = tmp_path / "job.json"
    job.write_text(demo_job.model_dump_json())
    out = tmp_path / "run"

    first = start_train(job, out)
    try:
        deadline = time.monotonic() + 600
        while 3 not in logged_steps(out):  # step 2's checkpoint is written before step 3 starts
            assert first.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the first run made no progress"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)  # the driver only, mid-run
        first.wait()
    finally:
        os.killpg(first.pid, signal.SIGKILL)  # then whatever it had started (local Ray)
    assert CheckpointDir(out).resumable_step() == 2

    second = start_train(job, out, "--resume")
    assert second.wait(timeout=900) == 0, (tmp_path / "train-resume.log").read_text()[-3000:]
    assert "resumed after step 2" in (tmp_path / "train-resume.log").read_text()

    assert logged_steps(out) == [0, 1, 2, 3, 4]
    store = TrajectoryStore(out)
    train_rows = store.read("train").to_pylist()
    per_step = {s: sum(r["step"] == s for r in train_rows) for s in range(1, STEPS + 1)}
    assert per_step == {s: 2 * 4 for s in range(1, STEPS + 1)}  # batch 2 x group 4, each step once
    all_ids = [r["trace_id"] for r in store.read().to_pylist()]
    assert len(all_ids) == len(set(all_ids))
    index = CheckpointDir(out).index()
    assert {c.step for c in index} == {2, 4} and all(Path(c.path, "config.json").exists() for c in index)
    assert (out / "final" / "model.safetensors").exists()

    # The bearer token (a header value of the job) is in no file either run wrote, logs included.
    written = [tmp_path / "train.log", tmp_path / "train-resume.log", *(p for p in out.rglob("*") if p.is_file())]
    assert [p for p in written if ledger_env.token.encode() in p.read_bytes()] == []
