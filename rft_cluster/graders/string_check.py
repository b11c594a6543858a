"""OpenAI's string_check: 1.0 if the comparison holds, else 0.0."""

from __future__ import annotations

from typing import Any

from rft_cluster.config import StringCheckGrader
from rft_cluster.graders.base import BaseGrader
from rft_cluster.graders.template import render_template
from rft_cluster.types import GradeResult


def check_string(operation: str, text: str, reference: str) -> bool:
    """OpenAI's string_check operations."""
    if operation == "eq":
        return text == reference
    if operation == "ne":
        return text != reference
    if operation == "like":
        return reference in text
    if operation == "ilike":
        return reference.lower() in text.lower()
    raise ValueError(f"unknown string_check operation {operation!r}")


class StringCheck(BaseGrader):
    def __init__(self, spec: StringCheckGrader):
        super().__init__(spec.name)
        self._spec = spec

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        text = render_template(self._spec.input, sample, item)
        reference = render_template(self._spec.reference, sample, item)
        return GradeResult(score=1.0 if check_string(self._spec.operation, text, reference) else 0.0)
