"""Light modules stay light: what the driver's bookkeeping and the job model import."""

from __future__ import annotations

import subprocess
import sys

import pytest


@pytest.mark.parametrize(("module", "absent"), [
    ("rft_cluster.pipeline", ("ray", "torch", "vllm")),  # bookkeeping, unit-testable without a cluster
    ("rft_cluster.config", ("rft_cluster.graders", "ray", "torch", "vllm")),  # no upward import from the job model
])
def test_a_module_does_not_import(module: str, absent: tuple[str, ...]) -> None:
    code = f"import sys, {module}; print(' '.join(m for m in {absent!r} if m in sys.modules))"
    loaded = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split()
    assert loaded == []
