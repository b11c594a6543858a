"""OpenAI's python grader: `grade(sample, item) -> float` from the job's `source`, run per grade
in a fresh child process (`python_child.py`) that confines itself in a sandbox (`sandbox.py`:
new PID, network, mount namespaces, an unprivileged uid, rlimits, a read-only filesystem view)
before it reads the user's code. Around it, this side enforces

- a wall-time limit, `timeout_s`, from process start (sandbox set-up included), after which the
  sandbox is killed, every process in it with it;
- an address-space limit, `memory_mb` (RLIMIT_AS, per process in the sandbox);
- a cap on what the child writes back (`OUTPUT_BYTES`), so it cannot fill this process's memory;
- a minimal environment: the parent's variables (which may hold secrets) are not passed on.

A machine that cannot provide the sandbox fails the grader's construction with an error naming
what is missing, unless the operator sets RFT_PYTHON_GRADER_UNSANDBOXED=1 (logged as a warning
at every construction). The child's stderr (and the user's prints) are discarded; a raised
exception's traceback is in the error. Exceptions, timeouts, memory blow-ups and non-numeric
results are failures.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import logging
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from rft_cluster.config import PythonGrader
from rft_cluster.graders.base import BaseGrader, clip, finite_number
from rft_cluster.graders.sandbox import UNSANDBOXED_ENV, SandboxUnavailable
from rft_cluster.types import GradeResult

log = logging.getLogger(__name__)

_CHILD = Path(__file__).with_name("python_child.py")
# -I: no user site-packages, no PYTHON* variables, no current directory on the path.
_COMMAND = (sys.executable, "-I", str(_CHILD))
_CHILD_ENV = {"PATH": "/usr/bin:/bin", "HOME": "/tmp", "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
OUTPUT_BYTES = 64 * 1024  # a result is a score or a clipped traceback: far less than this
KILL_GRACE_S = 10.0  # for a killed sandbox to be gone: the kernel ends it at once
_PROBE = "def grade(sample, item):\n    return 1.0\n"


def _request(source: str, sample: Any, item: Any, memory_mb: int, timeout_s: float, sandbox: bool) -> bytes:
    # cpu_s: a per-process backstop should this side die before it enforces timeout_s.
    cpu_s = math.ceil(timeout_s) + 1
    return json.dumps({"source": source, "sample": sample, "item": item, "memory_mb": memory_mb, "cpu_s": cpu_s, "sandbox": sandbox}).encode()


@functools.cache
def sandbox_unavailable() -> str | None:
    """Why this machine cannot run the python grader's sandbox, or None if it can (tried once)."""
    done = subprocess.run(_COMMAND, input=_request(_PROBE, {}, {}, 512, 30, True), capture_output=True, env=_CHILD_ENV, timeout=60)
    try:
        result = json.loads(done.stdout)
    except ValueError:
        return f"the sandbox probe exited with code {done.returncode} without a result"
    return result.get("unavailable") or result.get("error")


async def _read_capped(stream: asyncio.StreamReader, limit: int) -> bytes | None:
    """All of `stream`, or None as soon as it exceeds `limit` bytes."""
    data = bytearray()
    while chunk := await stream.read(64 * 1024):
        data += chunk
        if len(data) > limit:
            return None
    return bytes(data)


async def _discard(stream: asyncio.StreamReader) -> None:
    """Reads `stream` to its end, keeping none of it."""
    while await stream.read(64 * 1024):
        pass


async def _result_stream(read_end: int) -> tuple[asyncio.StreamReader, asyncio.BaseTransport]:
    """Reads the child's result pipe through a transport of this side's own, not the child's:
    Python 3.11's Process.wait() also waits for the child's pipes to close, and a pipe whose
    reader paused on a full buffer (a child writing past OUTPUT_BYTES) never sees its end, so
    the wait after the kill hung forever."""
    loop = asyncio.get_running_loop()
    stream = asyncio.StreamReader()
    transport, _ = await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stream), open(read_end, "rb", buffering=0))
    return stream, transport


async def _kill(child: asyncio.subprocess.Process, results: asyncio.StreamReader) -> None:
    """Kills the child and waits for the end of its sandbox: the launcher's exit, then the end of
    the result stream, which every process in the sandbox holds open until it is gone (killed with
    the launcher), for at most KILL_GRACE_S, so that nothing there can hang this side."""
    child.kill()
    assert child.stdin is not None
    if child.stdin.transport.get_write_buffer_size():  # a request still unsent would keep wait() waiting
        child.stdin.transport.abort()
    await child.wait()
    try:
        await asyncio.wait_for(_discard(results), KILL_GRACE_S)
    except asyncio.TimeoutError:
        log.warning("a python grader's sandbox still held its result stream %gs after its kill", KILL_GRACE_S)


class Python(BaseGrader):
    def __init__(self, spec: PythonGrader):
        super().__init__(spec.name)
        self._spec = spec
        self._sandbox = os.environ.get(UNSANDBOXED_ENV) != "1"
        if not self._sandbox:
            log.warning("python grader %r runs WITHOUT a sandbox (%s=1): its code can read this machine's "
                        "files and secrets and reach the network", spec.name, UNSANDBOXED_ENV)  # fmt: skip
        elif why := sandbox_unavailable():
            raise SandboxUnavailable(f"{why} (or set {UNSANDBOXED_ENV}=1 to run python graders unsandboxed)")
        # At most one child per core at once, so `timeout_s` measures the grader's own work
        # rather than its wait for a CPU behind a whole batch of graders.
        self._slots = asyncio.Semaphore(os.cpu_count() or 1)

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        spec = self._spec
        request = _request(spec.source, sample, item, spec.memory_mb, spec.timeout_s, self._sandbox)
        async with self._slots:
            read_end, write_end = os.pipe()
            results, transport = await _result_stream(read_end)
            try:
                try:
                    # A session of its own: nothing the child signals by process group reaches this one.
                    child = await asyncio.create_subprocess_exec(
                        *_COMMAND, stdin=asyncio.subprocess.PIPE, stdout=write_end,
                        stderr=asyncio.subprocess.DEVNULL, env=_CHILD_ENV, start_new_session=True,
                    )  # fmt: skip
                finally:
                    os.close(write_end)  # held by the child (and its sandbox) alone: their end is its end
                try:
                    stdout = await asyncio.wait_for(self._exchange(child, request, results), spec.timeout_s)
                except asyncio.TimeoutError:
                    return self.fail(f"grade() did not finish within timeout_s={spec.timeout_s:g} (killed)")
                finally:
                    if child.returncode is None:  # timed out, wrote too much, or this grade was cancelled
                        await _kill(child, results)
            finally:
                transport.close()  # a process of the sandbox still writing gets EPIPE, not a blocked write
        if stdout is None:
            return self.fail(f"the grader process wrote more than {OUTPUT_BYTES} bytes to its result stream (killed)")
        try:
            result = json.loads(stdout)
        except ValueError:
            return self.fail(f"the grader process exited with code {child.returncode} without a result")
        if "error" in result or "unavailable" in result:
            return self.fail(result.get("error") or result["unavailable"])
        score = finite_number(result["score"])
        if score is None:
            return self.fail(f"grade() returned {clip(repr(result['score']))}, not a finite number")
        return GradeResult(score=score)

    @staticmethod
    async def _exchange(child: asyncio.subprocess.Process, request: bytes, results: asyncio.StreamReader) -> bytes | None:
        assert child.stdin is not None
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):  # a child that died early
            child.stdin.write(request)
            await child.stdin.drain()
            child.stdin.close()
        stdout = await _read_capped(results, OUTPUT_BYTES)
        if stdout is not None:
            await child.wait()
        return stdout
