"""`train --output s3://...` against the tests' S3 server: every output of the driver and of the
learner is in the bucket and none on the local disk; a run killed with SIGKILL resumes from
what the bucket holds. Both runs are CLI processes with their own Ray, working directory and
TMPDIR, so anything written locally would be found there."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from transformers import AutoModelForCausalLM

from rft_cluster.checkpoints import CheckpointDir
from rft_cluster.storage import RunStorage
from rft_cluster.trajectory_store import TrajectoryStore
from tests.conftest import S3Server
from tests.wandb_log import wandb_history

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # two runs, each with its own engine and learner
STEPS = 4
# Names only a run's outputs have; none may appear on the local disk.
OUTPUT_NAMES = ("trajectories", "checkpoints", "state", "final", "metrics.jsonl", "index.json", "driver.json", "latest")


def local_outputs(root: Path) -> list[str]:
    return sorted(
        str(p) for p in root.rglob("*")
        if p.name in OUTPUT_NAMES or p.name.startswith(("offline-run-", "step-", "rft-")) or p.suffix in (".parquet", ".safetensors", ".wandb")
    )


def stop_group(proc: subprocess.Popen) -> None:
    """Kills what a run started (its process group: the CLI and its local Ray), if any is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)


def test_a_run_on_s3_keeps_every_output_in_the_bucket_and_resumes_from_it(
    demo_job, ledger_env, s3_server: S3Server, s3_prefix: str, tmp_path: Path
) -> None:
    demo_job.rl.hyperparameters.eval_interval = 2  # checkpoints at steps 2 and 4
    job = tmp_path / "job.json"
    job.write_text(demo_job.model_dump_json())
    uri = s3_server.uri(s3_prefix)
    cwd, tmp = tmp_path / "cwd", tmp_path / "tmp"
    cwd.mkdir()
    tmp.mkdir()
    ray_tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Ray's socket paths are length-limited
    env = {**os.environ, "WANDB_SILENT": "true", "TMPDIR": str(tmp), "RAY_TMPDIR": ray_tmp}

    def start(*extra: str) -> subprocess.Popen:
        log = (tmp_path / f"train{'-resume' if extra else ''}.log").open("w")
        return subprocess.Popen(
            [sys.executable, "-m", "rft_cluster.cli", "train", str(job), "--output", uri, "--max-steps", str(STEPS), *extra],
            cwd=cwd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    def logged_steps() -> list[int]:
        keys = s3_server.keys(s3_prefix)
        text = RunStorage(uri).read_text("metrics.jsonl") if "metrics.jsonl" in keys else ""
        return [json.loads(x)["step"] for x in text.splitlines()]

    t0 = time.monotonic()
    first = start()
    try:
        while 3 not in logged_steps():  # step 2's checkpoint is written before step 3 is logged
            assert first.poll() is None, (tmp_path / "train.log").read_text()[-3000:]
            assert time.monotonic() - t0 < 900, "the first run made no progress"
            time.sleep(0.5)
        first.send_signal(signal.SIGKILL)  # the driver only, mid-run
        first.wait()
    finally:
        stop_group(first)  # then its local Ray
    t_first = time.monotonic() - t0
    keys = s3_server.keys(s3_prefix)
    assert CheckpointDir(uri).resumable_step() == 2 and "trajectories/kind=train/step-000003.parquet" in keys
    # The killed run's W&B directory as uploaded at its step-2 checkpoint.
    assert any(k.startswith("wandb/offline-run-") and k.endswith(".wandb") for k in keys)
    killed_staging = {p.name for p in tmp.iterdir() if p.name.startswith("rft-")}
    assert [n for n in killed_staging if n.startswith("rft-wandb-")]  # killed: its W&B staging stays behind

    second = start("--resume")
    try:
        assert second.wait(timeout=900) == 0, (tmp_path / "train-resume.log").read_text()[-3000:]
    finally:
        stop_group(second)
        shutil.rmtree(ray_tmp, ignore_errors=True)
    t_second = time.monotonic() - t0 - t_first
    log = (tmp_path / "train-resume.log").read_text()
    assert "resumed after step 2" in log
    print(f"\n[e2e] killed run {t_first:.0f} s, resumed run {t_second:.0f} s")

    # Every output is in the bucket: Parquet of both kinds, metrics, checkpoints and their index,
    # the learner's state, the final model, both runs' W&B directories.
    keys = s3_server.keys(s3_prefix)
    assert [k for k in keys if k.startswith("trajectories/")] == [
        *(f"trajectories/kind=eval/step-{s:06d}.parquet" for s in (0, 2, 4)),
        *(f"trajectories/kind=train/step-{s:06d}.parquet" for s in range(1, STEPS + 1)),
    ]
    assert logged_steps() == [0, 1, 2, 3, 4]
    store = TrajectoryStore(uri)
    train_rows = store.read("train").to_pylist()
    assert {s: sum(r["step"] == s for r in train_rows) for s in range(1, STEPS + 1)} == {s: 2 * 4 for s in range(1, STEPS + 1)}
    all_ids = [r["trace_id"] for r in store.read().to_pylist()]
    assert len(all_ids) == len(set(all_ids))
    index = CheckpointDir(uri).index()
    assert {c.step for c in index} == {2, 4} and all(c.path.startswith(f"s3://{s3_server.bucket}/{s3_prefix}/checkpoints/") for c in index)
    for step in (2, 4):
        assert {f"checkpoints/step-{step:06d}/config.json", f"checkpoints/step-{step:06d}/model.safetensors"} <= set(keys)
    state = [k for k in keys if k.startswith("state/")]
    assert "state/driver.json" in state and "state/learner/latest" in state
    assert {k.split("/")[2] for k in state if k.startswith("state/learner/step-")} == {"step-4"}  # step 2's state deleted
    assert CheckpointDir(uri).resumable_step() == 4
    wandb_runs = {k.split("/")[1] for k in keys if k.startswith("wandb/offline-run-")}
    # The killed run's and the resumed run's directories, one W&B run id (the one kept beside them).
    assert len(wandb_runs) == 2 and {d.rsplit("-", 1)[1] for d in wandb_runs} == {RunStorage(uri).read_text("wandb/run_id")}
    local = RunStorage(uri).download_dir("", tmp_path / "download")
    [resumed_run] = [d for d in (local / "wandb").glob("offline-run-*") if 4 in wandb_history(d)]
    assert wandb_history(resumed_run)[4]["train_rollouts"] == 8
    model = AutoModelForCausalLM.from_pretrained(local / "final")
    assert model.config.model_type == "qwen2"
    assert [p for p in local.rglob("*") if p.is_file() and ledger_env.token.encode() in p.read_bytes()] == []

    # ... and none on the local disk: not in the working directory, not in TMPDIR (where the
    # learner and W&B stage files before uploading them; the resumed run cleaned up after itself).
    assert list(cwd.iterdir()) == []
    assert {p.name for p in tmp.iterdir() if p.name.startswith("rft-")} == killed_staging
    leftovers = local_outputs(tmp)
    assert all(Path(p).relative_to(tmp).parts[0] in killed_staging for p in leftovers), leftovers
