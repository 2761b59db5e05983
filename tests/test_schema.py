"""Schema, migrations and OutboxEvent in real Postgres transactions (sync and async sessions)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import Integer, String, create_engine, inspect, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, Session, mapped_column

from outbox import OutboxEvent, enqueue, metadata
from outbox.enqueue import INSERT_EVENT_SQL
from outbox.relay import migrate
from outbox.relay.sql import QUERIES
from outbox.relay.stores.postgres import PLANNER_SETTINGS
from outbox.urls import asyncpg_dsn, sqlalchemy_async_url

pytestmark = pytest.mark.postgres


class AppBase(DeclarativeBase):
    """The application's own base: OutboxEvent must work beside it."""


class Order(AppBase):
    __tablename__ = "orders"
    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    status: Mapped[str] = mapped_column(String(20))


def sync_url(url: str) -> str:
    return "postgresql+psycopg://" + url.split("://", 1)[1]


async def test_async_session_commit_and_rollback(database_url: str, pg: asyncpg.Connection) -> None:
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    async with engine.begin() as conn:
        await conn.run_sync(AppBase.metadata.create_all)
    async with AsyncSession(engine) as session, session.begin():
        session.add(Order(id=1, status="placed"))
        session.add(
            OutboxEvent(
                topic="orders",
                key="order-1",
                payload={"id": 1},
                headers={"trace": "abc"},
                event_type="OrderPlaced",
            )
        )
    async with AsyncSession(engine) as session, session.begin():
        session.add(Order(id=2, status="placed"))
        session.add(OutboxEvent(topic="orders", key="order-2", payload={"id": 2}))
        await session.flush()
        await session.rollback()
    async with AsyncSession(engine) as session:
        orders = (await session.scalars(select(Order.id))).all()
        events = (await session.scalars(select(OutboxEvent))).all()
    await engine.dispose()
    assert orders == [1]
    assert [(e.key, e.payload, e.headers, e.event_type) for e in events] == [
        ("order-1", {"id": 1}, {"trace": "abc"}, "OrderPlaced")
    ]
    assert events[0].seq > 0
    assert events[0].attempts == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 1


async def test_sync_session_commit_and_rollback(database_url: str, pg: asyncpg.Connection) -> None:
    def work() -> None:
        engine = create_engine(sync_url(database_url))
        AppBase.metadata.create_all(engine)
        with Session(engine) as session, session.begin():
            session.add(Order(id=1, status="placed"))
            session.add_all(
                [OutboxEvent(topic="orders", key="order-1", payload=[i]) for i in range(3)]
            )
        with Session(engine) as session:
            session.add(Order(id=2, status="placed"))
            session.add(OutboxEvent(topic="orders", key="order-2", payload={}))
            session.flush()
            session.rollback()
        engine.dispose()

    await asyncio.to_thread(work)
    rows = await pg.fetch("SELECT key, payload::text FROM outbox_events ORDER BY seq")
    assert [(r["key"], r["payload"]) for r in rows] == [("order-1", f"[{i}]") for i in range(3)]
    assert await pg.fetchval("SELECT count(*) FROM orders") == 1


async def test_one_notify_per_transaction(database_url: str, pg: asyncpg.Connection) -> None:
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(asyncpg_dsn(database_url))
    await listener.add_listener("outbox_events", lambda *a: received.put_nowait(a[3]))
    insert = "INSERT INTO outbox_events (id, topic, payload) VALUES (gen_random_uuid(), 't', '{}')"
    async with pg.transaction():
        for _ in range(3):  # three statements
            await pg.execute(insert)
        await pg.execute(
            insert.replace("VALUES (", "SELECT ").rstrip(")") + " FROM generate_series(1, 50)"
        )
    async with pg.transaction():
        await pg.execute(insert)
    await pg.execute("SELECT pg_sleep(0.05)")  # a round trip, so notifications are flushed
    await asyncio.wait_for(received.get(), 5)
    await asyncio.wait_for(received.get(), 5)
    await listener.execute("SELECT 1")
    assert received.empty()  # exactly two: one per transaction, not one per row or statement
    await listener.close()


async def test_notify_setting_off_silences_the_trigger(
    database_url: str, pg: asyncpg.Connection
) -> None:
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(asyncpg_dsn(database_url))
    await listener.add_listener("outbox_events", lambda *a: received.put_nowait(a[3]))
    insert = "INSERT INTO outbox_events (id, topic, payload) VALUES (gen_random_uuid(), 't', '{}')"
    async with pg.transaction():
        await pg.execute("SET LOCAL outbox.notify = off")  # one transaction
        await pg.execute(insert)
    await pg.execute("SET outbox.notify = 'FALSE'")  # the session, any spelling of false
    async with pg.transaction():
        await pg.execute(insert)
    # Notifications arrive in commit order: the marker first means the inserts sent none.
    await pg.execute("SELECT pg_notify('outbox_events', 'marker')")
    assert await asyncio.wait_for(received.get(), 5) == "marker"
    await pg.execute("SET outbox.notify = on")
    async with pg.transaction():
        await pg.execute(insert)
    assert await asyncio.wait_for(received.get(), 5) == ""
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 3
    await listener.close()


async def test_at_most_two_transactions_notify_at_once(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """While two notifying transactions are in flight, a third commits without a NOTIFY (so
    it does not queue behind them on Postgres's notification lock); later ones notify."""
    received: asyncio.Queue[str] = asyncio.Queue()
    listener = await asyncpg.connect(asyncpg_dsn(database_url))
    await listener.add_listener("outbox_events", lambda *a: received.put_nowait(a[3]))
    insert = "INSERT INTO outbox_events (id, topic, payload) VALUES (gen_random_uuid(), 't', '{}')"
    first = await asyncpg.connect(asyncpg_dsn(database_url))
    second = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        for conn in (first, second):
            await conn.execute("BEGIN")
            await conn.execute(insert)  # each holds a notify slot until it ends
        async with pg.transaction():
            await pg.execute(insert)  # both slots taken: no NOTIFY
        # Notifications arrive in commit order: the marker first means the insert sent none.
        await pg.execute("SELECT pg_notify('outbox_events', 'marker')")
        assert await asyncio.wait_for(received.get(), 5) == "marker"
        await first.execute("COMMIT")
        assert await asyncio.wait_for(received.get(), 5) == ""
        async with pg.transaction():
            await pg.execute(insert)  # a slot is free again
        assert await asyncio.wait_for(received.get(), 5) == ""
        await second.execute("COMMIT")
        assert await asyncio.wait_for(received.get(), 5) == ""
        assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 4
    finally:
        for conn in (first, second, listener):
            await conn.close()


@pytest.mark.parametrize(
    ("column", "value"),
    # Not `bucket`: Postgres overwrites any value sent (tests/test_buckets.py).
    [("attempts", "-1"), ("topic", "''"), ("headers", "'[]'::jsonb")],
)
async def test_check_constraints(pg: asyncpg.Connection, column: str, value: str) -> None:
    columns = {"id": "gen_random_uuid()", "topic": "'t'", "payload": "'{}'", column: value}
    sql = f"INSERT INTO outbox_events ({', '.join(columns)}) VALUES ({', '.join(columns.values())})"
    with pytest.raises(asyncpg.CheckViolationError):
        await pg.execute(sql)


async def test_queue_table_vacuums_aggressively(pg: asyncpg.Connection) -> None:
    options = await pg.fetchval("SELECT reloptions FROM pg_class WHERE relname = 'outbox_events'")
    assert "autovacuum_vacuum_cost_delay=0" in options
    assert "autovacuum_vacuum_scale_factor=0.0" in options


async def claim_plan(pg: asyncpg.Connection, exclude: list[int]) -> str:
    """Every bucket leased to r1, ANALYZE, then EXPLAIN ANALYZE of r1's claim of 500."""
    await pg.execute(
        "UPDATE outbox_bucket_leases SET owner = 'r1', lease_until = now() + interval '1 hour'"
    )
    await pg.execute("ANALYZE")
    explain = "EXPLAIN (ANALYZE, BUFFERS) " + QUERIES["claim_batch"]
    return "\n".join(r[0] for r in await pg.fetch(explain, "r1", 500, exclude, 2**24, 0))


@pytest.mark.parametrize("waiting", [0, 200, 20_000])
async def test_claim_is_an_index_scan_whatever_waits(database_url: str, waiting: int) -> None:
    """The retry cliff: after ANALYZE, with rows of other keys waiting (retries, delays) and
    1,000 quarantined keys, the claim still walks the primary key in seq order and probes
    the small partial indexes, with the relay's planner settings."""
    pg = await asyncpg.connect(asyncpg_dsn(database_url), server_settings=PLANNER_SETTINGS)
    try:
        await pg.execute(
            "INSERT INTO outbox_events (id, topic, key, payload) "
            "SELECT gen_random_uuid(), 't', 'k' || (g % 1000), '{}' "
            "FROM generate_series(1, 200000) AS g"
        )
        await pg.execute(
            "INSERT INTO outbox_events (id, topic, key, payload, available_at, attempts) "
            "SELECT gen_random_uuid(), 't', 'w' || g, '{}', "
            "now() + interval '1 hour', 1 FROM generate_series(1, $1) AS g",
            waiting,
        )
        await pg.execute(
            "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, "
            "headers, created_at, attempts, first_failed_at, last_failed_at, error_class, "
            "error_message, relay_id, holds_key) "
            "SELECT gen_random_uuid(), -g, 't', 'q' || g, '{}', '{}', now(), 1, now(), now(), "
            "'E', 'e', 'r0', true FROM generate_series(1, 1000) AS g"
        )
        plan = await claim_plan(pg, exclude=list(range(501)))
    finally:
        await pg.close()
    assert "Index Scan using pk_outbox_events on outbox_events e" in plan, plan
    assert "Sort" not in plan, plan  # ordered by the index, no sort of the table
    assert "Seq Scan on outbox_events" not in plan, plan
    assert "rows=500 loops=1" in plan, plan
    # The per-key probes go to the partial indexes, once per row at most.
    assert "ix_outbox_events_waiting_key on outbox_events w_1" in plan, plan
    assert "ix_outbox_dead_letters_quarantine on outbox_dead_letters q" in plan, plan
    # The floor's "lowest waiting seq": one probe of its own partial index.
    assert "ix_outbox_events_waiting_seq on outbox_events f" in plan, plan


async def test_claim_asks_whether_any_row_is_not_due_in_one_probe(database_url: str) -> None:
    """20,000 waiting rows that are due already (a republished history, replayed dead
    letters) and one that is not: the claim's "is any row not due yet?" is a probe of
    ix_outbox_events_waiting_at from now(), not a read of every waiting row (4.9 ms a claim
    over 200,000 of them), and the per-key probe stays on ix_outbox_events_waiting_key."""
    pg = await asyncpg.connect(asyncpg_dsn(database_url), server_settings=PLANNER_SETTINGS)
    try:
        await pg.execute(
            "INSERT INTO outbox_events (id, topic, key, payload, created_at, available_at) "
            "SELECT gen_random_uuid(), 't', 'k' || (g % 1000), '{}', "
            "now() - interval '1 hour', now() FROM generate_series(1, 20000) AS g"
        )
        await pg.execute(
            "INSERT INTO outbox_events (id, topic, key, payload, available_at, attempts) "
            "VALUES (gen_random_uuid(), 't', 'later', '{}', now() + interval '1 hour', 1)"
        )
        plan = await claim_plan(pg, exclude=[])
    finally:
        await pg.close()
    assert "rows=500 loops=1" in plan, plan
    assert "Index Only Scan using ix_outbox_events_waiting_at on outbox_events w " in plan, plan
    assert "ix_outbox_events_waiting_key on outbox_events w_1" in plan, plan


async def test_claim_leaves_out_the_events_in_flight_through_a_hash(database_url: str) -> None:
    """A prefetched claim leaves out up to two batches in flight. As `seq <> ALL($3)` every
    row it walked was compared with every excluded seq: per claim of 500 with 1,000 excluded,
    6.9 ms against 2.6 ms with none, and quadratic in the batch size. As `NOT IN (SELECT
    unnest($3))` it is one hash built per claim. Checked in the generic plan, the one the
    relay's prepared claim runs after its first executions."""
    settings = {**PLANNER_SETTINGS, "plan_cache_mode": "force_generic_plan"}
    pg = await asyncpg.connect(asyncpg_dsn(database_url), server_settings=settings)
    try:
        await pg.execute("PREPARE claim AS " + QUERIES["claim_batch"])
        excluded = "{" + ",".join(str(s) for s in range(1, 1001)) + "}"
        plan = "\n".join(
            r[0]
            for r in await pg.fetch(
                f"EXPLAIN EXECUTE claim('r1', 500, '{excluded}'::bigint[], 16777216, 0)"
            )
        )
    finally:
        await pg.close()
    assert "hashed SubPlan" in plan, plan
    assert "<> ALL" not in plan, plan


def outbox_cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    """`outbox-relay ARGS`; in `cwd` when a relative SQLite path may be opened."""
    return subprocess.run(
        [sys.executable, "-m", "outbox.relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=cwd,
        check=False,
    )


async def test_migrations_up_down_up_and_match_models(empty_database_url: str) -> None:
    url = empty_database_url
    await asyncio.to_thread(migrate.upgrade, url)
    assert await migrate.current_revision(url) == migrate.head_revision()
    await asyncio.to_thread(migrate.downgrade, url, "base")
    assert await migrate.current_revision(url) is None
    conn = await asyncpg.connect(asyncpg_dsn(url))
    left = await conn.fetch(
        "SELECT tablename FROM pg_tables WHERE tablename LIKE 'outbox_%' "
        "AND tablename <> 'outbox_alembic_version'"
    )
    await conn.close()
    assert left == []
    await asyncio.to_thread(migrate.upgrade, url)

    engine = create_async_engine(sqlalchemy_async_url(url))

    def diff(sync_conn: Any) -> list[Any]:
        context = MigrationContext.configure(sync_conn, opts={"compare_type": True})
        return [
            d
            for d in compare_metadata(context, metadata)
            if not (d[0] == "remove_table" and d[1].name == "outbox_alembic_version")
        ]

    async with engine.connect() as conn:
        differences = await conn.run_sync(diff)
    await engine.dispose()
    assert differences == []


def check_constraints(conn: Any) -> dict[tuple[str, str], str]:
    """(table, name) -> the text of every CHECK constraint of the outbox tables, as the
    database keeps it (Postgres rewrites it, SQLite keeps it as written), whitespace folded.
    Alembic's compare_metadata does not compare CHECK constraints: this does, for both."""
    inspector = inspect(conn)
    return {
        (table, check["name"]): " ".join(check["sqltext"].split())
        for table in metadata.tables
        if inspector.has_table(table)
        for check in inspector.get_check_constraints(table)
    }


async def test_migrations_create_the_check_constraints_the_models_declare(
    database_url: str, empty_database_url: str
) -> None:
    """What compare_metadata cannot see: the CHECK constraints of `upgrade head` are those of
    the models (`metadata.create_all` into an empty database), as Postgres normalizes both."""

    async def checks(url: str, *, create: bool) -> dict[tuple[str, str], str]:
        engine = create_async_engine(sqlalchemy_async_url(url))
        try:
            async with engine.begin() as conn:
                if create:
                    await conn.run_sync(metadata.create_all)
                return await conn.run_sync(check_constraints)
        finally:
            await engine.dispose()

    migrated = await checks(database_url, create=False)
    declared = await checks(empty_database_url, create=True)
    assert migrated == declared
    assert ("outbox_events", "ck_outbox_events_headers_object") in migrated


async def test_migrate_cli(empty_database_url: str) -> None:
    url = empty_database_url
    check = await asyncio.to_thread(outbox_cli, "migrate", "--check", "--database-url", url)
    assert check.returncode == 1
    assert check.stderr.startswith("outbox-relay: error: database is at no revision")
    assert "Traceback" not in check.stderr
    up = await asyncio.to_thread(outbox_cli, "migrate", "--database-url", url)
    assert up.returncode == 0, up.stderr
    check = await asyncio.to_thread(outbox_cli, "migrate", "--check", "--database-url", url)
    assert check.returncode == 0
    assert "at head" in check.stdout
    sql = await asyncio.to_thread(outbox_cli, "migrate", "--sql")
    assert sql.returncode == 0
    assert "CREATE TABLE outbox_events" in sql.stdout
    assert "CREATE TRIGGER outbox_events_notify" in sql.stdout
    down = await asyncio.to_thread(
        outbox_cli, "migrate", "--downgrade", "base", "--database-url", url
    )
    assert down.returncode == 0, down.stderr
    bad = await asyncio.to_thread(outbox_cli, "migrate", "--database-url", "mysql://x")
    assert bad.returncode != 0
    assert len(bad.stderr.strip().splitlines()) == 1
    assert "database_url" in bad.stderr


async def test_enqueue_in_a_transaction_skips_sqlalchemy(
    database_url: str, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The fast path is the point of `enqueue`: once BEGIN is sent, the INSERT goes straight to
    asyncpg on the session's connection, and still commits or rolls back with the session."""
    sent: list[str] = []
    execute = asyncpg.Connection.execute

    async def spy(self: asyncpg.Connection, query: str, *args: Any, **kwargs: Any) -> str:
        sent.append(query)
        status: str = await execute(self, query, *args, **kwargs)
        return status

    engine = create_async_engine(sqlalchemy_async_url(database_url))
    async with engine.begin() as conn:
        await conn.run_sync(AppBase.metadata.create_all)
    monkeypatch.setattr(asyncpg.Connection, "execute", spy)
    for commit in (True, False):
        async with AsyncSession(engine) as session, session.begin():
            session.add(Order(status="placed"))
            await enqueue(session, topic="orders", key=f"commit-{commit}", payload={})
            if not commit:
                await session.rollback()
    await engine.dispose()
    assert [q for q in sent if q.startswith("INSERT")] == [INSERT_EVENT_SQL] * 2
    assert await pg.fetchval("SELECT array_agg(key) FROM outbox_events") == ["commit-True"]
    assert await pg.fetchval("SELECT count(*) FROM orders") == 1


PAYLOADS_AS_JSONB_RENDERS_THEM: list[Any] = [
    [1e300, -2.5e20, 1e16, 1.5e-7, 5e-324, 1.7976931348623157e308],
    {"tiny": 1.25e-10, "big": [9.99e99, 0.1, 123456789.125], "e": "1e+300 in a string"},
    [0, 1, -1, 10**40, 3.0, -0.0, 1e15],
]


@pytest.mark.parametrize("payload", PAYLOADS_AS_JSONB_RENDERS_THEM, ids=["floats", "mixed", "ints"])
async def test_payload_size_is_what_postgres_renders(
    pg: asyncpg.Connection, payload: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """jsonb writes numbers in full (1e300 as 301 digits): the limit counts that text."""
    from outbox import OutboxValidationError
    from outbox.validation import check_payload

    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "1")
    with pytest.raises(OutboxValidationError) as info:
        check_payload(payload)
    monkeypatch.delenv("OUTBOX_MAX_PAYLOAD_BYTES")
    _, text = check_payload(payload)
    rendered = await pg.fetchval("SELECT octet_length($1::jsonb::text)", text)
    assert f"is {rendered} bytes" in info.value.problem
