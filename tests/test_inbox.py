"""The inbox (outbox/inbox.py): a consumer applies each event once, however often it is
delivered: redelivered by the real relay through real Kafka and Redis to the FastStream
subscriber of examples/consume_inbox.py, and raced by two consumers on real Postgres."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import pytest
from faststream.kafka import KafkaBroker
from faststream.redis import RedisBroker
from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from outbox import OutboxEvent, OutboxValidationError, inbox
from outbox.envelope import Encoder
from outbox.models import InboxEntry, metadata
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from outbox.urls import sqlalchemy_async_url
from tests.helpers import commit_events, eventually, pg_relay
from tests.test_consumers import load_example

consume_inbox = load_example("consume_inbox")
Invoice = consume_inbox.Invoice
TIMEOUT = 60.0


@pytest.fixture
async def engine(database_url: str) -> AsyncIterator[AsyncEngine]:
    """The billing database: the outbox tables (migrated) and the example's `invoices`."""
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    async with engine.begin() as conn:
        await conn.run_sync(consume_inbox.BillingBase.metadata.create_all)
    yield engine
    await engine.dispose()


@pytest.fixture
def sessions(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    return async_sessionmaker(engine, expire_on_commit=False)


async def invoices(sessions: async_sessionmaker[AsyncSession]) -> list[tuple[int, uuid.UUID]]:
    async with sessions() as session:
        rows = await session.execute(select(Invoice.order_id, Invoice.event_id))
        return sorted((order_id, event_id) for order_id, event_id in rows)


async def inbox_rows(sessions: async_sessionmaker[AsyncSession]) -> int:
    async with sessions() as session:
        return (await session.execute(select(func.count()).select_from(InboxEntry))).scalar_one()


ORDER = consume_inbox.OrderPlaced(order_id=1, total_cents=4200)


# -- once: the transaction, and two consumers racing -------------------------------------------


@pytest.mark.postgres
async def test_once_is_fresh_until_the_changes_commit(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    event_id = str(uuid.uuid4())

    class HandlerFailedError(Exception):
        pass

    async def failing_handler() -> None:
        async with sessions() as session, inbox.once(session, event_id, consumer="billing") as f:
            assert f
            session.add(Invoice(order_id=1, total_cents=1, event_id=uuid.UUID(event_id)))
            raise HandlerFailedError

    with pytest.raises(HandlerFailedError):  # its changes and the inbox row roll back
        await failing_handler()
    assert await invoices(sessions) == []
    assert await consume_inbox.bill(sessions, ORDER, event_id)  # so a redelivery applies it
    assert not await consume_inbox.bill(sessions, ORDER, event_id)  # and the next one skips
    assert await invoices(sessions) == [(1, uuid.UUID(event_id))]

    async with sessions() as session, session.begin():  # a transaction of the caller's: joined
        assert await inbox.record(session, event_id, consumer="shipping")  # another consumer
        async with inbox.once(session, event_id, consumer="shipping") as fresh:
            assert not fresh
        await session.rollback()
    async with sessions() as session, inbox.once(session, event_id, consumer="shipping") as f:
        assert f  # the rollback took the row back


async def blocked_on_the_inbox(pg: asyncpg.Connection) -> bool:
    """A session of the test's database waits for a lock in its inbox INSERT."""
    waiting = await pg.fetchval(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
        "AND wait_event_type = 'Lock' AND query LIKE 'INSERT INTO outbox_inbox%'"
    )
    return bool(waiting)


@pytest.mark.postgres
@pytest.mark.parametrize("first_commits", [True, False])
async def test_two_consumers_racing_on_one_event_apply_it_once(
    sessions: async_sessionmaker[AsyncSession], pg: asyncpg.Connection, first_commits: bool
) -> None:
    """The second delivery's INSERT waits for the first's transaction: not fresh if it
    commits, fresh if it rolls back."""
    event_id = str(uuid.uuid4())
    async with (
        sessions() as session,
        session.begin(),
        inbox.once(session, event_id, consumer="billing") as fresh,
    ):
        assert fresh
        session.add(Invoice(order_id=1, total_cents=1, event_id=uuid.UUID(event_id)))
        await session.flush()
        second = asyncio.create_task(consume_inbox.bill(sessions, ORDER, event_id))
        await eventually(lambda: blocked_on_the_inbox(pg), timeout=TIMEOUT)
        assert not second.done()
        if not first_commits:
            await session.rollback()
    async with asyncio.timeout(TIMEOUT):
        assert await second is not first_commits
    assert len(await invoices(sessions)) == 1
    assert await inbox_rows(sessions) == 1


@pytest.mark.postgres
async def test_many_concurrent_deliveries_apply_once(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    event_id = str(uuid.uuid4())
    results = await asyncio.gather(
        *(consume_inbox.bill(sessions, ORDER, event_id) for _ in range(20))
    )
    assert sorted(results) == [False] * 19 + [True]
    assert await invoices(sessions) == [(1, uuid.UUID(event_id))]


@pytest.mark.postgres
async def test_bad_arguments_are_named(sessions: async_sessionmaker[AsyncSession]) -> None:
    async with sessions() as session:
        cases: list[tuple[str, uuid.UUID | str, str]] = [
            ("", uuid.uuid4(), "consumer"),
            ("x" * 256, uuid.uuid4(), "consumer"),
            ("billing", "not-a-uuid", "event_id"),
        ]
        for consumer, event_id, field in cases:
            with pytest.raises(OutboxValidationError) as caught:
                async with inbox.once(session, event_id, consumer=consumer):
                    pass
            assert caught.value.field == field
        with pytest.raises(OutboxValidationError, match="must be positive"):
            await inbox.prune(session, older_than=timedelta(0))


@pytest.mark.postgres
async def test_prune_deletes_by_age_and_consumer(
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    async with sessions() as session, session.begin():
        for consumer in ("billing", "shipping"):
            for _ in range(3):
                await inbox.record(session, uuid.uuid4(), consumer=consumer)
    later = datetime.now(UTC) + timedelta(days=8)
    async with sessions() as session, session.begin():
        assert await inbox.prune(session, older_than=timedelta(days=7)) == 0  # all are new
        assert (
            await inbox.prune(session, older_than=timedelta(days=7), consumer="billing", now=later)
            == 3
        )
    assert await inbox_rows(sessions) == 3
    async with sessions() as session, session.begin():
        assert await inbox.prune(session, older_than=timedelta(days=7), now=later) == 3
    assert await inbox_rows(sessions) == 0


# -- redelivery through the real relay, Kafka and Redis, to the FastStream subscriber ----------


async def publish_twice(
    database_url: str, topic: str, publisher: KafkaPublisher | RedisPublisher
) -> list[OutboxEvent]:
    """Three orders, each published twice with its id: what a relay that crashed after the
    broker's acknowledgement and before the delete sends."""
    events = [
        OutboxEvent(topic=topic, key=f"order-{n}", payload={"order_id": n, "total_cents": n * 100})
        for n in (1, 2, 3)
    ]
    for attempt in range(2):
        copies = [OutboxEvent(topic=e.topic, key=e.key, payload=e.payload, id=e.id) for e in events]
        await commit_events(database_url, copies)
        drained = await pg_relay(database_url, publisher).drain()
        assert drained.delivered == len(events), attempt
    return events


class Billed:
    """What the subscriber reported: (event id, fresh) per delivery."""

    def __init__(self, count: int) -> None:
        self.got: list[tuple[str, bool]] = []
        self.count = count
        self.enough = asyncio.Event()

    async def on_billed(self, event_id: str, fresh: bool) -> None:
        self.got.append((event_id, fresh))
        if len(self.got) >= self.count:
            self.enough.set()

    async def run(self, broker: KafkaBroker | RedisBroker) -> None:
        async with asyncio.timeout(TIMEOUT):
            await broker.start()
            try:
                await self.enough.wait()
            finally:
                await broker.stop()


async def check_billed_once(
    billed: Billed, events: list[OutboxEvent], sessions: async_sessionmaker[AsyncSession]
) -> None:
    assert sorted(billed.got) == sorted(
        [(str(e.id), True) for e in events] + [(str(e.id), False) for e in events]
    )
    assert await invoices(sessions) == sorted((e.payload["order_id"], e.id) for e in events)
    assert await inbox_rows(sessions) == len(events)


@pytest.mark.postgres
@pytest.mark.kafka
async def test_faststream_kafka_subscriber_bills_redelivered_events_once(
    database_url: str,
    kafka_bootstrap: str,
    topic: str,
    sessions: async_sessionmaker[AsyncSession],
) -> None:
    publisher = KafkaPublisher(kafka_bootstrap, encoder=Encoder("faststream"))
    events = await publish_twice(database_url, topic, publisher)
    billed = Billed(2 * len(events))
    broker = consume_inbox.kafka_broker(
        kafka_bootstrap, topic, "billing", sessions, billed.on_billed
    )
    await billed.run(broker)
    await check_billed_once(billed, events, sessions)


@pytest.mark.postgres
@pytest.mark.redis
async def test_faststream_redis_subscriber_bills_redelivered_events_once(
    database_url: str, redis_url: str, topic: str, sessions: async_sessionmaker[AsyncSession]
) -> None:
    publisher = RedisPublisher(redis_url, encoder=Encoder("faststream"))
    events = await publish_twice(database_url, topic, publisher)
    billed = Billed(2 * len(events))
    broker = consume_inbox.redis_broker(redis_url, topic, "billing", sessions, billed.on_billed)
    await billed.run(broker)
    await check_billed_once(billed, events, sessions)


@pytest.mark.unit
async def test_once_and_prune_on_sqlite(tmp_path: Path) -> None:
    """The inbox works in a SQLite database too (a consumer's local store, tests)."""
    engine = create_async_engine(f"sqlite+aiosqlite:///{tmp_path / 'inbox.db'}")
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
        sessions = async_sessionmaker(engine)
        event_id = uuid.uuid4()
        fresh = []
        for _ in range(2):
            async with sessions() as session, inbox.once(session, event_id, consumer="c") as f:
                fresh.append(f)
        assert fresh == [True, False]
        later = datetime.now(UTC) + timedelta(days=8)
        async with sessions() as session, session.begin():
            assert await inbox.prune(session, older_than=timedelta(days=7)) == 0
            assert await inbox.prune(session, older_than=timedelta(days=7), now=later) == 1
    finally:
        await engine.dispose()
