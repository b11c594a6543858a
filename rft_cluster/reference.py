"""The job reference (docs/job-reference.md), rendered from the job models themselves.

Each model a job file can set becomes one section: a table of its fields with the dotted path as
written in a job file, the type, the default, the range (from ge/gt/le/lt constraints, wherever
they sit in the annotation) and the field's description. A union of models (the grader types)
gets one section per member, titled by its `type`. `rft-cluster docs` writes the page; a test
checks the committed page against a fresh render.
"""

from __future__ import annotations

import json
import types
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo

from rft_cluster.config import JobSpec

INTRO = (
    "# Job reference\n\n"
    "Every field a job file can set, by its dotted path as written in the file (`[]`: each entry of a list). "
    "This page is generated from the job models in `rft_cluster/config.py` by `rft-cluster docs`: do not edit "
    "it by hand; change a field's `description`, default or bounds there and run `rft-cluster docs` again.\n\n"
    "A default of \"required\" means the field must be given (when its section is); \"fields below\" means "
    "each field of that section takes the default listed there.\n"
)

_SCALARS: dict[Any, str] = {int: "integer", float: "number", str: "string", bool: "boolean", type(None): "none", Any: "any"}
_BOUNDS = (annotated_types.Gt, annotated_types.Ge, annotated_types.Lt, annotated_types.Le)


@dataclass(frozen=True)
class _Row:
    path: str
    type: str
    default: str
    range: str
    description: str


@dataclass(frozen=True)
class _Section:
    title: str
    rows: tuple[_Row, ...]


def render_reference() -> str:
    """The Markdown page: the intro, then one table per model, depth first in field order."""
    parts = [INTRO]
    for section in _walk(JobSpec, "", "", None):
        parts.append(f"\n## {section.title}\n\n| field | type | default | range | description |\n|---|---|---|---|---|\n")
        parts.extend(
            f"| `{r.path}` | {_cell(r.type)} | {_cell(r.default)} | {_cell(r.range)} | {_cell(r.description)} |\n"
            for r in section.rows
        )
    return "".join(parts)


def _walk(model: type[BaseModel], path: str, tag: str, defaults: BaseModel | None) -> list[_Section]:
    """The section of `model` at `path`, then those of the models its fields hold. `defaults` is
    the instance a parent's default_factory builds (its values can differ from the fields' own
    defaults: a tool proxy reserves no CPU); `tag` names the union member the path is inside."""
    rows, nested = [], []
    for name, field in model.model_fields.items():
        field_path = f"{path}.{name}" if path else name
        rows.append(_Row(field_path, _type_text(field.annotation), _default_text(field, name, defaults), _range_text(field), field.description or ""))
        members = list(_models(field.annotation))
        for suffix, member in members:
            if len(members) > 1:
                nested += _walk(member, field_path + suffix, f"type: {_type_tag(member)}", None)
            else:
                nested += _walk(member, field_path + suffix, tag, _model_default(field, name, defaults))
    title = f"`{path}`" + (f", `{tag}`" if tag else "") if path else "Top level"
    return [_Section(title, tuple(rows)), *nested]


def _models(annotation: Any, suffix: str = "") -> Iterator[tuple[str, type[BaseModel]]]:
    """The models a field holds, directly, in a union or in a list (path suffix `[]`). A map's
    values are not entered: the only map of models is a multi grader's sub-graders, which are the
    grader types documented already (and would recurse forever)."""
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        yield from _models(args[0], suffix)
    elif origin in (Union, types.UnionType):
        for arg in args:
            yield from _models(arg, suffix)
    elif origin is list:
        yield from _models(args[0], suffix + "[]")
    elif origin is None and isinstance(annotation, type) and issubclass(annotation, BaseModel):
        yield suffix, annotation


def _type_tag(model: type[BaseModel]) -> str:
    """The `type` value that selects this member of a discriminated union."""
    return get_args(model.model_fields["type"].annotation)[0]


def _type_text(annotation: Any) -> str:
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _type_text(args[0])
    if origin in (Union, types.UnionType):
        if all(isinstance(a, type) and issubclass(a, BaseModel) for a in args):
            return "object, by `type`: " + ", ".join(_type_tag(a) for a in args)
        return " | ".join(dict.fromkeys(_type_text(a) for a in args))  # Int | FleetSize | ...: each kind once
    if origin is Literal:
        return " | ".join(json.dumps(a) for a in args)
    if origin is list:
        return f"list of {_type_text(args[0])}"
    if origin is dict:
        return f"map of {_type_text(args[0])} to {_type_text(args[1])}"
    if origin is tuple:
        return "[" + ", ".join(_type_text(a) for a in args) + "]"
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return "object"
    return _SCALARS[annotation]


def _field_value(field: FieldInfo, name: str, defaults: BaseModel | None) -> Any:
    return getattr(defaults, name) if defaults is not None else field.get_default(call_default_factory=True)


def _default_text(field: FieldInfo, name: str, defaults: BaseModel | None) -> str:
    if defaults is None and field.is_required():
        return "required"
    value = _field_value(field, name, defaults)
    if value is None:
        return "none"
    if isinstance(value, BaseModel):
        return "fields below"
    return f"`{json.dumps(value)}`"


def _model_default(field: FieldInfo, name: str, defaults: BaseModel | None) -> BaseModel | None:
    """The instance a nested model defaults to, whose values are its fields' defaults here."""
    if defaults is None and field.is_required():
        return None
    value = _field_value(field, name, defaults)
    return value if isinstance(value, BaseModel) else None


def _range_text(field: FieldInfo) -> str:
    """`a..b` for inclusive bounds on both sides, else `> a`, `≥ a`, `< b`, `≤ b`, comma-joined."""
    bounds = {type(b).__name__.lower(): getattr(b, type(b).__name__.lower()) for b in _bounds(field.metadata, field.annotation)}
    if "ge" in bounds and "le" in bounds:
        return f"{bounds['ge']}..{bounds['le']}"
    low = f"> {bounds['gt']}" if "gt" in bounds else f"≥ {bounds['ge']}" if "ge" in bounds else ""
    high = f"< {bounds['lt']}" if "lt" in bounds else f"≤ {bounds['le']}" if "le" in bounds else ""
    return ", ".join(part for part in (low, high) if part)


def _bounds(metadata: list[Any], annotation: Any) -> Iterator[Any]:
    """The bounds in a field's metadata and in its annotation's `Annotated` parts, unions
    included (`Annotated[Int, Field(ge=2)] | "auto"`); not a list's or map's element bounds."""
    for item in metadata:
        if isinstance(item, _BOUNDS):
            yield item
        elif isinstance(item, FieldInfo):  # Annotated[Int, Field(gt=0)] keeps the Field whole
            yield from _bounds(item.metadata, None)
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        yield from _bounds(list(args[1:]), args[0])
    elif origin in (Union, types.UnionType):
        for arg in args:
            yield from _bounds([], arg)


def _cell(text: str) -> str:
    """Text safe inside a Markdown table cell."""
    return text.replace("|", "\\|").replace("\n", " ")
