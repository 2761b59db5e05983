"""A real failover: the primary crashes under load, and its synchronous standby is promoted.

Two servers of our own (tests/pg_cluster.py), streaming replication, and a database URL that
lists both with `target_session_attrs=read-write`, as docs/operations.md "Postgres outages and
failover" tells users to write it. Writers commit events one transaction at a time while the
relay publishes them; the primary is killed (`pg_ctl stop -m immediate`) and the standby
promoted. Every event a writer saw committed is published, nothing is dead-lettered, and the
order of each key holds.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections import Counter

import asyncpg
import pytest
import structlog
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import OutboxEvent
from outbox.relay import migrate
from outbox.relay.relay import Relay
from outbox.relay.stores.postgres import PostgresStore
from outbox.urls import async_engine
from tests.fakes import RecordingPublisher
from tests.helpers import assert_per_key_order, eventually, first_seen_order
from tests.kafka_broker import free_port_run
from tests.pg_cluster import PgCluster, clusters_available

pytestmark = [pytest.mark.postgres, pytest.mark.slow]

KEYS = 4
#: What a writer sees while the primary is gone: its connection dropped, or none to open.
OUTAGE = (
    DBAPIError,
    OSError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)


class Writers:
    """One writer per key, each committing one event per transaction through the URL of both
    servers. `committed`: the events whose commit returned; an event whose commit raised may
    or may not be there (its outcome is unknown), and is not counted."""

    def __init__(self, url: str) -> None:
        self.engine = async_engine(url, pool_pre_ping=True)
        self.committed: set[uuid.UUID] = set()
        self.failed: Counter[str] = Counter()

    async def write(self, key: str, stop: asyncio.Event) -> None:
        n = 0
        while not stop.is_set():
            event = OutboxEvent(topic="failover", key=key, payload={"n": n})
            n += 1
            try:
                async with (
                    AsyncSession(self.engine, expire_on_commit=False) as session,
                    session.begin(),
                ):
                    session.add(event)
            except OUTAGE as exc:  # the primary is gone: try again, as applications do
                self.failed[type(exc).__name__] += 1
                await asyncio.sleep(0.05)
                continue
            self.committed.add(event.id)
            await asyncio.sleep(0.01)


async def outbox_empty(url: str) -> bool:
    conn = await asyncpg.connect(url)
    try:
        return not await conn.fetchval("SELECT count(*) FROM outbox_events")
    finally:
        await conn.close()


async def test_a_primary_that_crashes_fails_over_to_its_standby_and_loses_nothing() -> None:
    if not clusters_available():
        pytest.skip("needs root and PostgreSQL's binaries (run scripts/services.sh up)")
    port = free_port_run(2, 55432)
    primary = PgCluster("primary", port)
    standby = PgCluster("standby", port + 1)
    try:
        await asyncio.to_thread(primary.init_primary)
        await asyncio.to_thread(primary.start)
        conn = await asyncpg.connect(primary.url())
        try:
            await conn.execute("CREATE DATABASE outbox")
            await asyncio.to_thread(migrate.upgrade, primary.url("outbox"))
            await asyncio.to_thread(standby.init_standby_of, primary)
            await asyncio.to_thread(standby.start)
            # From now on commits wait for the standby: what a writer saw committed survives.
            await conn.execute("ALTER SYSTEM SET synchronous_standby_names = 'standby'")
            await conn.execute("SELECT pg_reload_conf()")
        finally:
            await conn.close()
        both = (
            f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}"
            "/outbox?target_session_attrs=read-write"
        )
        publisher = RecordingPublisher()
        relay = Relay(
            PostgresStore(both, lease_seconds=3.0),
            publisher,
            relay_id="failover",
            batch_size=20,
            poll_interval=0.2,
            lease_seconds=3.0,
        )
        writers = Writers(both)
        stop = asyncio.Event()
        task = asyncio.create_task(relay.run())
        writing = [asyncio.create_task(writers.write(f"key-{k}", stop)) for k in range(KEYS)]
        with structlog.testing.capture_logs() as logged:
            try:
                await relay.wait_for(lambda s: s.delivered >= 100, timeout=60)
                await asyncio.to_thread(primary.stop, "immediate")
                await asyncio.to_thread(standby.promote)
                delivered = relay.stats.delivered
                await relay.wait_for(lambda s: s.delivered >= delivered + 100, timeout=60)
                stop.set()
                await asyncio.gather(*writing)
                # every event whose commit returned, and then nothing left to claim (an
                # event whose commit raised may be there too)
                await relay.wait_for(
                    lambda _: writers.committed <= {e.id for e in publisher.published},
                    timeout=60,
                )
                await eventually(lambda: outbox_empty(standby.url("outbox")), timeout=30)
            finally:
                stop.set()
                for w in writing:
                    w.cancel()
                await asyncio.gather(*writing, return_exceptions=True)
                relay.request_stop()
                await task  # raises if the relay crashed
                await writers.engine.dispose()
        conn = await asyncpg.connect(standby.url("outbox"))
        try:
            assert not await conn.fetchval("SELECT pg_is_in_recovery()")
            dead = await conn.fetchval("SELECT count(*) FROM outbox_dead_letters")
            left = await conn.fetchval("SELECT count(*) FROM outbox_events")
        finally:
            await conn.close()
    finally:
        for cluster in (standby, primary):
            with contextlib.suppress(Exception):
                await asyncio.to_thread(cluster.cleanup)
    published = {e.id for e in publisher.published}
    print(
        f"\n[failover] committed {len(writers.committed)}, published {len(published)}"
        f" ({len(publisher.published) - len(published)} again),"
        f" writes failed {dict(writers.failed)}, relay store failures {relay.stats.store_failures}"
    )
    assert writers.committed <= published
    assert (dead, left) == (0, 0)
    assert writers.failed.total() > 0  # the writers did see the failover
    assert any(e["event"] == "store_unavailable" for e in logged)
    assert_per_key_order(first_seen_order(publisher.published))
