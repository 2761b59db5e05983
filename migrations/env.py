"""Alembic environment of the outbox tables.

It keeps its own version table (`outbox_alembic_version`), so the application's own Alembic
history is never touched. The URL comes from `-x url=...`, the config, or OUTBOX_DATABASE_URL.
"""

from __future__ import annotations

import asyncio
import os

from alembic import context
from sqlalchemy import pool
from sqlalchemy.engine import Connection

from outbox.models import metadata
from outbox.urls import async_engine

VERSION_TABLE = "outbox_alembic_version"

config = context.config
target_metadata = metadata


def _url() -> str:
    url = (
        context.get_x_argument(as_dictionary=True).get("url")
        or config.get_main_option("sqlalchemy.url")
        or os.environ.get("OUTBOX_DATABASE_URL")
    )
    if not url:
        raise RuntimeError("no database URL: set OUTBOX_DATABASE_URL or pass -x url=...")
    return url


def _include_object(obj: object, name: str | None, type_: str, reflected: bool, _: object) -> bool:
    # Compare only the outbox's own tables, never the application's.
    if type_ == "table":
        return name in metadata.tables
    return True


def _configure(connection: Connection | None = None, **kw: object) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        version_table=VERSION_TABLE,
        include_object=_include_object,
        compare_type=True,
        **kw,  # type: ignore[arg-type]
    )


def run_migrations_offline() -> None:
    # Printing SQL needs only the dialect: the URL's scheme.
    _configure(
        url=_url().split("?", 1)[0], literal_binds=True, dialect_opts={"paramstyle": "named"}
    )
    with context.begin_transaction():
        context.run_migrations()


def _run_sync(connection: Connection) -> None:
    _configure(connection)
    with context.begin_transaction():
        context.run_migrations()


async def run_migrations_online() -> None:
    engine = async_engine(_url(), poolclass=pool.NullPool)  # TLS parameters of the URL work
    async with engine.connect() as connection:
        await connection.run_sync(_run_sync)
    await engine.dispose()


if context.is_offline_mode():
    run_migrations_offline()
else:
    connection = config.attributes.get("connection")
    if connection is not None:
        _run_sync(connection)
    else:
        asyncio.run(run_migrations_online())
