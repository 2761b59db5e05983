"""`outbox-relay migrate`: Alembic with the migrations shipped inside the installed package."""

from __future__ import annotations

from importlib.resources import as_file, files
from typing import TextIO

from alembic import command
from alembic.config import Config
from alembic.runtime.migration import MigrationContext
from alembic.script import ScriptDirectory

from outbox.urls import async_engine

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
    del database_url
    return "postgresql://"
