"""The store where it really fails: Postgres connections killed while the relay's queries run,
statements cancelled by a statement timeout, and the role's connection limit reached. The
relay backs off and goes on; it never crashes and never loses or reorders an event."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Sequence
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import structlog
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import OutboxEvent
from outbox.relay.relay import Relay
from outbox.relay.retry import CircuitBreaker
from outbox.relay.seams import Claim, Position
from outbox.relay.sql import QUERIES
from outbox.relay.stores.postgres import PostgresStore
from outbox.urls import asyncpg_dsn, sqlalchemy_async_url
from tests.fakes import RecordingPublisher
from tests.helpers import (
    assert_per_key_order,
    commit_events,
    eventually,
    first_seen_order,
    keyed_events,
    pg_relay,
)
from tests.tcp_proxy import SilentProxy

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


class KillsAJoinedDelete(PostgresStore):
    """Terminates the relay's backend in the middle of the first delete that carries the
    events of more than one claim: the test holds a lock on one of its rows, so the statement
    waits in Postgres, and its backend is terminated while it waits."""

    def __init__(self, database_url: str) -> None:
        super().__init__(database_url, lease_seconds=3.0)
        self.database_url = database_url
        self.claimed: list[set[int]] = []
        self.killed_at: list[int] = []

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        claim = await super().claim(limit, exclude, after)
        self.claimed.append({e.seq for e in claim.events})
        return claim

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        joined = not any(set(seqs) <= claimed for claimed in self.claimed)
        if not joined or self.killed_at:
            return await super().mark_delivered(seqs, positions)
        self.killed_at = list(seqs)
        locker = await asyncpg.connect(asyncpg_dsn(self.database_url))
        try:
            async with locker.transaction():
                await locker.execute(
                    "SELECT 1 FROM outbox_events WHERE seq = $1 FOR UPDATE", seqs[-1]
                )
                deleting = asyncio.create_task(super().mark_delivered(seqs, positions))

                async def waiting_pid() -> int | None:
                    pid: int | None = await locker.fetchval(
                        "SELECT pid FROM pg_stat_activity WHERE wait_event_type = 'Lock'"
                        " AND application_name LIKE 'outbox-relay%'"
                    )
                    return pid

                async def blocked() -> bool:
                    return await waiting_pid() is not None

                await eventually(blocked, timeout=5, every=0.01)
                assert await locker.fetchval("SELECT pg_terminate_backend($1)", await waiting_pid())
                return await deleting  # raises: the connection is gone mid-statement
        finally:
            await locker.close()


async def test_a_connection_dropped_under_the_deletes_that_go_together(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """At a low rate the deletes of several one-event batches wait for each other and go as
    one statement (relay/relay.py, SETTLE_LINGER). The connection dropped under that statement:
    every event of those batches is published again, nothing is dead-lettered, each key keeps
    its order, and the relay goes on."""
    store = KillsAJoinedDelete(database_url)
    publisher = RecordingPublisher()
    relay = Relay(
        store,
        publisher,
        relay_id=f"test-{uuid.uuid4().hex[:6]}",
        poll_interval=0.2,
        lease_seconds=3.0,
        settle_linger=0.5,
    )
    relay._breaker = CircuitBreaker(base_seconds=0.01, max_seconds=0.05)
    task = asyncio.create_task(relay.run())
    events: list[OutboxEvent] = []
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    try:
        await relay.wait_for(lambda s: s.owned_buckets > 0, timeout=10)
        for n in range(2000):  # one event a transaction, until two claims' deletes go together
            event = OutboxEvent(topic="t", key=f"key-{n % 4}", payload={"n": n})
            async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
                session.add(event)
            events.append(event)
            if store.killed_at:
                break
        assert store.killed_at, "no delete carried two claims' events"
        await relay.wait_for(lambda s: s.idle and s.delivered >= len(events), timeout=30)
    finally:
        relay.request_stop()
        await engine.dispose()
        await task  # raises if the relay crashed
    assert relay.stats.store_failures >= 1
    assert relay.stats.dead_lettered == 0
    assert not await pg.fetchval("SELECT count(*) FROM outbox_dead_letters")
    assert not await pg.fetchval("SELECT count(*) FROM outbox_events")
    published = [e.seq for e in publisher.published]
    assert all(published.count(seq) >= 2 for seq in store.killed_at)  # sent again
    assert {e.id for e in publisher.published} == {e.id for e in events}
    assert_per_key_order(first_seen_order(publisher.published))


async def test_a_database_that_refuses_writes_is_an_outage_and_its_connections_are_replaced(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """The server refuses the relay's writes (SQLSTATE 25006, read_only_sql_transaction), as
    the connections still open to a primary that a failover turned into a standby do, or a
    managed Postgres put in read-only mode when its disk fills. Here the database's
    `default_transaction_read_only` is turned on, and the relay's connections are dropped, so
    the ones it opens again refuse every write, for as long as they live. The relay backs off
    without crashing, and replaces those connections: once writes are accepted again, it goes
    on, with nothing lost or dead-lettered and the order of each key kept."""
    dbname = database_url.rsplit("/", 1)[1]
    before = keyed_events("t", keys=5, per_key=10)
    after = keyed_events("t", keys=5, per_key=10)
    await commit_events(database_url, before)
    publisher = RecordingPublisher()
    relay = pg_relay(database_url, publisher, batch_size=10)
    task = asyncio.create_task(relay.run())
    with structlog.testing.capture_logs() as logged:
        try:
            await relay.wait_for(lambda s: s.delivered == len(before), timeout=30)
            await pg.execute(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
            for row in await pg.fetch(RELAY_BACKENDS, dbname):
                await pg.execute("SELECT pg_terminate_backend($1)", row["pid"])

            def refused() -> int:
                return sum(
                    e["event"] == "store_unavailable" and "read-only" in e["error"] for e in logged
                )

            await relay.wait_for(lambda _: refused() >= 2, timeout=30)
            await pg.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
            await commit_events(database_url, after)
            await relay.wait_for(lambda s: s.delivered == len(before) + len(after), timeout=30)
        finally:
            await pg.execute(f'ALTER DATABASE "{dbname}" RESET default_transaction_read_only')
            relay.request_stop()
            await task  # raises if the relay crashed
    assert not await pg.fetchval("SELECT count(*) FROM outbox_events")
    assert not await pg.fetchval("SELECT count(*) FROM outbox_dead_letters")
    assert {e.id for e in publisher.published} == {e.id for e in [*before, *after]}
    assert_per_key_order(first_seen_order(publisher.published))


async def test_connections_that_the_network_forgets_are_given_up_in_seconds(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """A firewall, NAT gateway or load balancer between the relay and Postgres forgets the
    relay's connections (an idle timeout, a restart): their packets are dropped from then on,
    with no FIN and no RST (tests/tcp_proxy.py). The kernel would give up on them after about
    15 minutes of retransmissions, and the relay with them. It gives up on a statement with
    no answer after `database_timeout` instead, opens new connections, and goes on."""
    proxy = SilentProxy(urlsplit(database_url).port or 5432)
    await proxy.start()
    before = keyed_events("t", keys=5, per_key=10)
    after = keyed_events("t", keys=5, per_key=10)
    await commit_events(database_url, before)
    publisher = RecordingPublisher()
    relay = pg_relay(proxy.url(database_url), publisher, batch_size=10, database_timeout=2.0)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.delivered == len(before), timeout=30)
        proxy.forget()
        await commit_events(database_url, after)  # not through the proxy
        await relay.wait_for(lambda s: s.delivered == len(before) + len(after), timeout=30)
    finally:
        relay.request_stop()
        await task  # raises if the relay crashed
        await proxy.stop()
    assert proxy.forgotten >= 5  # the pool's connections and the LISTEN connection
    assert relay.stats.store_failures >= 1
    assert not await pg.fetchval("SELECT count(*) FROM outbox_events")
    assert {e.id for e in publisher.published} == {e.id for e in [*before, *after]}
    assert_per_key_order(first_seen_order(publisher.published))


async def test_a_relay_whose_connections_the_network_forgot_still_stops(
    database_url: str,
) -> None:
    """Stopping writes the last deletes and gives the leases back: on connections that the
    network forgot, each gives up after `database_timeout`, and the relay stops (what it could
    not delete is published again by the next relay; its leases expire)."""
    proxy = SilentProxy(urlsplit(database_url).port or 5432)
    await proxy.start()
    events = keyed_events("t", keys=5, per_key=10)
    await commit_events(database_url, events)
    relay = pg_relay(proxy.url(database_url), RecordingPublisher(), database_timeout=2.0)
    relay.shutdown_timeout = 2.0
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.delivered == len(events), timeout=30)
        proxy.forget()
        relay.request_stop()
        # the loop's last deletes and the lease release: each gives up after 2 s
        await asyncio.wait_for(asyncio.shield(task), timeout=15)
    finally:
        relay.request_stop()
        await proxy.stop()
        await task


def test_the_schema_head_the_store_knows_is_the_newest_migration() -> None:
    from outbox.relay.migrate import head_revision
    from outbox.relay.stores.postgres import SCHEMA_HEAD

    assert head_revision() == SCHEMA_HEAD


async def test_a_relay_on_a_database_not_migrated_to_head_says_so(
    empty_database_url: str,
) -> None:
    """A package upgraded without `outbox-relay migrate`: the relay runs on (what needs a
    newer migration says so itself), and warns once at start."""
    from outbox.relay import migrate

    await asyncio.to_thread(migrate.upgrade, empty_database_url, "0007")
    for expected in ("schema_behind", None):
        store = PostgresStore(empty_database_url)
        with structlog.testing.capture_logs() as logged:
            await store.start("schema")
            await store.stop()
        said = [e for e in logged if e["event"].startswith("schema_")]
        if expected is None:
            assert said == []
        else:
            assert said == [
                {
                    "event": "schema_behind",
                    "revision": "0007",
                    "head": migrate.head_revision(),
                    "hint": "run `outbox-relay migrate`",
                    "log_level": "warning",
                }
            ]
            await asyncio.to_thread(migrate.upgrade, empty_database_url)
