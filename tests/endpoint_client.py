"""A raw client for environment servers in tests: protocol bodies and POSTs, no proxy between."""

from __future__ import annotations

import json
from typing import Any

import aiohttp


def function_call(name: str, arguments: Any, trace_id: str = "trace_test") -> dict[str, Any]:
    """A tool-endpoint request body; `arguments` may be an object (encoded) or a raw string."""
    args = arguments if isinstance(arguments, str) else json.dumps(arguments)
    return {"type": "function_call", "id": "fc_1", "call_id": "call_1", "name": name, "arguments": args,
            "trace_id": trace_id, "item": {}}


async def post(http: aiohttp.ClientSession, url: str, body: Any, headers: dict[str, str]) -> tuple[int, str]:
    async with http.post(url, json=body, headers=headers) as resp:
        return resp.status, await resp.text()
