"""A live multi-node Ray cluster on this machine for tests: `ray start --head --block` plus
worker raylets (`ray start --address ... --block`), every port chosen free, on 127.0.0.1, in
its own RAY_TMPDIR, with token authentication on (its own token).

Each `ray start` runs in a session of its own, so every process it spawns (GCS, raylet,
dashboard, workers, vLLM's engine processes) carries that session id; `stop()` ends exactly
those processes by PID and waits for them, whatever happened to the test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RAY = str(Path(sys.executable).parent / "ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _session_pids(sid: int) -> list[int]:
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    state = f.read().rpartition(")")[2].split()[0]
                if state != "Z" and os.getsid(int(entry)) == sid:  # a zombie has ended already
                    pids.append(int(entry))
            except (OSError, IndexError):  # ended meanwhile
                pass
    return pids


def _signal_sessions(sids: list[int], sig: int) -> None:
    for sid in sids:
        for pid in _session_pids(sid):
            try:
                os.kill(pid, sig)
            except ProcessLookupError:
                pass


class RayCluster:
    """`with RayCluster(env={...}) as c:` — c.dashboard (Jobs API), c.token, c.client_env()."""

    def __init__(self, env: dict[str, str], head_cpus: int = 4, head_args: tuple[str, ...] = (), head_env: dict[str, str] | None = None):
        self.tmp = tempfile.mkdtemp(prefix="rt-", dir="/tmp")  # short: Unix socket paths are limited
        self.token = secrets.token_hex(32)
        self.gcs_port, self.dashboard_port = free_port(), free_port()
        self.dashboard = f"http://127.0.0.1:{self.dashboard_port}"
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("RAY_")},
            **env,
            "PYTHONPATH": str(REPO),
            "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
            "RAY_TMPDIR": self.tmp,
            "RAY_AUTH_MODE": "token",
            "RAY_AUTH_TOKEN": self.token,
        }
        self.head_cpus = head_cpus
        self.head_args = head_args
        self.head_env = head_env or {}
        self.procs: list[subprocess.Popen] = []

    def __enter__(self) -> "RayCluster":
        try:
            self._start(
                "--head", f"--port={self.gcs_port}", f"--num-cpus={self.head_cpus}",
                "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={self.dashboard_port}",
                f"--ray-client-server-port={free_port()}", f"--temp-dir={self.tmp}", *self.head_args,
                env={**self.env, **self.head_env},
            )
            self._wait_for_jobs_api()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def add_node(self, num_cpus: int, resources: dict[str, float] | None = None) -> None:
        # A temp dir of its own: nodes sharing one would share runtime_resources/, where one
        # node's runtime-env agent deletes a job's working_dir while another node's driver runs in it.
        self._start(f"--address=127.0.0.1:{self.gcs_port}", f"--num-cpus={num_cpus}",
                    f"--resources={json.dumps(resources or {})}", f"--temp-dir={self.tmp}/n{len(self.procs)}")

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.gcs_port}"

    def _start(self, *args: str, env: dict[str, str] | None = None) -> None:
        log = open(Path(self.tmp) / f"ray-start-{len(self.procs)}.log", "w")
        ports = [f"--dashboard-agent-listen-port={free_port()}", f"--dashboard-agent-grpc-port={free_port()}",
                 f"--runtime-env-agent-port={free_port()}", f"--metrics-export-port={free_port()}",
                 f"--node-manager-port={free_port()}", f"--object-manager-port={free_port()}"]
        self.procs.append(subprocess.Popen(
            [RAY, "start", "--block", "--node-ip-address=127.0.0.1", "--disable-usage-stats", *ports, *args],
            env=env or self.env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        ))

    def nodes(self) -> list[dict]:
        """Alive nodes from the state API: node_id, resources_total, ..."""
        body = self.get("/api/v0/nodes?limit=100&detail=true")
        return [n for n in json.loads(body)["data"]["result"]["result"] if n["state"] == "ALIVE"]

    def get(self, path: str) -> str:
        req = urllib.request.Request(self.dashboard + path, headers={"Authorization": f"Bearer {self.token}"})
        with urllib.request.urlopen(req, timeout=30) as r:
            return r.read().decode()

    def wait_for_nodes(self, n: int, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while len(self.nodes()) < n:
            if time.monotonic() > deadline:
                raise TimeoutError(f"{n} Ray nodes not alive after {timeout} s; see {self.tmp}/ray-start-*.log")
            time.sleep(1)

    def _wait_for_jobs_api(self, timeout: float = 120) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                self.get("/api/jobs/")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                if time.monotonic() > deadline or any(p.poll() is not None for p in self.procs):
                    raise RuntimeError(f"the Ray head did not come up; see {self.tmp}/ray-start-0.log") from None
                time.sleep(1)

    def client_env(self) -> dict[str, str]:
        """An environment for `rft-cluster submit` against this cluster (its token, no RAY_ADDRESS)."""
        env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_")}
        return {**env, "PYTHONPATH": str(REPO), "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": self.token}

    def stop(self) -> None:
        """SIGTERM to every process of the clusters' sessions (workers first, head last), then
        SIGKILL to what is left after 10 s (`ray start --block` and a raylet outlive SIGTERM);
        waits until all are gone."""
        sids = [p.pid for p in reversed(self.procs)]
        _signal_sessions(sids, signal.SIGTERM)
        deadline = time.monotonic() + 10
        while True:
            for p in self.procs:
                p.poll()  # reaps our own `ray start` processes, which would linger as zombies
            if not any(_session_pids(sid) for sid in sids):
                break
            if time.monotonic() > deadline:
                _signal_sessions(sids, signal.SIGKILL)
            time.sleep(0.5)
        self.procs.clear()
        shutil.rmtree(self.tmp, ignore_errors=True)
