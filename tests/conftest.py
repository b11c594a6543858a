"""Shared pytest fixtures. Expensive things (Ray, models, the vLLM engine) start once per session."""

from __future__ import annotations

import hashlib
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest
import ray
from aiohttp import web

# The ledger job: the small environment the end-to-end, fault and resume tests train on.
LEDGER_JOB = Path(__file__).resolve().parents[1] / "cluster_configs" / "ledger.yaml"


@pytest.fixture(scope="session")
def ray_local() -> Iterator[None]:
    """One local Ray cluster for the whole session. Logical CPUs exceed the 2 real cores so the
    shared engine actor and an end-to-end run's actors can coexist (they take turns working)."""
    ray.init(num_cpus=6, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from rft_cluster.tiny_model import make_tiny_model

    return make_tiny_model(tmp_path_factory.mktemp("tiny-model"))


@pytest.fixture(scope="session")
def ledger_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Ledger datasets and demonstrations (seed 0: the same table LedgerServers(seed=0) serves)."""
    from rft_cluster.envs.ledger import write_datasets, write_demonstrations

    out = tmp_path_factory.mktemp("ledger-data")
    write_datasets(out, seed=0)
    write_demonstrations(out / "sft.jsonl", seed=0, n=64)
    return out


@pytest.fixture(scope="session")
def warm_model_dir(tiny_model_dir: Path, ledger_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model warm-started on ledger demonstrations, so rollouts really call tools."""
    from rft_cluster.sft import sft

    out = tmp_path_factory.mktemp("warm-model")
    sft(str(tiny_model_dir), ledger_data / "sft.jsonl", out, epochs=8, learning_rate=2e-3)
    return out


@pytest.fixture(scope="session")
def ledger_env() -> Iterator[object]:
    from rft_cluster.envs.ledger import LedgerServers

    with LedgerServers(seed=0) as env:
        yield env


@pytest.fixture(scope="session")
def rollout_worker(ray_local: None, warm_model_dir: Path, ledger_env) -> Iterator[object]:
    """One real vLLM engine (a RolloutWorker actor with a ToolProxy) shared by the session:
    an engine takes ~35 s to start here."""
    from rft_cluster.config import EngineSpec, ToolSettings
    from rft_cluster.rollout_worker import RolloutWorker
    from rft_cluster.tool_proxy import ToolProxy

    proxy = ray.remote(num_cpus=0)(ToolProxy).remote(ledger_env.tool_specs(), ToolSettings())
    worker = ray.remote(num_cpus=1)(RolloutWorker).remote(
        str(warm_model_dir), EngineSpec(dtype="float32", max_model_len=2048), 0, [proxy]
    )
    ray.get(worker.start.remote())
    yield worker
    ray.get(worker.shutdown.remote())


def trace_score(trace_id: str) -> float:
    """A reward that is a pure function of the trace id: distinct rollouts get distinct rewards,
    so every group carries a learning signal whatever the tiny policy does."""
    return int(hashlib.sha256(trace_id.encode()).hexdigest()[:8], 16) / 2**32


@pytest.fixture
def trace_grader() -> Iterator[str]:
    """An endpoint grader on 127.0.0.1 that scores by trace_id."""
    from rft_cluster.serving import ThreadedServer

    async def grade(request: web.Request) -> web.Response:
        return web.json_response({"score": trace_score((await request.json())["trace_id"])})

    app = web.Application()
    app.router.add_post("/grade", grade)
    with ThreadedServer(app) as server:
        yield f"{server.url}/grade"


@pytest.fixture
def demo_job(tmp_path: Path, warm_model_dir: Path, ledger_data: Path, ledger_env, trace_grader: str, monkeypatch: pytest.MonkeyPatch):
    """The ledger job file as shipped, pointed at this session's model, data and servers, with
    the trace-id grader in place of the ledger's (whose 0/1 answers give the untrained tiny
    policy no signal, so the learner would have nothing to do)."""
    shutil.copytree(warm_model_dir, tmp_path / "warm-model")
    shutil.copytree(ledger_data, tmp_path / "data")
    monkeypatch.setenv("RFT_DEMO_DIR", str(tmp_path))
    monkeypatch.setenv("RFT_DEMO_URL", ledger_env.base_url)
    monkeypatch.setenv("RFT_DEMO_TOKEN", ledger_env.token)
    monkeypatch.setenv("WANDB_SILENT", "true")
    from rft_cluster.config import EndpointGrader, load_job

    job = load_job(LEDGER_JOB)
    job.rl.hyperparameters.batch_size = 2  # 2 prompts x 4 rollouts per step keeps the test short
    job.rl.grader = EndpointGrader(type="endpoint", name="by-trace", url=trace_grader)
    return job
