"""Which extra installs which optional package, and the error that says so.

`pip install outbox` is the writer's side only (SQLAlchemy and pydantic). The relay, each
broker, FastAPI, SQLite, psycopg and OpenTelemetry come as extras (pyproject.toml)."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

#: Optional top-level package → the extra that installs it.
EXTRA_OF = {
    "aiokafka": "kafka",
    "redis": "redis",
    "hiredis": "redis",
    "fastapi": "fastapi",
    "starlette": "fastapi",
    "asyncpg": "relay",
    "alembic": "relay",
    "click": "relay",
    "structlog": "relay",
    "pydantic_settings": "relay",
    "prometheus_client": "relay",
    "greenlet": "relay",
    "aiosqlite": "sqlite",
    "psycopg": "psycopg",
    "opentelemetry": "otel",
}


class MissingExtraError(ModuleNotFoundError):
    """An optional package is not installed; the message names the extra that installs it."""


def missing_extra(error: ModuleNotFoundError, needed_by: str) -> ModuleNotFoundError:
    """`error` retold as a MissingExtraError naming its extra; other modules' errors as they are."""
    if isinstance(error, MissingExtraError):
        return error
    package = (error.name or "").partition(".")[0]
    extra = EXTRA_OF.get(package)
    if extra is None:
        return error
    return MissingExtraError(
        f"{needed_by} needs {package}, which is not installed: pip install 'outbox[{extra}]'",
        name=error.name,
    )


@contextmanager
def requires_extra(needed_by: str) -> Iterator[None]:
    """Imports under this block that fail for an optional package raise MissingExtraError."""
    try:
        yield
    except ModuleNotFoundError as error:
        retold = missing_extra(error, needed_by)
        if retold is error:
            raise
        raise retold from error
