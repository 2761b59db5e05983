"""Fixtures: real services from scripts/services.sh, one fresh migrated database per test.

Services are found through OUTBOX_DATABASE_URL / OUTBOX_KAFKA_BOOTSTRAP / OUTBOX_REDIS_URL.
Without them the tests that need them skip, unless OUTBOX_REQUIRE_SERVICES=1 (CI), where a
missing service is an error.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import uuid
from collections.abc import AsyncIterator, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from outbox.urls import asyncpg_dsn
from tests.fakes import FakeClock, OutboxDb


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--soak",
        action="store_true",
        default=False,
        help="run the chaos scenarios (tests/test_chaos.py) longer: more kills, longer outages",
    )


def _service(var: str) -> str:
    value = os.environ.get(var)
    if value:
        return value
    message = f'{var} is not set: run `eval "$(scripts/services.sh up)"` first'
    if os.environ.get("OUTBOX_REQUIRE_SERVICES") == "1":
        pytest.fail(message)
    pytest.skip(message)


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@pytest.fixture(scope="session")
def server_url() -> str:
    return _service("OUTBOX_DATABASE_URL")


async def _admin(server_url: str, *statements: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        for statement in statements:
            await conn.execute(statement)
    finally:
        await conn.close()


@pytest.fixture(scope="session")
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated to head once per session (own name: sessions may run side by
    side); each test clones it."""
    from outbox.relay import migrate

    name = f"outbox_test_template_{os.getpid()}"

    def create() -> None:  # in a thread of its own: an event loop may be running here
        asyncio.run(
            _admin(server_url, f'DROP DATABASE IF EXISTS "{name}"', f'CREATE DATABASE "{name}"')
        )
        migrate.upgrade(with_database(server_url, name))

    def drop() -> None:
        asyncio.run(_admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))

    with ThreadPoolExecutor(1) as pool:
        pool.submit(create).result()
    yield name
    with ThreadPoolExecutor(1) as pool:
        pool.submit(drop).result()


@contextlib.asynccontextmanager
async def fresh_database(server_url: str, template: str | None) -> AsyncIterator[str]:
    """A new database (a copy of `template`, or empty), dropped afterwards."""
    name = f"outbox_test_{uuid.uuid4().hex[:12]}"
    clone = f' TEMPLATE "{template}"' if template else ""
    await _admin(server_url, f'CREATE DATABASE "{name}"{clone}')
    try:
        yield with_database(server_url, name)
    finally:
        await _admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@pytest.fixture
async def database_url(server_url: str, template_database: str) -> AsyncIterator[str]:
    """A fresh database at the head revision, dropped after the test."""
    async with fresh_database(server_url, template_database) as url:
        yield url


@pytest.fixture
async def empty_database_url(server_url: str) -> AsyncIterator[str]:
    """A fresh database with no tables at all (for migration tests)."""
    async with fresh_database(server_url, None) as url:
        yield url


@pytest.fixture
async def pg(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A plain asyncpg connection to the test's database, for setup and assertions."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    yield conn
    await conn.close()


@pytest.fixture(scope="session")
def kafka_bootstrap() -> str:
    return _service("OUTBOX_KAFKA_BOOTSTRAP")


@pytest.fixture(scope="session")
def redis_url() -> str:
    return _service("OUTBOX_REDIS_URL")


@pytest.fixture
def topic() -> str:
    """A topic / stream name no other test uses."""
    return f"t-{uuid.uuid4().hex[:10]}"


@pytest.fixture
async def db(tmp_path: Path) -> AsyncIterator[OutboxDb]:
    """A SQLite outbox file with the schema; its stores run on a fake clock. (Modules that
    drive the clock define their own.)"""
    outbox = await OutboxDb.create(tmp_path / "outbox.db", FakeClock())
    yield outbox
    await outbox.close()
