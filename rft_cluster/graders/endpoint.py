"""The user's grader endpoint: POST {"sample", "item", "trace_id"} (strict JSON, `JsonPoster`: a
non-finite number in the item is sent as null), read {"score": float}."""

from __future__ import annotations

from typing import Any

from rft_cluster.config import EndpointGrader, ToolSettings
from rft_cluster.graders.base import BaseGrader, finite_number
from rft_cluster.http import JsonPoster
from rft_cluster.types import GradeResult


class Endpoint(BaseGrader):
    def __init__(self, spec: EndpointGrader, settings: ToolSettings):
        super().__init__(spec.name)
        self._spec = spec
        self._poster = JsonPoster(settings, rate_limit_per_minute=spec.rate_limit)

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        payload = {"sample": sample, "item": item, "trace_id": trace_id}
        outcome = await self._poster.post(self._spec.url, payload, self._spec.headers)
        if (error := outcome.error()) is not None:
            return self.fail(error)
        score = finite_number(outcome.field("score"))
        if score is None:
            return self.fail(outcome.missing("finite number 'score'"))
        return GradeResult(score=score)

    async def close(self) -> None:
        await self._poster.close()
