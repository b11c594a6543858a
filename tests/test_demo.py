"""The main job's pipeline, shortened (small corpus, few demonstrations, 2 RL steps): the warm
start lowers its loss, agent RFT runs against the real FinQA servers with every rollout accounted
for, and the report, its plots and its summary are written. The full demo's targets are shown by
benchmarks/finqa_demo.py's committed report, not here."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import yaml

from rft_cluster.cli import DEFAULT_JOB
from rft_cluster.demo import DemoSize, run_demo
from rft_cluster.report import PLOT_FILES
from rft_cluster.trajectory_store import TrajectoryStore

SIZE = DemoSize(n_companies=6, years=(2020, 2021), n_train=8, n_valid=4, n_demonstrations=12, sft_epochs=2)
BATCH, GROUP, STEPS = 2, 2, 2


def test_shortened_demo_warm_starts_trains_and_reports(ray_local, tiny_model_dir: Path, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    out = tmp_path / "demo"
    shutil.copytree(tiny_model_dir, out / "tiny-model")  # the session's tiny model: built once per test run
    job = yaml.safe_load(DEFAULT_JOB.read_text())
    job["method"]["reinforcement"]["hyperparameters"].update(batch_size=BATCH, group_size=GROUP, max_steps=STEPS, eval_interval=STEPS)
    job_path = tmp_path / "job.yaml"
    job_path.write_text(yaml.safe_dump(job))

    summary = run_demo(job_path, out, seed=3, size=SIZE)

    # the warm start ran on the demonstrations and lowered its loss
    assert (out / "data" / "sft.jsonl").read_text().count("\n") == SIZE.n_demonstrations
    assert summary["sft"]["last_epoch_loss"] < summary["sft"]["first_epoch_loss"]
    assert (out / "warm-model" / "config.json").exists()

    # every scheduled rollout is in the metrics (one status each) and in Parquet, exactly once
    run = out / "run-seed3"
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [0, 1, 2]
    for r in records:
        statuses = sum(v for k, v in r.items() if "_status/" in k)
        expected = (BATCH * GROUP if r["step"] else 0) + (SIZE.n_valid if "valid_rollouts" in r else 0)
        assert statuses == expected
    stored = TrajectoryStore(run).read()
    assert stored.column("kind").to_pylist().count("train") == STEPS * BATCH * GROUP
    assert stored.column("kind").to_pylist().count("eval") == 2 * SIZE.n_valid  # baseline and final
    assert len(set(stored.column("trace_id").to_pylist())) == stored.num_rows
    assert (run / "final" / "config.json").exists()

    # the report: table, plots, summary
    report = out / "report-seed3"
    text = (report / "report.md").read_text()
    assert "valid reward mean" in text and "tool calls / rollout" in text
    for name in PLOT_FILES:
        assert (report / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and name in text
    saved = json.loads((report / "summary.json").read_text())
    assert saved["seeds"][0]["baseline_step"] == 0 and saved["seeds"][0]["final_step"] == STEPS
    assert saved["wall_time_s"] > 0


def test_gpu_config_is_a_valid_job_for_the_same_environment(monkeypatch, tmp_path: Path) -> None:
    """cluster_configs/finqa-gpu.yaml cannot run here (no GPU); it must still load, use the demo's
    datasets, servers and grader, and put the engine and the learner on a GPU each."""
    from rft_cluster.config import load_job
    from rft_cluster.demo import DemoDirs

    for name, value in (("RFT_DEMO_DIR", str(tmp_path)), ("RFT_DEMO_URL", "http://127.0.0.1:1"), ("RFT_DEMO_TOKEN", "t")):
        monkeypatch.setenv(name, value)
    gpu, local = load_job(DEFAULT_JOB.with_name("finqa-gpu.yaml")), load_job(DEFAULT_JOB)
    assert gpu.model.startswith("Qwen/Qwen3-") and gpu.resolve_path(gpu.model) != DemoDirs(tmp_path).warm_model
    assert (gpu.training_file, gpu.validation_file) == (local.training_file, local.validation_file)
    assert [t.name for t in gpu.rl.tools] == [t.name for t in local.rl.tools] and gpu.rl.grader == local.rl.grader
    assert gpu.rl.max_episode_steps == 10
    assert gpu.cluster.resources.rollout_worker.gpus == 1 and gpu.cluster.resources.learner.gpus == 1


def test_the_demo_job_gets_its_directory_and_servers_without_touching_the_environment(monkeypatch, tmp_path: Path, ledger_env) -> None:
    """The demo names its directory and servers to the job loader; this process's environment
    stays as it was (a job loaded later must not pick them up)."""
    import os

    from rft_cluster.demo import DemoDirs, load_demo_job

    for name in ("RFT_DEMO_DIR", "RFT_DEMO_URL", "RFT_DEMO_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    job = load_demo_job(DEFAULT_JOB, DemoDirs(tmp_path), ledger_env, seed=5)
    assert job.seed == 5 and job.resolve_path(job.model) == DemoDirs(tmp_path).warm_model
    assert {t.server_url for t in job.rl.tools} == {ledger_env.tool_url}
    assert job.rl.tools[0].headers == ledger_env.headers and job.rl.grader.url == ledger_env.grader_url
    assert not {"RFT_DEMO_DIR", "RFT_DEMO_URL", "RFT_DEMO_TOKEN"} & set(os.environ)
