"""`rft-cluster make-tiny-model --corpus`: the tokenizer and pre-training learn the user's domain
from the user's files; the builder knows no environment."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from rft_cluster.cli import main
from rft_cluster.envs.warehouse import WAREHOUSES, WarehouseServers, make_catalog, split_questions, write_datasets, write_demonstrations


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """A domain the builder has never seen: the warehouse's datasets and 60 demonstrations."""
    out = tmp_path_factory.mktemp("warehouse")
    splits = split_questions(make_catalog(0), 0)
    write_datasets(out, splits)
    with WarehouseServers(0) as env:
        write_demonstrations(out / "sft.jsonl", env.tools, splits.demo[:60], 0)
    return [out / "train.jsonl", out / "valid.jsonl", out / "sft.jsonl"]


def _domain_words() -> list[str]:
    return sorted({w for p in make_catalog(0) for w in p.name.split()} | set(WAREHOUSES))


def test_domain_words_become_single_tokens(material: list[Path], tmp_path: Path) -> None:
    from transformers import AutoConfig, AutoTokenizer

    from rft_cluster.tiny_model import build_tokenizer

    out = tmp_path / "tiny"
    assert main(["make-tiny-model", str(out), "--corpus", *map(str, material), "--pretrain-steps", "0"]) == 0
    tok = AutoTokenizer.from_pretrained(out)
    words = _domain_words()
    assert [w for w in words if len(tok.encode(" " + w)) != 1] == []
    assert len(tok.encode(" Compact Steel Hinge at Denver")) == 5
    generic = build_tokenizer(0)  # no material: most of these words are split into pieces
    assert sum(len(generic.encode(" " + w)) > 1 for w in words) > len(words) // 2
    assert AutoConfig.from_pretrained(out).vocab_size >= len(tok)


def test_corpus_errors_name_the_file(material: list[Path], tmp_path: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"messages": [{"role": "user", "content": "hi"}]}\nnot json\n{"messages": []}\n')
    for corpus, expected in (([tmp_path / "missing.jsonl"], "missing.jsonl: no such file"), ([bad], f"{bad}:2: not JSON")):
        with pytest.raises(SystemExit, match=re.escape(expected)):
            main(["make-tiny-model", str(tmp_path / "m"), "--corpus", *map(str, corpus), "--pretrain-steps", "0"])


def test_the_builder_imports_no_environment(material: list[Path]) -> None:
    """The demo hands the builder its corpus; the builder never reaches for an environment."""
    code = (
        "import sys\nfrom rft_cluster.tiny_model import Corpus, build_tokenizer\n"
        f"build_tokenizer(0, corpus=Corpus.from_files({[str(p) for p in material]!r}))\n"
        "print(sorted(m for m in sys.modules if m.startswith('rft_cluster.envs')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=Path(__file__).parents[1])
    assert out.stdout.strip() == "[]"
