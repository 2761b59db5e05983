"""Print the relay's settings as a Markdown table, from `RelaySettings.model_fields`.

    .venv/bin/python scripts/settings_table.py

docs/operations.md embeds its output; rerun it whenever relay/settings.py changes.
"""

from __future__ import annotations

import types
import typing
from typing import Any

import annotated_types
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

from outbox.relay.cli import run
from outbox.relay.settings import RelaySettings

BOUNDS = (
    (annotated_types.Gt, "gt", ">"),
    (annotated_types.Ge, "ge", ">="),
    (annotated_types.Lt, "lt", "<"),
    (annotated_types.Le, "le", "<="),
)


def type_name(annotation: Any) -> str:
    if typing.get_origin(annotation) is typing.Literal:
        return " \\| ".join(f"`{value}`" for value in typing.get_args(annotation))
    if isinstance(annotation, types.UnionType) or typing.get_origin(annotation) is typing.Union:
        return " or ".join(type_name(arg) for arg in typing.get_args(annotation))
    if annotation is type(None):
        return "none"
    return f"`{getattr(annotation, '__name__', annotation)}`"


def default(field: FieldInfo) -> str:
    if field.default_factory is not None:
        return f"`{getattr(field.default_factory, '__name__', 'factory')}()`"
    if field.default is PydanticUndefined:
        return "**required**"
    if field.default is None:
        return "unset"
    if field.default == "":
        return '`""`'
    return f"`{field.default}`"


def bounds(field: FieldInfo) -> str:
    found = []
    for constraint in field.metadata:
        for kind, attr, sign in BOUNDS:
            if isinstance(constraint, kind):
                found.append(f"{sign} {getattr(constraint, attr)}")
    return ", ".join(found)


def table() -> str:
    flags = {param.name: param.opts[0] for param in run.params}
    lines = [
        "| Setting | Variable | `outbox-relay run` flag | Type | Default | Bounds | Meaning |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, field in RelaySettings.model_fields.items():
        flag = f"`{flags[name]}`" if name in flags else ""
        lines.append(
            f"| `{name}` | `OUTBOX_{name.upper()}` | {flag} | {type_name(field.annotation)} "
            f"| {default(field)} | {bounds(field)} | {field.description or ''} |"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    print(table())
