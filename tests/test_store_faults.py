"""The store where it really fails: Postgres connections killed while the relay's queries run,
statements cancelled by a statement timeout, and the role's connection limit reached. The
relay backs off and goes on; it never crashes and never loses or reorders an event."""

from __future__ import annotations

import asyncio
import uuid
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest

from outbox.relay.retry import CircuitBreaker
from outbox.relay.sql import QUERIES
from outbox.relay.stores.postgres import PostgresStore
from outbox.urls import asyncpg_dsn
from tests.fakes import RecordingPublisher
from tests.helpers import (
    assert_per_key_order,
    commit_events,
    eventually,
    first_seen_order,
    keyed_events,
    pg_relay,
)

pytestmark = pytest.mark.postgres

RELAY_BACKENDS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = $1 AND application_name LIKE 'outbox-relay%'"
)


async def killer(database_url: str, *, active_only: bool, every: float) -> int:
    """Terminate the relay's backends (only while they run a query, with `active_only`) until
    cancelled; returns how many it killed."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    dbname = database_url.rsplit("/", 1)[1]
    query = RELAY_BACKENDS + (" AND state = 'active'" if active_only else "")
    killed = 0
    try:
        while True:
            for row in await conn.fetch(query, dbname):
                killed += bool(await conn.fetchval("SELECT pg_terminate_backend($1)", row["pid"]))
            await asyncio.sleep(every)
    except asyncio.CancelledError:
        return killed
    finally:
        await conn.close()


async def test_connections_killed_mid_query_on_a_busy_relay(
    database_url: str, pg: asyncpg.Connection
) -> None:
    events = keyed_events("t", keys=50, per_key=200)  # 10,000 events
    await commit_events(database_url, events)
    publisher = RecordingPublisher()
    relay = pg_relay(database_url, publisher, batch_size=50)
    relay._breaker = CircuitBreaker(base_seconds=0.01, max_seconds=0.05)
    task = asyncio.create_task(relay.run())
    kills = asyncio.create_task(killer(database_url, active_only=True, every=0.005))
    try:
        await relay.wait_for(lambda s: s.store_failures >= 5, timeout=60)
        kills.cancel()
        killed = await kills
        await relay.wait_for(lambda s: s.idle and s.delivered >= len(events), timeout=60)
    finally:
        kills.cancel()
        relay.request_stop()
        await task  # raises if the relay crashed
    assert killed >= 5
    assert not await pg.fetchval("SELECT count(*) FROM outbox_events")
    assert {e.id for e in publisher.published} == {e.id for e in events}
    # First arrivals: a batch whose deletes were killed is published again, possibly after the
    # next batch went out (at-least-once; docs/operations.md "Delivery guarantees").
    assert_per_key_order(first_seen_order(publisher.published))


async def test_statement_timeout_and_connection_limit_are_outages_not_crashes(
    database_url: str, pg: asyncpg.Connection
) -> None:
    events = keyed_events("t", keys=5, per_key=20)
    await commit_events(database_url, events)
    dbname = database_url.rsplit("/", 1)[1]
    # A role of its own (the test server's `outbox` role is a superuser, whom no connection
    # limit binds), with what a relay needs.
    role = f"relay_{uuid.uuid4().hex[:8]}"
    await pg.execute(f"CREATE ROLE {role} LOGIN PASSWORD 'relay'")
    await pg.execute(
        f"GRANT SELECT, INSERT, UPDATE, DELETE ON ALL TABLES IN SCHEMA public TO {role}"
    )
    await pg.execute(f"GRANT USAGE ON ALL SEQUENCES IN SCHEMA public TO {role}")
    parts = urlsplit(database_url)
    relay_url = urlunsplit(parts._replace(netloc=f"{role}:relay@{parts.hostname}:{parts.port}"))
    # Every statement of the role times out at once.
    await pg.execute(f"ALTER ROLE {role} SET statement_timeout = 1")
    publisher = RecordingPublisher()
    relay = pg_relay(relay_url, publisher, batch_size=10)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.store_failures >= 2, timeout=30)
        assert relay.stats.delivered == 0
        # Then the role may open no connection, and its connections are dropped.
        await pg.execute(f"ALTER ROLE {role} RESET statement_timeout")
        await pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT 0")
        for row in await pg.fetch(RELAY_BACKENDS, dbname):
            await pg.execute("SELECT pg_terminate_backend($1)", row["pid"])
        failures = relay.stats.store_failures
        await relay.wait_for(lambda s: s.store_failures >= failures + 2, timeout=30)
        await pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        await relay.wait_for(lambda s: s.delivered == len(events), timeout=60)
    finally:
        relay.request_stop()
        await task
        await pg.execute(f"ALTER ROLE {role} CONNECTION LIMIT -1")
        for row in await pg.fetch("SELECT pid FROM pg_stat_activity WHERE usename = $1", role):
            await pg.execute("SELECT pg_terminate_backend($1)", row["pid"])
        await pg.execute(f"REVOKE ALL ON ALL TABLES IN SCHEMA public FROM {role}")
        await pg.execute(f"REVOKE ALL ON ALL SEQUENCES IN SCHEMA public FROM {role}")
        await pg.execute(f"DROP ROLE {role}")
    assert_per_key_order(publisher.published)
    assert {e.id for e in publisher.published} == {e.id for e in events}


async def test_a_terminated_listen_connection_is_replaced_at_once(database_url: str) -> None:
    """The server closing the LISTEN connection (pg_terminate_backend, a restart) is noticed
    when it happens, not at the next 5 s ping: NOTIFYs were lost until then, and a relay
    stopped before the ping never noticed at all."""
    store = PostgresStore(database_url, lease_seconds=30)
    await store.start("listen-1")
    woken = asyncio.Event()
    store.on_new_events(woken.set)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    listeners: list[int] = []

    async def listening() -> bool:
        pid = await conn.fetchval(
            "SELECT pid FROM pg_stat_activity WHERE application_name = $1",
            "outbox-relay listen listen-1",
        )
        if pid is not None and pid not in listeners:
            listeners.append(pid)
        return pid is not None

    async def replaced() -> bool:
        return await listening() and len(listeners) > 1

    try:
        await eventually(listening, timeout=10)
        woken.clear()
        assert await conn.fetchval("SELECT pg_terminate_backend($1)", listeners[0])
        # back within the first reconnect pause (0.5 s), well before a ping would notice
        await eventually(replaced, timeout=2.5)
        await asyncio.wait_for(woken.wait(), 2.5)  # it wakes the loop: NOTIFYs were missed
    finally:
        await conn.close()
        await store.stop()


async def test_the_pool_opens_every_connection_at_start_with_the_claim_prepared(
    database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The first busy moment (a claim, the last batch's delete and the prefetch at once) used
    to open connections and prepare the claim on each: 8 ms of connecting and 7-8 ms of a
    first claim, most of a latency run's slowest 1 %. Now all of it happens at start."""
    prepared: list[str] = []
    real_prepare = asyncpg.Connection.prepare

    async def recording_prepare(self: asyncpg.Connection, query: str, **kw: object) -> object:
        prepared.append(query)
        return await real_prepare(self, query, **kw)

    monkeypatch.setattr(asyncpg.Connection, "prepare", recording_prepare)
    store = PostgresStore(database_url, lease_seconds=30, pool_size=3)
    await store.start("warm-1")
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        backends = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'outbox-relay warm-1'"
        )
        assert backends == 3  # not 1, with the rest opened when first needed
        assert prepared.count(QUERIES["claim_batch"]) == 3
        assert prepared.count(QUERIES["delete_delivered"]) == 3
    finally:
        await conn.close()
        await store.stop()


async def test_a_store_call_is_one_statement_with_no_pool_reset_after_it(
    database_url: str,
) -> None:
    """asyncpg's pool ran its reset query (`SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`) on every release: a second round trip after each claim and each
    delete, 3.3 statements per event at 100 events/s. The relay's connections keep no cursors,
    LISTENs, settings or session locks, so a release sends nothing."""
    await commit_events(database_url, keyed_events("reset", keys=3, per_key=2))
    store = PostgresStore(database_url, lease_seconds=30, pool_size=2)
    await store.start("lean-1")
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await store.maintain_leases(rebalance=True)
        claim = await store.claim(10)
        assert len(claim.events) == 6
        assert await store.mark_delivered([e.seq for e in claim.events]) == 6
        last = await conn.fetch(
            "SELECT query FROM pg_stat_activity WHERE application_name = 'outbox-relay lean-1'"
        )
        assert len(last) == 2
        assert not [r["query"] for r in last if "pg_advisory_unlock_all" in r["query"]]
        # A transaction a caller left open is still rolled back on release (asyncpg does that).
        async with store.pool.acquire() as held:
            await held.execute("BEGIN")
            await held.execute("SET LOCAL statement_timeout = 1")
        assert await store.pool.fetchval("SELECT current_setting('statement_timeout')") != "1ms"
        assert (await store.claim(10)).events == []
    finally:
        await conn.close()
        await store.stop()
