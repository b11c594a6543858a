"""Secrets stay secret wherever they are written: a planted `${VAR}` value, in a URL's query, its
userinfo or a header, reaches no printed line, log record, error text, Parquet file, metrics line
or W&B file, including where aiohttp's error text quotes the whole URL."""

from __future__ import annotations

import json
import logging
import os
import pickle
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiohttp import web

from rft_cluster import trajectory_store
from rft_cluster.config import load_job
from rft_cluster.driver import failed_rollout
from rft_cluster.metrics import RunLogger
from rft_cluster.redact import Redactor, redact_logs
from rft_cluster.serving import ThreadedServer
from rft_cluster.trajectory_store import TrajectoryStore
from rft_cluster.types import RolloutRequest, RolloutStatus, ToolCallStatus, ToolResult, Trajectory

PLANTED = "planted-Secret/9f+x 7"  # with characters a URL quotes, so its encoded forms matter
PLANTED_FORMS = [PLANTED, "planted-Secret/9f+x%207", "planted-Secret%2F9f%2Bx%207", "planted-Secret%2F9f%2Bx+7"]
# A URL may not hold a raw space (`validate` refuses it), so what travels in URLs has none.
URL_PLANTED = "planted-UrlSecret/9f+x=7"
URL_PLANTED_FORMS = [URL_PLANTED, "planted-UrlSecret%2F9f%2Bx%3D7", "planted-UrlSecret/9f%2Bx%3D7"]
USERINFO_PASS = "userinfo-pass-41c7"


def leaks(text: str | bytes) -> list[str]:
    data = text.encode() if isinstance(text, str) else text
    return [f for f in [*PLANTED_FORMS, *URL_PLANTED_FORMS, USERINFO_PASS] if f.encode() in data]


# ---------------------------------------------------------------- the redactor itself


def test_redactor_hides_each_value_its_encoded_forms_and_url_userinfo() -> None:
    r = Redactor({"KEY": PLANTED, "SHORT": "ab", "URL": "http://127.0.0.1:8000"})
    text = (
        f"url='http://127.0.0.1:8000/t?key={PLANTED_FORMS[2]}' raw {PLANTED} quoted {PLANTED_FORMS[1]} "
        f"plus {PLANTED_FORMS[3]} and https://bob:{USERINFO_PASS}@host:1/x, ab stays"
    )
    out = r.text(text)
    assert leaks(out) == []
    assert out.count("${KEY}") == 4 and "url='${URL}/t?key=${KEY}'" in out
    assert "https://***@host:1/x" in out and "ab stays" in out  # a short value is not a secret
    # A JSON dump of a structure holding the value (escaped quotes, backslashes) is clean too.
    tricky = Redactor({"T": 'a"b\\c-long'})
    assert tricky.text(json.dumps({"v": 'x a"b\\c-long y'})) == '{"v": "x ${T} y"}'


def test_redactor_copies_structures_hiding_header_values_and_travels_by_pickle() -> None:
    config = {
        "headers": {"Authorization": "Bearer top"},
        "tools": [{"name": "search", "server_url": f"http://h/?k={PLANTED}", "headers": {"X-Key": "k1"}}, ("t", 1)],
        "grader": {"type": "endpoint", "headers": "Bearer raw-string"},
        "ids": [1, 2, 3],
    }
    r = pickle.loads(pickle.dumps(Redactor({"KEY": PLANTED})))
    out = r(config)
    assert out["headers"] == {"Authorization": "<redacted>"}
    assert out["tools"] == [{"name": "search", "server_url": "http://h/?k=${KEY}", "headers": {"X-Key": "<redacted>"}}, ["t", 1]]
    assert out["grader"]["headers"] == "<redacted>" and out["ids"] == [1, 2, 3]
    assert config["headers"]["Authorization"] == "Bearer top"  # the input is not modified
    assert PLANTED not in repr(r)


def test_clip_never_shows_part_of_a_secret_however_the_text_shrinks_or_runs_on() -> None:
    long = "S" * 30 + "x" * 970  # replaced by 4 characters: a text of copies shrinks 250-fold
    r = Redactor({"T": long})
    for copies in (3, 50, 5000):
        for shift in (0, 7, 499):
            out = r.clip("e" * shift + long * copies, 500)
            assert "SSSS" not in out and len(out) <= 501, (copies, shift)
    assert r.clip(long * 50, 500) == "${T}" * 50  # all of it fits once redacted: nothing is cut
    # A URL whose userinfo reaches past the part first looked at.
    out = Redactor().clip("https://u:" + "p" * 9000 + "@host/ " + "z" * 10_000, 500)
    assert out.startswith("https://***@host/ zz") and "pppp" not in out and len(out) == 501


def test_redacting_is_linear_in_the_text() -> None:
    # `a.a.a.…` once made the URL-userinfo pattern backtrack at each `.`: 80 KB took 15 s.
    started = time.process_time()
    out = Redactor({"KEY": PLANTED}).text("a." * 500_000 + f" https://bob:{USERINFO_PASS}@h/")
    assert time.process_time() - started < 5  # ~0.1 s alone
    assert out.endswith(" https://***@h/")


def test_a_failed_rollout_and_a_record_that_cannot_be_stored_redact_their_error_before_the_cut(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Both cut the exception's text at 500 characters; the planted value starts 10 before."""
    redactor = Redactor({"RFT_T_KEY": PLANTED})
    request = RolloutRequest("trace_1", "p", "g", 1, [{"role": "user", "content": "hi"}], [], {})
    failed = failed_rollout(request, "returning the rollout", RuntimeError("e" * 490 + PLANTED), redactor)
    assert failed.error == "returning the rollout: RuntimeError: " + "e" * 490 + "${RFT_T_KE…"

    real_row = trajectory_store._row

    def unstorable(t: Trajectory) -> dict:  # the record cannot be converted; its stub (no tokens) can
        if t.token_ids:
            raise ValueError("e" * 490 + PLANTED)
        return real_row(t)

    monkeypatch.setattr(trajectory_store, "_row", unstorable)
    store = TrajectoryStore(tmp_path / "run", redactor)
    store.append([trajectory("out", "err")])
    [row] = store.read().to_pylist()
    assert row["status"] == "internal_error"
    assert row["error"] == "storing the rollout: ValueError: " + "e" * 490 + "${RFT_T_KE…"


def test_load_job_records_every_expanded_variable(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("RFT_T_KEY", URL_PLANTED)
    monkeypatch.setenv("RFT_T_PASS", USERINFO_PASS)
    job = write_job(tmp_path, {"q": "http://127.0.0.1:9/t?key=${RFT_T_KEY}"}, grader_url="http://u:${RFT_T_PASS}@127.0.0.1:9/g")
    assert load_job(job).redactor.secrets == {"RFT_T_KEY": URL_PLANTED, "RFT_T_PASS": USERINFO_PASS}


def test_log_records_are_redacted_whatever_the_logger(caplog: pytest.LogCaptureFixture) -> None:
    redact_logs(Redactor({"KEY": PLANTED}))
    try:
        with caplog.at_level(logging.WARNING):
            logging.getLogger("aiohttp.client").warning("GET %s failed", f"http://h/?k={PLANTED}")
            try:
                raise ValueError(f"boom {PLANTED}")
            except ValueError:
                logging.getLogger("rft_cluster.x").exception("failed")
        assert leaks(caplog.text) == [] and "http://h/?k=${KEY}" in caplog.text and "boom ${KEY}" in caplog.text
    finally:
        redact_logs(Redactor())


# ---------------------------------------------------------------- tool-run and grader-run


def write_job(tmp: Path, tools: dict[str, str], grader_url: str) -> Path:
    (tmp / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": 1}) + "\n")
    job = tmp / "job.yaml"
    job.write_text(json.dumps({
        "model": "some/model", "training_file": "train.jsonl",
        "method": {"type": "reinforcement", "reinforcement": {
            # aiohttp refuses an Authorization header beside URL credentials: those tools get none.
            "tools": [{"name": name, "server_url": url, "headers": {} if "@" in url else {"Authorization": "Bearer ${RFT_T_KEY}"}}
                      for name, url in tools.items()],
            "grader": {"type": "endpoint", "url": grader_url},
            "tool_settings": {"max_retries": 1, "backoff_s": 0.01, "timeout_s": 5},
        }},
    }))
    return job


@pytest.fixture(scope="module")
def servers() -> Iterator[dict[str, str]]:
    """`echo`: a 404 whose body quotes the request's path and query; `fail`: 500 always;
    `garbage`: an invalid HTTP status line, so aiohttp's error text quotes the whole URL."""

    async def echo(request: web.Request) -> web.Response:
        return web.Response(status=404, text=f"no such page: {request.path_qs}")

    async def fail(request: web.Request) -> web.Response:
        return web.Response(status=500, text="down")

    app = web.Application()
    app.router.add_post("/echo", echo)
    app.router.add_post("/fail", fail)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    sock.listen()

    def garbage() -> None:
        while True:
            try:
                conn, _ = sock.accept()
            except OSError:  # closed: the module is done
                return
            conn.recv(65536)
            conn.sendall(b"HTTP/1.1 2x0 NOPE\r\n\r\n")
            conn.close()

    threading.Thread(target=garbage, daemon=True).start()
    with ThreadedServer(app) as server:
        yield {"echo": f"{server.url}/echo", "fail": f"{server.url}/fail", "garbage": f"http://127.0.0.1:{sock.getsockname()[1]}/g"}
    sock.close()


def cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rft_cluster.cli", *args], env={**os.environ, **env},
                          capture_output=True, text=True, timeout=120)


SECRET_ENV = {"RFT_T_KEY": URL_PLANTED, "RFT_T_PASS": USERINFO_PASS}


def test_tool_run_prints_no_secret_on_any_path(tmp_path: Path, servers: dict[str, str]) -> None:
    """Each path puts the secret somewhere else: the printed request URL and a 4xx body that
    quotes the query (echo), the retry log's URL (fail, unreachable: userinfo), aiohttp's error
    text quoting the URL (garbage); the model's observation is printed last."""
    key = "key=${RFT_T_KEY}"
    tools = {
        "echo": f"{servers['echo']}?{key}",
        "fail": servers["fail"].replace("http://", "http://bob:${RFT_T_PASS}@") + f"?{key}",
        "garbage": f"{servers['garbage']}?{key}",
        "unreachable": "http://bob:${RFT_T_PASS}@127.0.0.1:1/t?" + key,
    }
    job = write_job(tmp_path, tools, grader_url=servers["fail"])
    seen = {}
    for name in tools:
        run = cli("tool-run", str(job), "--tool", name, "--arguments", "{}", env=SECRET_ENV)
        assert run.returncode == 1, run.stderr
        seen[name] = run.stdout + run.stderr
        assert leaks(seen[name]) == [], (name, seen[name])
    # The paths did run, and what stands in for the secret says which variable it was.
    assert "no such page: /echo?key=${RFT_T_KEY}" in seen["echo"]
    assert "attempt 1 failed (HTTP 500)" in seen["fail"] and "http://***@127.0.0.1" in seen["fail"]
    assert "ClientResponseError" in seen["garbage"] and "/g?key=${RFT_T_KEY}" in seen["garbage"]
    assert "attempt 1 failed" in seen["unreachable"] and "http://***@127.0.0.1:1/t" in seen["unreachable"]


def test_grader_run_prints_no_secret_on_error_paths(tmp_path: Path, servers: dict[str, str]) -> None:
    for url in (f"{servers['garbage']}?key=${{RFT_T_KEY}}", "http://bob:${RFT_T_PASS}@127.0.0.1:1/g?key=${RFT_T_KEY}"):
        job = write_job(tmp_path, {}, grader_url=url)
        run = cli("grader-run", str(job), "--output-text", "1", env=SECRET_ENV)
        assert run.returncode == 1 and "grader_failed" in run.stdout, run.stdout + run.stderr
        assert leaks(run.stdout + run.stderr) == []


# ---------------------------------------------------------------- files a run writes


def trajectory(output: str, error: str) -> Trajectory:
    call = ToolResult("c1", "search", "{}", output, ToolCallStatus.SERVER_ERROR, http_status=500, latency_s=0.1, attempts=2)
    return Trajectory(
        trace_id="trace_1", prompt_id="p", group_id="g", step=1, token_ids=[1, 2], loss_mask=[0, 1], logprobs=[0.0, -0.5],
        weight_versions=[-1, 0], prompt_len=1, output_text=f"said {PLANTED}", tool_calls=[call],
        status=RolloutStatus.TOOL_FAILED, error=error, grader_error=f"HTTP 500 at http://bob:{USERINFO_PASS}@h/",
    )


@pytest.mark.usefixtures("offline_wandb")
def test_parquet_metrics_and_wandb_files_hold_no_secret(tmp_path: Path) -> None:
    redactor = Redactor({**SECRET_ENV, "RFT_T_KEY": PLANTED})  # no URL is validated here: a space may travel
    run = tmp_path / "run"
    text = f"ClientResponseError: 400, url='http://h/t?key={PLANTED_FORMS[2]}'"
    store = TrajectoryStore(run, redactor)
    store.append([trajectory(text, f"tool failed: {text}")])
    config = {"tools": [{"server_url": f"http://bob:{USERINFO_PASS}@h/t?key={PLANTED}", "headers": {"A": "literal-token"}}]}
    logger = RunLogger(run, "job", config, redactor=redactor)
    logger.log(1, {"train_reward_mean": 0.5}, nodes={"grader": [f"node-{PLANTED}"]})
    logger.finish()

    leaked = {str(p.relative_to(run)): leaks(p.read_bytes()) for p in run.rglob("*") if p.is_file()}
    assert any(name.endswith(".parquet") for name in leaked) and any(name.endswith(".wandb") for name in leaked)
    assert {k: v for k, v in leaked.items() if v} == {}
    assert not [p for p in run.rglob("*") if p.is_file() and b"literal-token" in p.read_bytes()]
    [row] = store.read().to_pylist()
    assert row["tool_calls"][0]["output"] == "ClientResponseError: 400, url='http://h/t?key=${RFT_T_KEY}'"
    assert row["output_text"] == "said ${RFT_T_KEY}" and row["token_ids"] == [1, 2]


@pytest.fixture
def offline_wandb(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.setenv("WANDB_MODE", "offline")
    for var in ("WANDB_CONFIG_DIR", "WANDB_CACHE_DIR", "WANDB_DATA_DIR"):
        monkeypatch.setenv(var, str(tmp_path / "wandb-home"))


# ---------------------------------------------------------------- in the Ray actors


@pytest.mark.usefixtures("ray_local")
def test_proxy_and_grader_actors_redact_observations_errors_and_their_logs(servers: dict[str, str]) -> None:
    """The job's redactor travels to the actors: what a tool proxy returns (the model's
    observation), a grader's error and the actors' own retry log lines hold no secret."""
    import ray

    from rft_cluster.config import EndpointGrader, ToolSettings, ToolSpec
    from rft_cluster.grader_actor import GraderActor
    from rft_cluster.tool_proxy import ToolProxy

    redactor = Redactor(SECRET_ENV)
    settings = ToolSettings(max_retries=1, backoff_s=0.01, timeout_s=5)
    userinfo = f"http://bob:{USERINFO_PASS}@"
    tools = [ToolSpec(name="garbage", server_url=f"{servers['garbage']}?key={URL_PLANTED}"),
             ToolSpec(name="fail", server_url=servers["fail"].replace("http://", userinfo) + f"?key={URL_PLANTED}")]
    proxy = ray.remote(ToolProxy).options(num_cpus=0).remote(tools, settings, redactor)
    grader = ray.remote(GraderActor).options(num_cpus=0).remote(
        EndpointGrader(type="endpoint", url=servers["fail"].replace("http://", userinfo)), settings, redactor)
    try:
        calls = [(name, "{}", f"call_{name}", "trace_1", {}) for name in ("garbage", "fail")]
        garbage, fail = ray.get(proxy.call_batch.remote(calls))
        graded = ray.get(grader.grade.remote({"output_text": "1"}, {}, "trace_1"))
    finally:
        ray.get([proxy.close.remote(), grader.close.remote()])
        ray.kill(proxy)
        ray.kill(grader)
    assert "ClientResponseError" in garbage.output and "/g?key=${RFT_T_KEY}" in garbage.output
    assert fail.status is ToolCallStatus.SERVER_ERROR and graded.score is None
    assert leaks(garbage.output + fail.output + (graded.error or "")) == []
    logs = Path(ray._private.worker._global_node.get_logs_dir_path())
    texts = [p.read_bytes() for p in logs.glob("worker-*") if p.is_file()]
    assert any(b"attempt 1 failed (HTTP 500)" in t and b"http://***@127.0.0.1" in t for t in texts)
    assert [leaks(t) for t in texts if leaks(t)] == []


# ---------------------------------------------------------------- a whole run


@pytest.mark.slow
def test_a_training_run_writes_and_prints_no_planted_secret(ray_local, demo_job, trace_grader: str, ledger_env, tmp_path: Path,
                                                            capfd: pytest.CaptureFixture) -> None:
    """The ledger token (a `${VAR}`) is also in the tool's query string and the grader's URL
    userinfo; the tool server answers some calls with a 404 quoting its query, and some with a
    500 (retried, logged). Nothing the run writes or prints holds the token."""
    from tests.conftest import DelayedTool

    from rft_cluster.driver import train

    secret = ledger_env.token
    forward, calls = DelayedTool(f"{ledger_env.base_url}/tool", 0.0), [0]

    async def flaky(request: web.Request) -> web.StreamResponse:
        calls[0] += 1
        if calls[0] % 3 == 1:
            return web.Response(status=404, text=f"no such page: {request.path_qs}")
        if calls[0] % 3 == 2:
            return web.Response(status=500, text="down")  # retried: the next attempt is forwarded
        return await forward.handle(request)

    app = web.Application()
    app.router.add_post("/tool", flaky)
    with ThreadedServer(app) as server:
        rl = demo_job.rl
        rl.tools[0].server_url = f"{server.url}/tool?key={secret}"
        rl.grader.url = trace_grader.replace("http://", f"http://bob:{secret}@")
        rl.tool_settings.backoff_s = 0.05
        out = tmp_path / "run"
        train(demo_job, out, max_steps=1)

    printed = capfd.readouterr()
    assert calls[0] > 2, "the warm-started policy should call the tool"
    rows = TrajectoryStore(out).read().to_pylist()
    outputs = [c["output"] for r in rows for c in r["tool_calls"]]
    assert any("no such page: /tool?key=${RFT_DEMO_TOKEN}" in o for o in outputs)  # the model saw the 404, redacted
    files = [p for p in out.rglob("*") if p.is_file()]
    assert any(p.suffix == ".wandb" for p in files) and any(p.suffix == ".parquet" for p in files)
    assert [str(p.relative_to(out)) for p in files if secret.encode() in p.read_bytes()] == []
    assert secret not in printed.out + printed.err


def test_submit_leaves_the_expanded_storage_out_of_the_job_list(tmp_path: Path, ledger_data: Path) -> None:
    """A job's `storage` may hold a credential (`s3://key:${VAR}@...`, set where submit runs): the
    entrypoint, which anyone who can read the cluster's job list sees, does not carry it. (RFT_T_PASS:
    a URI carries RFT_T_KEY's `/` only percent-encoded, else validate refuses the storage.)"""
    from tests.ray_cluster import RayCluster
    from tests.test_submit import ledger_job

    job = ledger_job(tmp_path / "job.yaml", ledger_data, storage="s3://rft:${RFT_T_PASS}@rft-test/run")
    with RayCluster(env={}, head_cpus=1) as cluster:
        run = cli("submit", str(job), "--address", cluster.dashboard, env={**cluster.client_env(), **SECRET_ENV})
        assert run.returncode == 0, run.stderr
        submission_id = run.stdout.splitlines()[0]
        info, listing = cluster.get(f"/api/jobs/{submission_id}"), cluster.get("/api/jobs/")
        cli("stop", submission_id, "--address", cluster.dashboard, env=cluster.client_env())
    assert json.loads(info)["entrypoint"] == "python -m rft_cluster.cli train job.yaml"
    assert leaks(info + listing + run.stdout + run.stderr) == []
