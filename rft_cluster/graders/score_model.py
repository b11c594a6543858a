"""score_model: an LLM judge on any OpenAI-compatible chat endpoint.

The request is `POST {base_url}/chat/completions` with `model`, the `input` messages (templates
rendered) and the `sampling_params` that are set (`max_completions_tokens` is sent under the
Chat Completions name `max_completion_tokens`). The score is read from the reply's
`choices[0].message.content`, first match wins:

1. the whole reply is a number, or a JSON object with a numeric `"score"` or `"result"`;
2. the last JSON object in the text with such a key (`... so {"score": 0.8}`), among those starting
   at the last JSON_CANDIDATES `{` of the reply;
3. the last number in the text (`Score: 4`) — so a judge told to use a scale should end its
   reply with the score, or answer in JSON.

The score must lie within `range` (inclusive) and is then mapped linearly onto [0, 1]. A score
out of range or a reply without one is a failure naming what the judge said; it is never clamped.

The reply is hostile text (up to `max_response_bytes`): parsing it takes time linear in its length
(a bounded number of JSON candidates, each decoded from its own slice so that an error costs no
scan of the text before it), in a thread, off the grader's event loop.
"""

from __future__ import annotations

import asyncio
import json
import re
from typing import Any

from rft_cluster.config import ScoreModelGrader, ToolSettings
from rft_cluster.graders.base import BaseGrader, clip, finite_number
from rft_cluster.graders.template import render_template
from rft_cluster.http import JsonPoster
from rft_cluster.types import GradeResult

_NUMBER = re.compile(r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?")
_SCORE_KEYS = ("score", "result")
JSON_CANDIDATES = 32


def _from_json(value: Any) -> float | None:
    if isinstance(value, dict):
        return next((s for key in _SCORE_KEYS if (s := finite_number(value.get(key))) is not None), None)
    return finite_number(value)


def parse_score(reply: str) -> float | None:
    """The judge's score in `reply` (see the module docstring for the rules), or None."""
    try:
        score = _from_json(json.loads(reply))
    except (ValueError, RecursionError):
        score = None
    if score is not None:
        return score
    decoder = json.JSONDecoder()
    start = len(reply)
    for _ in range(JSON_CANDIDATES):
        start = reply.rfind("{", 0, start)
        if start < 0:
            break
        try:
            # A slice: raw_decode's error would count the lines of everything before `start`.
            score = _from_json(decoder.raw_decode(reply[start:])[0])
        except (ValueError, RecursionError):
            continue
        if score is not None:
            return score
    numbers = _NUMBER.findall(reply)
    return finite_number(float(numbers[-1])) if numbers else None


class ScoreModel(BaseGrader):
    def __init__(self, spec: ScoreModelGrader, settings: ToolSettings):
        super().__init__(spec.name)
        self._spec = spec
        self._url = spec.base_url.rstrip("/") + "/chat/completions"
        self._poster = JsonPoster(settings)
        params = spec.sampling_params.model_dump(exclude_none=True)
        if "max_completions_tokens" in params:
            params["max_completion_tokens"] = params.pop("max_completions_tokens")
        self._sampling = params

    async def _grade(self, sample: dict[str, Any], item: dict[str, Any], trace_id: str) -> GradeResult:
        messages = [{"role": m.role, "content": render_template(m.content, sample, item)} for m in self._spec.input]
        payload = {"model": self._spec.model, "messages": messages, **self._sampling}
        outcome = await self._poster.post(self._url, payload, self._spec.headers)
        if (error := outcome.error()) is not None:
            return self.fail(f"judge: {error}")
        reply = outcome.field("choices", 0, "message", "content")
        if not isinstance(reply, str):
            return self.fail(f"judge: {outcome.missing('choices[0].message.content text')}")
        score = await asyncio.to_thread(parse_score, reply)
        if score is None:
            return self.fail(f"no score in the judge's reply: {clip(reply)!r}")
        low, high = self._spec.range
        if not low <= score <= high:
            return self.fail(f"judge score {score:g} is outside range [{low:g}, {high:g}]; the judge replied: {clip(reply)!r}")
        return GradeResult(score=(score - low) / (high - low))

    async def close(self) -> None:
        await self._poster.close()
