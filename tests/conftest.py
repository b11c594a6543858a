"""Shared pytest fixtures. Expensive things (Ray, models, the vLLM engine) start once per session."""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
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


class DelayedTool:
    """An aiohttp handler that forwards tool calls to `upstream` after `delay_s`: rollouts then
    spend most of their time waiting on tools, so a step lasts long enough to act within it."""

    def __init__(self, upstream: str, delay_s: float):
        self.upstream, self.delay_s = upstream, delay_s

    async def handle(self, request: web.Request) -> web.StreamResponse:
        import asyncio

        import aiohttp

        body = await request.read()
        await asyncio.sleep(self.delay_s)
        async with aiohttp.ClientSession() as session:
            async with session.post(self.upstream, data=body, headers={"Authorization": request.headers["Authorization"]}) as up:
                return web.Response(status=up.status, body=await up.read(), content_type=up.content_type)


@dataclass(frozen=True)
class S3Server:
    """moto's standalone S3 server on 127.0.0.1, with one bucket."""

    port: int
    bucket: str = "rft-test"

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def uri(self, prefix: str) -> str:
        """A pyarrow.fs URI of `prefix` in the bucket, through this server."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def keys(self, prefix: str) -> list[str]:
        """Every object under `prefix`, relative to it (read with boto3, not with our code),
        less the empty `name/` markers pyarrow writes for directories."""
        import boto3

        pages = boto3.client("s3", endpoint_url=self.endpoint_url).get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix + "/")
        keys = (o["Key"] for page in pages for o in page.get("Contents", []))
        return sorted(k.removeprefix(prefix + "/") for k in keys if not k.endswith("/"))


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """A local S3-compatible server on a free port, with dummy credentials in the environment
    (inherited by Ray clusters and subprocesses started later); killed by its PID at the end."""
    import boto3

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        server = S3Server(s.getsockname()[1])
    proc = subprocess.Popen(
        [str(Path(sys.executable).with_name("moto_server")), "-H", "127.0.0.1", "-p", str(server.port)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        with pytest.MonkeyPatch.context() as env:
            for var, value in (("AWS_ACCESS_KEY_ID", "testing"), ("AWS_SECRET_ACCESS_KEY", "testing"), ("AWS_DEFAULT_REGION", "us-east-1")):
                env.setenv(var, value)
            deadline = time.monotonic() + 60
            while True:
                try:
                    boto3.client("s3", endpoint_url=server.endpoint_url).create_bucket(Bucket=server.bucket)
                    break
                except Exception:  # not listening yet
                    assert proc.poll() is None and time.monotonic() < deadline, "moto_server did not start"
                    time.sleep(0.2)
            yield server
    finally:
        proc.kill()
        proc.wait()


@pytest.fixture
def s3_prefix(s3_server: S3Server) -> str:
    """A fresh, empty prefix in the bucket (one per test)."""
    return f"runs/{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class RunLocation:
    """Where a test's run writes (`uri`: what `--output` would be given) and how to see what is
    there without going through our storage code."""

    uri: str
    files: Callable[[], list[str]]  # every file under it, relative, `/`-separated, sorted


@pytest.fixture(params=["local", "s3"])
def run_location(request: pytest.FixtureRequest, tmp_path: Path) -> RunLocation:
    """The same test on a local directory and on S3 (the local server)."""
    if request.param == "local":
        root = tmp_path / "run"
        return RunLocation(str(root), lambda: sorted(p.relative_to(root).as_posix() for p in root.rglob("*") if p.is_file()))
    server: S3Server = request.getfixturevalue("s3_server")
    prefix = request.getfixturevalue("s3_prefix")
    return RunLocation(server.uri(prefix), lambda: server.keys(prefix))


@pytest.fixture(scope="session")
def tiny_model_dir(ledger_data: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model built from the ledger's material (`make-tiny-model --corpus`)."""
    from rft_cluster.tiny_model import make_tiny_model

    def build(out: Path) -> None:
        make_tiny_model(out, corpus=[ledger_data / "train.jsonl", ledger_data / "valid.jsonl", ledger_data / "sft.jsonl"])

    return _built("tiny-model", build, tmp_path_factory, "tiny_model.py", "families.py", "templates/hermes.jinja", "envs/ledger.py")


def _built(name: str, build: Callable[[Path], object], tmp_path_factory: pytest.TempPathFactory, *sources: str) -> Path:
    """`build(dir)` into a fresh temp dir; or, when RFT_TEST_CACHE names a directory (a
    developer's machine, where these models take minutes to build on 2 cores), once per content
    of the `sources` (rft_cluster/ files) that make it, reused by later sessions. CI leaves it unset."""
    cache = os.environ.get("RFT_TEST_CACHE")
    if not cache:
        out = tmp_path_factory.mktemp(name)
        build(out)
        return out
    package = Path(__file__).resolve().parents[1] / "rft_cluster"
    digest = hashlib.sha256(b"".join((package / s).read_bytes() for s in sources)).hexdigest()[:16]
    out = Path(cache) / f"{name}-{digest}"
    if not out.exists():
        staging = tmp_path_factory.mktemp(name)
        build(staging)
        partial = out.with_name(f"{out.name}.{uuid.uuid4().hex}")  # renamed whole: never half there
        shutil.copytree(staging, partial)
        try:
            partial.rename(out)
        except OSError:  # another session got there first
            shutil.rmtree(partial)
    return out


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

    def build(out: Path) -> None:
        sft(str(tiny_model_dir), ledger_data / "sft.jsonl", out, epochs=8, learning_rate=2e-3)

    return _built("warm-model", build, tmp_path_factory, "tiny_model.py", "families.py", "templates/hermes.jinja", "sft.py", "envs/ledger.py", "chat.py", "learner.py")


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
