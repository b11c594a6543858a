"""The grader actor (DESIGN §2): scores one rollout's `sample` against its dataset `item`.

A plain class with async methods; the driver wraps it with `ray.remote` (an async actor).
Any failure is returned as `GradeResult(score=None, error=...)`, never as a silent 0.
"""

from __future__ import annotations

import json
import math
import re
import time
from typing import Any

from rft_cluster.config import EndpointGrader, StringCheckGrader, ToolSettings
from rft_cluster.http import JsonPoster
from rft_cluster.types import GradeResult

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")
# How much of a failing grader's response to keep in the error message.
ERROR_TEXT_CHARS = 500


class TemplateError(ValueError):
    """A template names something the sample or item does not have."""


def render_template(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """Replaces each `{{item.a.b}}` / `{{sample.output_text}}` (list indices as `.0`) with its
    value: strings as they are, anything else as JSON."""
    roots = {"item": item, "sample": sample}

    def lookup(match: re.Match[str]) -> str:
        path = match.group(1)
        root, *keys = path.split(".")
        if root not in roots:
            raise TemplateError(f"template variable {path!r} must start with 'item.' or 'sample.'")
        value: Any = roots[root]
        for key in keys:
            if isinstance(value, dict) and key in value:
                value = value[key]
            elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
                value = value[int(key)]
            else:
                raise TemplateError(f"template variable {path!r}: no key {key!r}")
        return value if isinstance(value, str) else json.dumps(value)

    return _PLACEHOLDER.sub(lookup, template)


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


class GraderActor:
    def __init__(self, grader: StringCheckGrader | EndpointGrader, settings: ToolSettings):
        self._grader = grader
        self._poster = (
            JsonPoster(settings, rate_limit_per_minute=grader.rate_limit) if isinstance(grader, EndpointGrader) else None
        )

    async def grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        started = time.monotonic()
        if isinstance(self._grader, StringCheckGrader):
            result = self._string_check(self._grader, sample, item)
        else:
            result = await self._endpoint(self._grader, sample, item, trace_id)
        result.latency_s = time.monotonic() - started
        return result

    @staticmethod
    def _string_check(grader: StringCheckGrader, sample: dict[str, Any], item: dict[str, Any]) -> GradeResult:
        try:
            text = render_template(grader.input, sample, item)
            reference = render_template(grader.reference, sample, item)
        except TemplateError as e:
            return GradeResult(score=None, error=f"{grader.name}: {e}")
        return GradeResult(score=1.0 if check_string(grader.operation, text, reference) else 0.0)

    async def _endpoint(
        self, grader: EndpointGrader, sample: dict[str, Any], item: dict[str, Any], trace_id: str
    ) -> GradeResult:
        assert self._poster is not None
        payload = {"sample": sample, "item": item, "trace_id": trace_id}
        outcome = await self._poster.post(grader.url, payload, grader.headers)
        where = f"grader {grader.name!r}"
        if outcome.failure is not None:
            return GradeResult(score=None, error=f"{where}: {outcome.detail} (after {outcome.attempts} attempts)")
        assert outcome.status is not None
        if not 200 <= outcome.status < 300:
            return GradeResult(score=None, error=f"{where}: HTTP {outcome.status}: {outcome.text(ERROR_TEXT_CHARS)}")
        try:
            score = json.loads(outcome.body)["score"]
        except (ValueError, TypeError, KeyError):
            score = None
        # bool is an int in Python, but `true` is not a score.
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            return GradeResult(
                score=None, error=f"{where}: response has no finite number 'score': {outcome.text(ERROR_TEXT_CHARS)}"
            )
        return GradeResult(score=float(score))

    async def close(self) -> None:
        if self._poster is not None:
            await self._poster.close()
