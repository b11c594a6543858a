"""`{{item.x}}` / `{{sample.output_text}}` templates, shared by every grader that renders text."""

from __future__ import annotations

import re
from typing import Any

from rft_cluster.types import dumps_strict

_PLACEHOLDER = re.compile(r"\{\{\s*([^{}]*?)\s*\}\}")


class TemplateError(ValueError):
    """A template names something the sample or item does not have."""


def placeholders(template: str) -> list[str]:
    """The variable paths a template names, e.g. ["item.answer", "sample.output_text"]."""
    return _PLACEHOLDER.findall(template)


def lookup(path: str, roots: dict[str, Any]) -> Any:
    """The value at `path` ("item.a.b", list indices as ".0") in `roots`; raises TemplateError."""
    root, *keys = path.split(".")
    if root not in roots:
        raise TemplateError(f"template variable {path!r} must start with {' or '.join(repr(r + '.') for r in roots)}")
    value: Any = roots[root]
    for key in keys:
        if isinstance(value, dict) and key in value:
            value = value[key]
        elif isinstance(value, list) and key.isdigit() and int(key) < len(value):
            value = value[int(key)]
        else:
            raise TemplateError(f"template variable {path!r}: no key {key!r}")
    return value


def render_template(template: str, sample: dict[str, Any], item: dict[str, Any]) -> str:
    """Replaces each `{{item.a.b}}` / `{{sample.output_text}}` (list indices as `.0`) with its
    value: strings as they are, anything else as strict JSON (a non-finite number as null)."""
    roots = {"item": item, "sample": sample}

    def replace(match: re.Match[str]) -> str:
        value = lookup(match.group(1), roots)
        return value if isinstance(value, str) else dumps_strict(value).decode()

    return _PLACEHOLDER.sub(replace, template)
