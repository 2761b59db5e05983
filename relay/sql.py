"""Loads the named queries, the one place the relay's SQL lives: `queries.sql` for PostgreSQL,
`queries_sqlite.sql` for SQLite. A statement that both run has the same name in both files;
SQLite's own (PRAGMAs, sqlite_master) are named `sqlite_*` (tests/test_sqlite_embedded.py)."""

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


def _load(name: str) -> MappingProxyType[str, str]:
    return MappingProxyType(_parse(files("outbox.relay").joinpath(name).read_text("utf-8")))


QUERIES = _load("queries.sql")
SQLITE_QUERIES = _load("queries_sqlite.sql")
