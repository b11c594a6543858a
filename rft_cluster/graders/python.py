"""OpenAI's python grader: `grade(sample, item) -> float` from the job's `source`, run in a fresh
child process (`python_child.py`) per grade with

- a wall-time limit, `timeout_s`, from process start (interpreter start-up included), after
  which the child is killed;
- an address-space limit, `memory_mb` (RLIMIT_AS, set in the child);
- no network: socket creation and name lookups raise (a guard, not a sandbox: see
  `python_child.py`);
- a minimal environment: the parent's variables (which may hold secrets) are not passed on.

The child's stderr (and the user's prints) are discarded; a raised exception's traceback is in
the error. Exceptions, timeouts, memory blow-ups and non-numeric results are failures.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from pathlib import Path
from typing import Any

from rft_cluster.config import PythonGrader
from rft_cluster.graders.base import BaseGrader, clip, finite_number
from rft_cluster.types import GradeResult

_CHILD = Path(__file__).with_name("python_child.py")
_CHILD_ENV = {"PATH": os.environ.get("PATH", ""), "OMP_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}


class Python(BaseGrader):
    def __init__(self, spec: PythonGrader):
        super().__init__(spec.name)
        self._spec = spec
        # At most one child per core at once, so `timeout_s` measures the grader's own work
        # rather than its wait for a CPU behind a whole batch of graders.
        self._slots = asyncio.Semaphore(os.cpu_count() or 1)

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        spec = self._spec
        request = json.dumps({"source": spec.source, "sample": sample, "item": item, "memory_mb": spec.memory_mb})
        async with self._slots:
            # -I: no user site-packages, no PYTHON* variables, no current directory on the path.
            child = await asyncio.create_subprocess_exec(
                sys.executable, "-I", str(_CHILD),
                stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.DEVNULL,
                env=_CHILD_ENV,
            )  # fmt: skip
            try:
                stdout, _ = await asyncio.wait_for(child.communicate(request.encode()), spec.timeout_s)
            except asyncio.TimeoutError:
                return self.fail(f"grade() did not finish within timeout_s={spec.timeout_s:g} (killed)")
            finally:
                if child.returncode is None:  # timed out, or this grade was cancelled
                    child.kill()
                    await child.wait()
        try:
            result = json.loads(stdout)
        except ValueError:
            return self.fail(f"the grader process exited with code {child.returncode} without a result")
        if "error" in result:
            return self.fail(result["error"])
        score = finite_number(result["score"])
        if score is None:
            return self.fail(f"grade() returned {clip(repr(result['score']))}, not a finite number")
        return GradeResult(score=score)
