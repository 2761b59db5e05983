"""Postgres over TLS, configured in the URL (libpq's parameters), for every command: migrate,
run, dlq, and the writers' SQLAlchemy URL. scripts/services.sh serves TLS with a self-signed
certificate for 127.0.0.1 (.services/pg/tls/server.crt)."""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from outbox.urls import async_engine, asyncpg_dsn
from tests.helpers import ROOT, relay_process
from tests.test_schema import outbox_cli

pytestmark = pytest.mark.postgres

CA = ROOT / ".services" / "pg" / "tls" / "server.crt"


@pytest.fixture
async def tls_ready(server_url: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        on = await conn.fetchval("SHOW ssl")
    finally:
        await conn.close()
    if on != "on" or not CA.is_file():
        message = "the Postgres under test serves no TLS (scripts/services.sh does)"
        if os.environ.get("OUTBOX_REQUIRE_SERVICES") == "1":
            pytest.fail(message)
        pytest.skip(message)


def with_query(url: str, query: str) -> str:
    return f"{url}?{query}"


TLS_QUERIES = {
    "require": "sslmode=require",
    "verify-full": f"sslmode=verify-full&sslrootcert={CA}",
    "ssl-true": "ssl=true",
}


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return outbox_cli(*args)


@pytest.mark.usefixtures("tls_ready")
@pytest.mark.parametrize("query", sorted(TLS_QUERIES))
async def test_every_command_connects_over_tls(
    empty_database_url: str, tmp_path: Path, query: str
) -> None:
    url = with_query(empty_database_url, TLS_QUERIES[query])
    migrated = await asyncio.to_thread(cli, "migrate", "--database-url", url)
    assert migrated.returncode == 0, migrated.stderr
    checked = await asyncio.to_thread(cli, "migrate", "--check", "--database-url", url)
    assert checked.returncode == 0, checked.stderr
    listed = await asyncio.to_thread(cli, "dlq", "list", "--database-url", url)
    assert listed.returncode == 0, listed.stderr

    # A writer through SQLAlchemy, then the relay: the event arrives, over TLS both ways.
    engine = async_engine(url)
    async with engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO outbox_events (id, topic, payload) "
                "VALUES (gen_random_uuid(), 't', '{}')"
            )
        )
        assert (
            await conn.execute(text("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()"))
        ).scalar()
    await engine.dispose()
    out = tmp_path / "events.jsonl"
    relay = relay_process(url, "--broker", "stdout", "--jsonl-path", str(out))
    try:
        deadline = time.monotonic() + 30
        while not (out.exists() and out.read_text()):
            assert relay.poll() is None, relay.communicate()[1].decode()[-2000:]
            assert time.monotonic() < deadline, "the relay published nothing over TLS"
            await asyncio.sleep(0.05)
        conn = await asyncpg.connect(asyncpg_dsn(empty_database_url))
        encrypted = await conn.fetch(
            "SELECT s.ssl FROM pg_stat_ssl AS s JOIN pg_stat_activity AS a USING (pid) "
            "WHERE a.application_name LIKE 'outbox-relay%'"
        )
        await conn.close()
        assert encrypted
        assert all(row["ssl"] for row in encrypted)
    finally:
        relay.terminate()
        await asyncio.to_thread(relay.communicate, timeout=30)


@pytest.mark.usefixtures("tls_ready")
async def test_a_certificate_that_does_not_verify_is_one_line(
    database_url: str, tmp_path: Path
) -> None:
    other = tmp_path / "other.crt"
    await asyncio.to_thread(
        subprocess.run,
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=elsewhere",
            "-keyout",
            str(tmp_path / "other.key"),
            "-out",
            str(other),
        ],
        check=True,
        capture_output=True,
    )
    url = with_query(database_url, f"sslmode=verify-full&sslrootcert={other}")
    listed = await asyncio.to_thread(cli, "dlq", "list", "--database-url", url)
    assert listed.returncode == 1
    assert listed.stderr.count("\n") == 1, listed.stderr
    assert "certificate" in listed.stderr.lower()
