"""Text from outside the project — tool servers, graders, judges — made safe for every sink.

Two rules, each applied once, where such text enters or is shown:

- `loads` parses an endpoint's JSON with every lone surrogate replaced by U+FFFD. A JSON-escaped
  lone surrogate (`"\\ud83d"`, what a server emits when it cuts a string mid-emoji) is valid
  JSON, but no UTF-8 sink accepts it: the tokenizer, Parquet and the terminal would raise.
  U+FFFD is what a UTF-8 decoder makes of bytes it cannot read, so both cases look alike.
- `visible` shows control characters as escapes (`\\x1b`) before text reaches a terminal, so an
  endpoint cannot move the cursor, recolour or rewrite what the user reads.
"""

from __future__ import annotations

import json
import re
from typing import Any

_LONE_SURROGATE = re.compile("[\ud800-\udfff]")
# C0 controls but newline and tab, DEL, C1 controls, and the bidirectional overrides that
# reorder what a terminal shows ("Trojan source").
_CONTROL = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069]")


def replace_surrogates(text: str) -> str:
    return _LONE_SURROGATE.sub("\ufffd", text)


def loads(body: bytes | str) -> Any:
    """`json.loads(body)` with lone surrogates replaced in every string, keys included. Raises
    ValueError for anything that is not JSON, nesting too deep for the parser included."""
    try:
        return _replace_in(json.loads(body))
    except RecursionError:
        raise ValueError("JSON nested too deeply") from None


def _replace_in(value: Any) -> Any:
    if isinstance(value, str):
        return replace_surrogates(value)
    if isinstance(value, list):
        return [_replace_in(v) for v in value]
    if isinstance(value, dict):
        return {replace_surrogates(k): _replace_in(v) for k, v in value.items()}
    return value


def visible(text: str) -> str:
    """`text` with control characters (but newline and tab) written as escapes."""
    return _CONTROL.sub(lambda m: f"\\u{ord(m[0]):04x}" if ord(m[0]) > 0xFF else f"\\x{ord(m[0]):02x}", text)
