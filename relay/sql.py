"""Loads the named queries of `queries.sql`, the one place the relay's SQL lives."""

from __future__ import annotations

import re
from importlib.resources import files
from types import MappingProxyType

_HEADER = re.compile(r"^-- name: (\w+) --$", re.MULTILINE)


def _parse(text: str) -> dict[str, str]:
    parts = _HEADER.split(text)
    queries: dict[str, str] = {}
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [line for line in body.strip().splitlines() if not line.lstrip().startswith("--")]
        queries[name] = "\n".join(lines).strip().rstrip(";")
    return queries


QUERIES = MappingProxyType(_parse(files("outbox.relay").joinpath("queries.sql").read_text("utf-8")))
