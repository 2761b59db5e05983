"""`outbox-relay migrate`: Alembic with the migrations shipped inside the installed package.

The same migrations create the tables on PostgreSQL and on SQLite (the embedded mode, whose
file they create, and switch to WAL).
"""

from __future__ import annotations

import sqlite3
from contextlib import closing
from importlib.resources import as_file, files
from pathlib import Path
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from outbox.urls import async_engine, is_sqlite

VERSION_TABLE = "outbox_alembic_version"


def alembic_config(database_url: str, stdout: TextIO | None = None) -> Config:
    location = files("outbox.migrations")
    with as_file(location) as path:  # a real directory for installed wheels and editable installs
        config = Config(stdout=stdout) if stdout is not None else Config()
        config.set_main_option("script_location", str(path))
    config.set_main_option("sqlalchemy.url", database_url.replace("%", "%%"))
    return config


def upgrade(database_url: str, revision: str = "head", *, sql: bool = False) -> None:
    config = alembic_config(database_url)
    if sql:
        config.set_main_option("sqlalchemy.url", _offline_url(database_url))
    elif is_sqlite(database_url):
        _enable_wal(database_url)  # creates the file; rejects a URL that names none
    command.upgrade(config, revision, sql=sql)


def downgrade(database_url: str, revision: str, *, sql: bool = False) -> None:
    config = alembic_config(database_url)
    if sql:
        config.set_main_option("sqlalchemy.url", _offline_url(database_url))
        revision = f"head:{revision}"
    command.downgrade(config, revision, sql=sql)


def head_revision() -> str:
    head = ScriptDirectory.from_config(alembic_config("postgresql://")).get_current_head()
    if head is None:
        raise RuntimeError("no migrations found in the installed package")
    return head


async def current_revision(database_url: str) -> str | None:
    if is_sqlite(database_url) and not _sqlite_path(database_url).is_file():
        return None  # connecting would create an empty file
    engine = async_engine(database_url)
    try:
        async with engine.connect() as conn:
            return await conn.run_sync(
                lambda sync: MigrationContext.configure(
                    sync, opts={"version_table": VERSION_TABLE}
                ).get_current_revision()
            )
    finally:
        await engine.dispose()


def _offline_url(database_url: str) -> str:
    # Printing SQL needs only the dialect, never a connection.
    return "sqlite://" if is_sqlite(database_url) else "postgresql://"


def _sqlite_path(database_url: str) -> Path:
    from outbox.relay.stores.sqlite import database_path

    return database_path(database_url)


def _enable_wal(database_url: str) -> None:
    from outbox.relay.sql import SQLITE_QUERIES

    with closing(sqlite3.connect(_sqlite_path(database_url))) as conn:
        conn.execute(SQLITE_QUERIES["sqlite_enable_wal"])
