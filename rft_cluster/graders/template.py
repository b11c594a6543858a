"""`{{item.x}}` / `{{sample.output_text}}` templates, shared by every grader that renders text."""

from __future__ import annotations

import json
import re
from typing import Any

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


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
