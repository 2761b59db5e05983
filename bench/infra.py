"""Services, throwaway databases, table statistics and machine facts."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import datetime as dt
import ipaddress
import os
import platform
import re
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import psutil

from outbox.urls import asyncpg_dsn

REPO = Path(__file__).resolve().parent.parent

#: The business tables of the writer workloads: `orders` alone is the one-row transaction;
#: the checkout transaction also locks and updates `products` and inserts `order_lines`.
PRODUCTS = 10_000
BUSINESS_DDL = f"""
CREATE TABLE orders (
    id bigserial PRIMARY KEY,
    customer text NOT NULL,
    total numeric(12, 2) NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE products (
    id bigint PRIMARY KEY,
    sku text NOT NULL UNIQUE,
    price numeric(12, 2) NOT NULL,
    stock integer NOT NULL CHECK (stock >= 0)
);
CREATE TABLE order_lines (
    id bigserial PRIMARY KEY,
    order_id bigint NOT NULL REFERENCES orders (id),
    product_id bigint NOT NULL REFERENCES products (id),
    quantity integer NOT NULL,
    price numeric(12, 2) NOT NULL
);
CREATE INDEX ON order_lines (order_id);
INSERT INTO products (id, sku, price, stock)
SELECT i, 'SKU-' || i, 5 + (i % 90), 1000000000 FROM generate_series(1, {PRODUCTS}) AS i;
"""


def _check_loopback(what: str, host: str | None) -> None:
    """Load targets must be on this machine: refuse anything but loopback."""
    if host in (None, "", "localhost"):
        return
    try:
        loopback = ipaddress.ip_address(host).is_loopback
    except ValueError:
        loopback = False
    if not loopback:
        raise SystemExit(f"bench: {what} host {host!r} is not a loopback address; refusing")


@dataclass(frozen=True)
class Services:
    database_url: str
    kafka_bootstrap: str
    redis_url: str

    @classmethod
    def from_env(cls) -> Services:
        missing = [
            v
            for v in ("OUTBOX_DATABASE_URL", "OUTBOX_KAFKA_BOOTSTRAP", "OUTBOX_REDIS_URL")
            if not os.environ.get(v)
        ]
        if missing:
            raise SystemExit(
                f"bench: {', '.join(missing)} not set; run "
                '`eval "$(bash scripts/services.sh env)"` first'
            )
        services = cls(
            os.environ["OUTBOX_DATABASE_URL"],
            os.environ["OUTBOX_KAFKA_BOOTSTRAP"],
            os.environ["OUTBOX_REDIS_URL"],
        )
        _check_loopback("database", urlsplit(services.database_url).hostname)
        _check_loopback("redis", urlsplit(services.redis_url).hostname)
        for server in services.kafka_bootstrap.split(","):
            _check_loopback("kafka", server.rsplit(":", 1)[0].strip("[]"))
        return services


async def poll(check: Callable[[], Awaitable[bool]], interval: float, timeout: float) -> None:
    """Await `check()` every `interval` s until it is true; TimeoutError after `timeout` s."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(interval)


def with_database(url: str, name: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{name}"))


class Databases:
    """One migrated template per run; each experiment gets a fresh clone, dropped after it."""

    def __init__(self, server_url: str, run_id: str) -> None:
        self.server_url = server_url
        self.template = f"bench_{run_id}_tpl"
        self._run_id = run_id
        self._created: list[str] = []

    async def _admin(self, sql: str) -> None:
        conn = await asyncpg.connect(asyncpg_dsn(self.server_url))
        try:
            await conn.execute(sql)
        finally:
            await conn.close()

    async def create_template(self) -> None:
        from bench import faststream_runner
        from outbox.relay import migrate

        await self._admin(f'CREATE DATABASE "{self.template}"')
        self._created.append(self.template)
        url = with_database(self.server_url, self.template)
        await asyncio.to_thread(migrate.upgrade, url)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(BUSINESS_DDL)
        finally:
            await conn.close()
        await faststream_runner.create_schema(url)

    @contextlib.asynccontextmanager
    async def fresh(self) -> AsyncIterator[str]:
        name = f"bench_{self._run_id}_{uuid.uuid4().hex[:8]}"
        await self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self._created.append(name)
        try:
            yield with_database(self.server_url, name)
        finally:
            await self.drop(name)

    async def drop(self, name: str) -> None:
        await self._admin(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        if name in self._created:
            self._created.remove(name)

    async def drop_all(self) -> None:
        for name in list(reversed(self._created)):
            with contextlib.suppress(Exception):
                await self.drop(name)


async def table_stats(url: str, table: str) -> dict[str, Any]:
    """Dead tuples and size of `table` (read after the relay's connections closed)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        row = await conn.fetchrow(
            """
            SELECT n_live_tup, n_dead_tup, autovacuum_count, vacuum_count,
                   pg_total_relation_size(relid) AS total_bytes
            FROM pg_stat_user_tables WHERE relname = $1
            """,
            table,
        )
    finally:
        await conn.close()
    return dict(row) if row is not None else {}


async def is_empty(conn: asyncpg.Connection, table: str, pk: str) -> bool:
    # Through the primary key: cheap even while the front of the table is dead tuples.
    return await conn.fetchval(f"SELECT {pk} FROM {table} ORDER BY {pk} LIMIT 1") is None


async def other_activity(server_url: str, own_prefix: str) -> int:
    """Backends busy in databases other than ours: others testing on the same services."""
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        count: int = await conn.fetchval(
            """
            SELECT count(*) FROM pg_stat_activity
            WHERE state = 'active' AND pid <> pg_backend_pid()
              AND datname IS NOT NULL AND datname NOT LIKE $1
            """,
            own_prefix + "%",
        )
    finally:
        await conn.close()
    return count


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _kafka_version() -> str:
    jars = sorted((REPO / ".services" / "kafka" / "libs").glob("kafka_2.13-*.jar"))
    for jar in jars:
        match = re.fullmatch(r"kafka_2\.13-(.+)\.jar", jar.name)
        if match:
            return match.group(1)
    return "unknown"


def git_state() -> dict[str, Any]:
    """The commit measured, and files changed in the work tree (read-only git calls)."""

    def git(*args: str) -> str:
        try:
            return subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, check=True
            ).stdout
        except (OSError, subprocess.CalledProcessError):
            return ""

    # Porcelain lines are "XY path": the status may start with a space, so never strip them.
    changed = [line[3:] for line in git("status", "--porcelain").splitlines() if line]
    return {"commit": git("rev-parse", "HEAD").strip(), "uncommitted": changed}


async def machine_facts(services: Services) -> dict[str, Any]:
    import redis.asyncio as aioredis

    conn = await asyncpg.connect(asyncpg_dsn(services.database_url))
    try:
        pg_version = await conn.fetchval("SHOW server_version")
    finally:
        await conn.close()
    client = aioredis.Redis.from_url(services.redis_url)
    try:
        redis_version = (await client.info("server"))["redis_version"]
    finally:
        await client.aclose()
    return {
        "date": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "cpu_count": os.cpu_count(),
        "cpu_model": _cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "postgres": pg_version,
        "kafka": _kafka_version(),
        "redis": redis_version,
        "git": git_state(),
    }


def service_arguments(description: str | None) -> argparse.ArgumentParser:
    """The flags every bench child process takes: where the database and brokers are."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--database-url", default=os.environ.get("OUTBOX_DATABASE_URL"))
    parser.add_argument("--broker", choices=["kafka", "redis"], default="redis")
    parser.add_argument("--kafka-bootstrap", default=os.environ.get("OUTBOX_KAFKA_BOOTSTRAP"))
    parser.add_argument("--redis-url", default=os.environ.get("OUTBOX_REDIS_URL"))
    return parser


def stop_on_signals() -> asyncio.Event:
    """An event set by SIGTERM or SIGINT: how bench child processes are told to finish."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    return stop
