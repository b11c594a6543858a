"""The job reference is generated from the job models: the committed page is current, every
field a job file can set is described, and ranges and defaults render as the models say."""

from __future__ import annotations

import re
import typing
from pathlib import Path
from typing import Any

from pydantic import BaseModel

from rft_cluster.cli import main
from rft_cluster.config import JobSpec
from rft_cluster.reference import render_reference

REFERENCE = Path(__file__).resolve().parents[1] / "docs" / "job-reference.md"


def job_models() -> list[type[BaseModel]]:
    """Every model reachable from JobSpec through its fields' annotations (unions, lists, maps,
    Annotated: any nesting), found independently of the renderer."""
    found: list[type[BaseModel]] = []

    def visit(annotation: Any) -> None:
        if isinstance(annotation, type) and issubclass(annotation, BaseModel):
            if annotation not in found:
                found.append(annotation)
                for field in annotation.model_fields.values():
                    visit(field.annotation)
        for arg in typing.get_args(annotation):
            visit(arg)

    visit(JobSpec)
    return found


def row(page: str, path: str) -> list[str]:
    """The cells (type, default, range, description) of the first row for `path`."""
    line = next(line for line in page.splitlines() if line.startswith(f"| `{path}` |"))
    return [cell.strip() for cell in re.split(r"(?<!\\)\|", line)[2:-1]]


def test_the_committed_reference_is_current() -> None:
    assert REFERENCE.read_text(encoding="utf-8") == render_reference(), (
        "docs/job-reference.md is out of date with rft_cluster/config.py: run `rft-cluster docs` and commit the result"
    )


def test_every_job_field_is_described() -> None:
    models = job_models()
    assert len(models) > 20, "the walk reaches the graders, the cluster and the rest"
    undescribed = [f"{m.__name__}.{name}" for m in models for name, field in m.model_fields.items()
                   if not (field.description or "").strip()]
    assert undescribed == [], "give these fields a Field(description=...)"


def test_fields_accepted_but_not_acted_on_say_so() -> None:
    for model in job_models():
        for name in getattr(model, "NOT_ACTED_ON", {}):
            assert "ignored" in model.model_fields[name].description, f"{model.__name__}.{name}"


def test_ranges_and_defaults_render_as_the_models_say() -> None:
    page = render_reference()
    assert row(page, "cluster.learner.zero_stage")[1:3] == ["`2`", "0..3"]
    assert row(page, "method.reinforcement.hyperparameters.group_size")[:3] == ['integer \\| "auto"', '`"auto"`', "2..1024"]
    assert row(page, "seed")[2] == "≥ 0, < 4294967296"
    assert row(page, "cluster.engine.gpu_memory_utilization")[2] == "> 0, ≤ 1"
    # A default_factory's own values: a tool proxy reserves no CPU, a rollout worker one.
    assert row(page, "cluster.resources.tool_proxy.cpus")[1] == "`0.0`"
    assert row(page, "cluster.resources.rollout_worker.cpus")[1] == "`1`"
    assert row(page, "model")[1] == "required"


def test_each_grader_type_has_its_section() -> None:
    page = render_reference()
    for grader in ("string_check", "text_similarity", "score_model", "python", "multi", "endpoint"):
        assert f"## `method.reinforcement.grader`, `type: {grader}`" in page
    assert row(page, "method.reinforcement.grader.sampling_params.top_p")[2] == "> 0, ≤ 1"


def test_the_render_is_deterministic() -> None:
    assert render_reference() == render_reference()


def test_docs_writes_and_checks(tmp_path: Path, capsys) -> None:
    out = tmp_path / "reference.md"
    assert main(["docs", "--check", "--output", str(out)]) == 1  # missing
    assert main(["docs", "--output", str(out)]) == 0
    assert out.read_text(encoding="utf-8") == render_reference()
    assert main(["docs", "--check", "--output", str(out)]) == 0
    out.write_text("edited by hand\n", encoding="utf-8")
    assert main(["docs", "--check", "--output", str(out)]) == 1
    assert "run `rft-cluster docs`" in capsys.readouterr().err
