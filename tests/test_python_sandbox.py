"""The python grader's sandbox: every escape found against the bare child process, tried from a
grader, must fail. Graders here return 1.0 when an attempt got through and 0.0 when none did, so
a grade that merely crashed (score None) never passes for a sandbox that held."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from rft_cluster.graders.sandbox import UNSANDBOXED_ENV
from tests.test_graders_builtin import grade, python

REPO = Path(__file__).resolve().parent.parent
SECRET = "s3cret-" + uuid.uuid4().hex
# Run as the parent of a grader in a process of its own, so that its environment at start (what
# /proc/PID/environ shows) holds the planted secret and a successful kill would be seen. It grades
# `times` times at once (1 unless given); "score" and "error" are the first grade's. The peak is
# VmHWM, this address space's own: ru_maxrss survives exec, so it would report the peak of a
# large pytest process that forked this one.
GRADE_IN_A_PROCESS = """
import asyncio, json, re, sys
from rft_cluster.config import PythonGrader
from rft_cluster.graders.python import Python
spec = json.loads(sys.argv[1])
item, times = spec.pop("item"), spec.pop("times", 1)
async def grades():
    grader = Python(PythonGrader(**spec))
    return await asyncio.gather(*(grader.grade({"output_text": "42"}, item, "trace") for _ in range(times)))
results = asyncio.run(grades())
print(json.dumps({"score": results[0].score, "error": results[0].error, "errors": [r.error for r in results],
                  "maxrss_mb": int(re.search(r"VmHWM:\\s+(\\d+) kB", open("/proc/self/status").read())[1]) // 1024}))
"""
# The user-namespace path is tried as well: what a non-root user gets (from `unshare -r`, root of a
# user namespace mapping one uid), and root's fallback where it lacks CAP_SYS_ADMIN.
NO_SYS_ADMIN = ["setpriv", "--inh-caps=-sys_admin", "--bounding-set=-sys_admin"]
MODES = {"host": [], "user-namespace": ["unshare", "-r"], "root-without-sys-admin": NO_SYS_ADMIN}


@pytest.fixture(autouse=True)
def sandboxed(monkeypatch: pytest.MonkeyPatch) -> None:
    """These graders attack the host (one sends SIGKILL to -1): never run them unsandboxed."""
    monkeypatch.delenv(UNSANDBOXED_ENV, raising=False)


def grader(body: str) -> str:
    return "import ctypes, os, signal, socket, subprocess, sys\ndef grade(sample, item):\n" + textwrap.indent(textwrap.dedent(body), "    ")


def grade_in_a_process(source: str, item: dict[str, Any], mode: str = "host", **spec: Any) -> tuple[dict[str, Any], subprocess.CompletedProcess]:
    env = {**os.environ, "PYTHONPATH": str(REPO), "RFT_PLANTED_SECRET": SECRET}
    arg = json.dumps({"type": "python", "name": "py", "source": source, "item": item, **spec})
    command = [*MODES[mode], sys.executable, "-c", GRADE_IN_A_PROCESS, arg]
    # A session of its own: the kill test's process-group kill must not reach pytest.
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120, start_new_session=True)
    assert done.returncode == 0, f"the grader's parent died ({done.returncode}): {done.stderr[-2000:]}"
    return json.loads(done.stdout.splitlines()[-1]), done


def processes_with(marker: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            if entry.name.isdigit() and marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:  # exited meanwhile
            pass
    return found


@pytest.mark.parametrize("mode", MODES)
def test_parent_environment_is_out_of_reach(mode: str) -> None:
    source = grader(f"""
        seen = repr(dict(os.environ))
        for path in [f"/proc/{{os.getppid()}}/environ", f"/proc/{{item['parent']}}/environ",
                     *(f"/proc/{{p}}/environ" for p in os.listdir("/proc") if p.isdigit())]:
            try:
                seen += open(path, "rb").read().decode(errors="replace")
            except OSError:
                pass
        seen += subprocess.run(f"cat /proc/*/environ /proc/{{item['parent']}}/environ", shell=True, capture_output=True).stdout.decode(errors="replace")
        return float({SECRET!r} in seen)
    """)
    result, done = grade_in_a_process(source, {"parent": os.getpid()}, mode)
    assert (result["score"], result["error"]) == (0.0, None)
    assert SECRET not in done.stdout + done.stderr


@pytest.mark.parametrize("mode", MODES)
def test_host_files_cannot_be_read(tmp_path: Path, mode: str) -> None:
    job = tmp_path / "job.yaml"
    job.write_text(f"grader: {{token: {SECRET}}}\n")
    job.chmod(0o600)
    beside_the_code = REPO / f".planted-{uuid.uuid4().hex}"
    beside_the_code.write_text(SECRET)
    try:
        source = grader(f"""
            seen = ""
            for path in (item["job"], "/proc/1/root" + item["job"], item["repo_file"], "/proc/1/root" + item["repo_file"]):
                try:
                    seen += open(path).read()
                except OSError:
                    pass
            seen += subprocess.run(["cat", item["job"], item["repo_file"]], capture_output=True).stdout.decode()
            return float({SECRET!r} in seen)
        """)
        result, _ = grade_in_a_process(source, {"job": str(job), "repo_file": str(beside_the_code)}, mode)
    finally:
        beside_the_code.unlink()
    assert (result["score"], result["error"]) == (0.0, None)


async def test_host_files_cannot_be_written(tmp_path: Path) -> None:
    name = f"pwned-{uuid.uuid4().hex}"
    site_packages = Path(next(p for p in sys.path if p.endswith("site-packages")))
    targets = [tmp_path / name, Path("/tmp") / name, site_packages / f"{name}.pth", REPO / name]
    source = grader("""
        written = 0
        for path in item["targets"]:
            try:
                open(path, "w").write("import os")
                written += 1
            except OSError:
                pass
            os.system(f"echo pwned > {path}.sh 2>/dev/null")
        return float(written)
    """)
    result = await grade(python(source), item={"targets": [str(t) for t in targets]})
    # /tmp in the sandbox is its own: a write there succeeds and stays there.
    assert (result.score, result.error) == (1.0, None)
    written_on_the_host = [path for target in targets for path in (target, Path(f"{target}.sh")) if path.exists()]
    assert written_on_the_host == []


def accept_into(listener: socket.socket, accepted: list[object]) -> None:
    try:
        accepted.append(listener.accept())
    except OSError:  # closed at the end of the test
        pass


async def test_the_network_is_unreachable_by_any_route() -> None:
    abstract = f"\0rft-test-{uuid.uuid4().hex}"
    accepted: list[object] = []
    with socket.create_server(("127.0.0.1", 0)) as tcp, socket.socket(socket.AF_UNIX) as unix:
        unix.bind(abstract)
        unix.listen()
        for listener in (tcp, unix):
            threading.Thread(target=accept_into, args=(listener, accepted), daemon=True).start()
        port = tcp.getsockname()[1]
        source = grader(f"""
            import _socket, struct
            attempts = [
                lambda: socket.socket.__mro__[2](socket.AF_INET, socket.SOCK_STREAM).connect(("127.0.0.1", {port})),
                lambda: _socket.socket(socket.AF_UNIX, socket.SOCK_STREAM).connect({abstract!r}),
                lambda: subprocess.run([sys.executable, "-c", "import socket; socket.create_connection(('127.0.0.1', {port}), 2)"], check=True),
            ]
            def with_ctypes():
                libc = ctypes.CDLL(None, use_errno=True)
                fd = libc.socket(2, 1, 0)
                address = struct.pack("=H", 2) + struct.pack("!H", {port}) + bytes([127, 0, 0, 1]) + bytes(8)  # sockaddr_in
                if libc.connect(fd, address, len(address)) != 0:
                    raise OSError(ctypes.get_errno(), "connect")
            attempts.append(with_ctypes)
            connected = 0
            for attempt in attempts:
                try:
                    attempt()
                    connected += 1
                except (OSError, subprocess.CalledProcessError):
                    pass
            return float(connected)
        """)
        result = await grade(python(source))
    assert (result.score, result.error, accepted) == (0.0, None, [])


async def test_no_process_outlives_the_grade() -> None:
    marker = f"rft-marker-{uuid.uuid4().hex}"
    source = grader(f"""
        sleep = [sys.executable, "-c", "import time; time.sleep(60)", {marker!r}]
        subprocess.Popen(sleep, start_new_session=True, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        os.system("setsid nohup " + " ".join(sleep[:2]) + " 'import time; time.sleep(60)' {marker} >/dev/null 2>&1 &")
        if os.fork() == 0:  # a daemon by double fork
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, sleep)
            os._exit(0)
        import time
        time.sleep(0.5)
        return 1.0
    """)
    result = await grade(python(source))
    assert (result.score, result.error) == (1.0, None)
    assert processes_with(marker) == []


async def test_timeout_kills_every_process_in_the_sandbox() -> None:
    marker = f"rft-marker-{uuid.uuid4().hex}"
    source = grader(f"""
        import time
        subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", {marker!r}], start_new_session=True)
        time.sleep(60)  # asleep: no CPU-time limit ends it first
    """)
    started = time.monotonic()
    result = await grade(python(source, timeout_s=2.0))
    assert result.score is None and "did not finish within timeout_s=2 (killed)" in result.error
    assert time.monotonic() - started < 30  # not the 60 s of the sleep: killed, not waited for
    assert processes_with(marker) == []


@pytest.mark.parametrize("mode", MODES)
def test_the_parent_cannot_be_killed(mode: str) -> None:
    source = grader("""
        for pid in (item["parent"], os.getppid(), 0, -1, -item["parent"]):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        subprocess.run(f"kill -9 {item['parent']} -{item['parent']}", shell=True)
        return 0.0
    """)
    # grade_in_a_process asserts that the parent lived to print the result.
    result, _ = grade_in_a_process(source, {"parent": os.getpid()}, mode)
    assert (result["score"], result["error"]) == (0.0, None)


async def test_processes_and_tmp_are_bounded_and_private_to_a_grade() -> None:
    fill_and_fork = grader("""
        import time
        started = 0
        try:
            for _ in range(64):  # a fork bomb, held back by the process limit
                subprocess.Popen([sys.executable, "-c", "import time; time.sleep(30)"])
                started += 1
        except OSError:
            pass
        written = 0
        try:
            with open("/tmp/fill", "wb") as f:
                for _ in range(256):  # 256 MiB into a 64 MiB /tmp
                    f.write(bytes(1 << 20))
                    f.flush()
                    written += 1
        except OSError:
            pass
        open("/tmp/left-behind", "w").write("from an earlier grade")
        return started / 1000 + written / 1000000  # both counts in one score within [0, 1]
    """)
    result = await grade(python(fill_and_fork))
    started, written = divmod(round(result.score * 1000000), 1000)  # processes, MiB
    assert result.error is None and 0 < started < 16 and 0 < written <= 64
    later = await grade(python(grader("return float(os.path.exists('/tmp/left-behind'))")))
    assert (later.score, later.error) == (0.0, None)


def test_output_cannot_balloon_the_parent() -> None:
    source = grader("""
        block = b"x" * (1 << 20)
        for _ in range(1024):  # 1 GiB on the result stream
            os.write(1, block)
        return 1.0
    """)
    # Several grades, for a race: the kill at the cap used to hang the parent in some grades under
    # load (Python 3.11's Process.wait() waited for the result pipe to close, which its reader,
    # paused on a full buffer, never saw), and grade_in_a_process's timeout then failed the test.
    result, _ = grade_in_a_process(source, {}, timeout_s=60, times=8)
    capped = "the grader process wrote more than 65536 bytes to its result stream (killed)"
    assert all(error is not None and capped in error for error in result["errors"]), result["errors"]
    assert result["maxrss_mb"] < 400, result  # the parent's peak: it never held the gigabyte


@pytest.mark.parametrize("mode", MODES)
def test_grader_runs_unprivileged_in_namespaces_of_its_own(mode: str) -> None:
    source = grader("""
        status = dict(line.split(":", 1) for line in open("/proc/self/status").read().splitlines())
        assert os.getuid() != 0 and os.getpid() == 1, (os.getuid(), os.getpid())
        assert int(status["CapEff"], 16) == 0 and status["NoNewPrivs"].strip() == "1", status
        assert [p for p in os.listdir("/proc") if p.isdigit()] == ["1"]
        assert set(os.listdir("/")) == set(item["root"]), os.listdir("/")
        assert [line.split()[0] for line in open("/proc/net/dev").read().splitlines()[2:]] == ["lo:"]
        return 1.0
    """)
    root = {name for name in ("usr", "bin", "lib", "lib64", "lib32", "libx32", "etc") if os.path.lexists("/" + name)}
    root |= {"dev", "proc", "tmp"} | {Path(p).resolve().parts[1] for p in (sys.prefix, sys.base_prefix)}
    result, _ = grade_in_a_process(source, {"root": sorted(root)}, mode)
    assert (result["score"], result["error"]) == (1.0, None)


# Root of a user namespace that may create none: a machine without namespaces.
WITHOUT_NAMESPACES = ["unshare", "-r", "sh", "-c", 'echo 0 > /proc/sys/user/max_user_namespaces && exec "$@"', "sh"]


def test_a_machine_without_namespaces_is_refused_clearly() -> None:
    """The grader must refuse to start, naming what is missing, and run only when the operator opts out."""
    spec = json.dumps({"type": "python", "name": "py", "source": "def grade(sample, item):\n    return 0.5\n", "item": {}})
    command = [*WITHOUT_NAMESPACES, sys.executable, "-c", GRADE_IN_A_PROCESS, spec]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    refused = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 1 and "SandboxUnavailable" in refused.stderr
    assert "this machine must allow user namespaces" in refused.stderr and "RFT_PYTHON_GRADER_UNSANDBOXED=1" in refused.stderr
    opted_out = subprocess.run(command, env={**env, "RFT_PYTHON_GRADER_UNSANDBOXED": "1"}, capture_output=True, text=True, timeout=120)
    assert json.loads(opted_out.stdout.splitlines()[-1])["score"] == 0.5
    assert "runs WITHOUT a sandbox" in opted_out.stderr


def test_grader_run_without_namespaces_is_one_line_not_a_traceback(tmp_path: Path) -> None:
    (tmp_path / "train.jsonl").write_text(json.dumps({"messages": [{"role": "user", "content": "hi"}], "answer": "42"}) + "\n")
    job = tmp_path / "job.yaml"
    job.write_text(
        "model: some/model\ntraining_file: train.jsonl\nmethod:\n  type: reinforcement\n  reinforcement:\n"
        "    grader: {type: python, source: \"def grade(sample, item):\\n    return 1.0\"}\n"
    )
    command = [*WITHOUT_NAMESPACES, sys.executable, "-m", "rft_cluster.cli", "grader-run", str(job), "--output-text", "42"]
    done = subprocess.run(command, env={**os.environ, "PYTHONPATH": str(REPO)}, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1 and "Traceback" not in done.stderr
    assert "this machine must allow user namespaces" in done.stderr.strip().splitlines()[-1]
