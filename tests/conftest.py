"""Shared pytest fixtures. Expensive things (Ray, models, the vLLM engine) start once per session."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest
import ray


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
    write_demonstrations(out / "sft.jsonl", seed=0)
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
