"""One behavioural suite, two stores: SQLite and Postgres must claim, retry, dead-letter and
keep per-key order the same way, so they cannot drift apart."""

from __future__ import annotations

import json
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from pydantic import BaseModel
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import DeadLetter, OutboxEvent, OutboxValidationError, enqueue
from outbox.envelope import Envelope
from outbox.relay.ordering import PoisonPolicy
from outbox.relay.relay import Relay
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import Dead, Retry, Store
from outbox.relay.stores.postgres import PostgresStore
from outbox.relay.stores.sqlite import SqliteStore
from outbox.relay.testing import FaultInjector
from outbox.urls import sqlalchemy_async_url
from tests.fakes import RecordingPublisher, migrated_sqlite


@dataclass
class Backend:
    url: str
    store: Store

    async def add(self, *events: OutboxEvent) -> list[OutboxEvent]:
        engine = create_async_engine(sqlalchemy_async_url(self.url))
        async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
            session.add_all(events)
        await engine.dispose()
        return list(events)

    async def dead_letters(self) -> list[DeadLetter]:
        engine = create_async_engine(sqlalchemy_async_url(self.url))
        async with AsyncSession(engine) as session:
            rows = list((await session.scalars(select(DeadLetter))).all())
        await engine.dispose()
        return rows


async def started(url: str, store: Store) -> AsyncIterator[Backend]:
    await store.start("contract")
    assert await store.maintain_leases(rebalance=True) == 64
    yield Backend(url, store)
    await store.stop()


@pytest.fixture
async def sqlite_backend(tmp_path: Path) -> AsyncIterator[Backend]:
    url = await migrated_sqlite(tmp_path / "outbox.db")
    async for backend in started(url, SqliteStore(url)):
        yield backend


@pytest.fixture
async def postgres_backend(database_url: str) -> AsyncIterator[Backend]:
    async for backend in started(database_url, PostgresStore(database_url, lease_seconds=30)):
        yield backend


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def backend(request: pytest.FixtureRequest) -> Backend:
    found: Backend = request.getfixturevalue(f"{request.param}_backend")
    return found


class Payload(BaseModel):
    n: int


def event(key: str | None, n: int, **kw: object) -> OutboxEvent:
    return OutboxEvent(topic="orders", key=key, payload={"n": n}, **kw)  # type: ignore[arg-type]


async def test_claim_in_sequence_order_with_payload_and_headers(backend: Backend) -> None:
    added = await backend.add(
        event("a", 1),
        event("b", 2),
        event(None, 3),
        event("a", 4, headers={"h": "v"}, event_type="T"),
    )
    claimed = (await backend.store.claim(10)).events
    assert [e.id for e in claimed] == [e.id for e in added]
    assert [json.loads(e.payload) for e in claimed] == [{"n": n} for n in (1, 2, 3, 4)]
    assert claimed[3].headers == {"h": "v"}
    assert claimed[3].event_type == "T"
    assert [e.attempts for e in claimed] == [0, 0, 0, 0]
    assert len(await backend.store.claim(2)) == 2


async def test_delivered_events_are_deleted(backend: Backend) -> None:
    await backend.add(event("a", 1), event("a", 2))
    claimed = (await backend.store.claim(10)).events
    assert await backend.store.mark_delivered([claimed[0].seq]) == 1
    assert [e.seq for e in (await backend.store.claim(10)).events] == [claimed[1].seq]


async def test_a_retry_holds_back_its_key_only(backend: Backend) -> None:
    a1, b1, a2, free = await backend.add(
        event("a", 1), event("b", 1), event("a", 2), event(None, 1)
    )
    first = (await backend.store.claim(1)).events[0]
    assert first.id == a1.id
    assert await backend.store.schedule_retries([Retry(first.seq, 3600, "Boom: x")]) == 1
    assert [e.id for e in (await backend.store.claim(10)).events] == [b1.id, free.id]
    # Due again (a zero delay): the key flows in order, with the attempt counted.
    assert await backend.store.schedule_retries([Retry(first.seq, 0, "Boom: y")]) == 1
    claimed = (await backend.store.claim(10)).events
    assert [e.id for e in claimed] == [a1.id, b1.id, a2.id, free.id]
    assert claimed[0].attempts == 2


async def test_a_delayed_event_holds_back_later_events_of_its_key(backend: Backend) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    _, a2, b1 = await backend.add(event("a", 1, available_at=later), event("a", 2), event("b", 1))
    assert [e.id for e in (await backend.store.claim(10)).events] == [b1.id]
    assert a2.id not in {e.id for e in (await backend.store.claim(10)).events}


async def test_dead_letters_keep_the_event_and_the_error(backend: Backend) -> None:
    (poison,) = await backend.add(event("a", 1, headers={"h": "v"}, event_type="Bad"))
    claimed = (await backend.store.claim(1)).events
    await backend.store.schedule_retries([Retry(claimed[0].seq, 0, "Flaky: once")])
    claimed = (await backend.store.claim(1)).events
    moved = await backend.store.move_to_dead_letters(
        [Dead(claimed[0].seq, "MessageRejected", "too big")]
    )
    assert moved == 1
    assert not await backend.store.claim(10)
    (row,) = await backend.dead_letters()
    assert row.event_id == poison.id
    assert (row.topic, row.key, row.payload, row.headers, row.event_type) == (
        "orders",
        "a",
        {"n": 1},
        {"h": "v"},
        "Bad",
    )
    assert row.attempts == 2
    assert (row.error_class, row.error_message, row.relay_id) == (
        "MessageRejected",
        "too big",
        "contract",
    )
    assert row.first_failed_at <= row.last_failed_at


async def test_the_relay_behaves_the_same_on_both(backend: Backend) -> None:
    added = await backend.add(*[event(f"k{i % 3}", i) for i in range(12)])
    recorder = RecordingPublisher()
    publisher = FaultInjector.scripted(recorder, poison={added[4].id})
    relay = Relay(
        backend.store,
        publisher,
        relay_id="contract",
        batch_size=5,
        poll_interval=0.01,
        retry_policy=RetryPolicy(max_attempts=2),
        poison_policy=PoisonPolicy.SKIP,
    )
    stats = await relay.drain()
    assert stats.delivered == 11
    assert stats.dead_lettered == 1
    assert [e.id for e in recorder.published] == [e.id for e in added if e.id != added[4].id]
    assert [d.event_id for d in await backend.dead_letters()] == [added[4].id]


async def test_the_relay_quarantines_a_poisoned_key_the_same_on_both(backend: Backend) -> None:
    added = await backend.add(*[event(f"k{i % 3}", i) for i in range(12)])
    poison = added[4]  # k1's second event
    recorder = RecordingPublisher()

    def relay() -> Relay:
        publisher = FaultInjector.scripted(recorder, poison={poison.id})
        return Relay(
            backend.store, publisher, relay_id="contract", batch_size=5, poll_interval=0.01
        )

    stats = await relay().drain()
    chain = [e for e in added if e.key == "k1" and e.seq >= poison.seq]
    assert [e.id for e in recorder.published] == [e.id for e in added if e not in chain]
    assert (stats.dead_lettered, stats.parked) == (3, 2)
    dead = sorted(await backend.dead_letters(), key=lambda d: d.original_seq)
    assert [d.event_id for d in dead] == [e.id for e in chain]
    assert [d.holds_key for d in dead] == [True, True, True]
    assert [d.held_behind for d in dead] == [None, poison.id, poison.id]
    assert [d.attempts for d in dead] == [1, 0, 0]  # a parked event made no attempt
    assert dead[1].error_class == "Quarantined"
    # Committed later, while k1 is still quarantined: parked as well; other keys flow.
    late, other = await backend.add(event("k1", 99), event("k2", 100))
    stats = await relay().drain()
    assert (stats.delivered, stats.parked) == (1, 1)
    assert recorder.published[-1].id == other.id
    dead = sorted(await backend.dead_letters(), key=lambda d: d.original_seq)
    assert (dead[-1].event_id, dead[-1].held_behind) == (late.id, poison.id)


async def test_claim_parks_the_events_of_a_held_key(backend: Backend) -> None:
    a1, a2, b1, a3 = await backend.add(event("a", 1), event("a", 2), event("b", 1), event("a", 3))
    claimed = await backend.store.claim(1)
    assert (
        await backend.store.move_to_dead_letters(
            [Dead(claimed.events[0].seq, "MessageRejected", "too big", holds_key=True)]
        )
        == 1
    )
    claimed = await backend.store.claim(10)
    assert [e.id for e in claimed.events] == [b1.id]
    assert [(d.held_behind, d.error_class) for d in claimed.parked] == [
        (a1.id, "Quarantined"),
        (a1.id, "Quarantined"),
    ]
    assert "outbox-relay dlq replay --key a" in claimed.parked[0].error_message
    assert await backend.store.move_to_dead_letters(claimed.parked[:1]) == 1
    # The quarantine is lifted (an operator dropped the chain) before a3 is parked: a3 stays.
    engine = create_async_engine(sqlalchemy_async_url(backend.url))
    async with engine.begin() as conn:
        await conn.execute(delete(DeadLetter))
    await engine.dispose()
    assert await backend.store.move_to_dead_letters(claimed.parked[1:]) == 0
    assert [e.id for e in (await backend.store.claim(10)).events] == [b1.id, a3.id]
    assert a2.id not in {e.id for e in (await backend.store.claim(10)).events}


# -- enqueue: the ORM-free writer ------------------------------------------------------------


def _envelope_fields(e: Envelope) -> tuple[object, ...]:
    return (e.topic, e.key, json.loads(e.payload), e.headers, e.event_type, e.attempts)


async def test_enqueue_writes_what_session_add_writes(backend: Backend) -> None:
    engine = create_async_engine(sqlalchemy_async_url(backend.url))
    h, t = {"h": "v"}, "T"
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        # The transaction's first statement, then one after other statements (asyncpg's path).
        first = await enqueue(
            session, topic="orders", key="a", payload={"n": 1}, headers=h, event_type=t
        )
        session.add(OutboxEvent(topic="orders", key="a", payload={"n": 2}, headers=h, event_type=t))
        await session.flush()
        third = await enqueue(
            session, topic="orders", key="a", payload=Payload(n=3), headers=h, event_type=t
        )
        keyless = await enqueue(session, topic="orders", payload=[4])
    await engine.dispose()
    claimed = (await backend.store.claim(10)).events
    assert [e.id for e in claimed][::2] == [first, third]
    assert claimed[3].id == keyless
    assert [_envelope_fields(e) for e in claimed[:3]] == [
        ("orders", "a", {"n": n}, {"h": "v"}, "T", 0) for n in (1, 2, 3)
    ]
    assert _envelope_fields(claimed[3]) == ("orders", None, [4], {}, None, 0)


async def test_enqueue_rolls_back_with_the_transaction(backend: Backend) -> None:
    engine = create_async_engine(sqlalchemy_async_url(backend.url))
    for statements_before in (0, 1):
        async with AsyncSession(engine) as session, session.begin():
            if statements_before:
                await session.execute(select(1))
            await enqueue(session, topic="orders", key="a", payload={"n": 1})
            await session.rollback()
    await engine.dispose()
    assert not await backend.store.claim(10)


async def test_enqueue_checks_fields_and_writes_nothing_on_error(backend: Backend) -> None:
    engine = create_async_engine(sqlalchemy_async_url(backend.url))
    later = datetime.now(UTC) + timedelta(hours=1)
    async with AsyncSession(engine) as session, session.begin():
        await session.execute(select(1))
        with pytest.raises(OutboxValidationError) as bad_topic:
            await enqueue(session, topic="no spaces", payload={})
        with pytest.raises(OutboxValidationError) as bad_payload:
            await enqueue(session, topic="orders", payload={"x": float("nan")})
        with pytest.raises(OutboxValidationError) as naive_time:
            await enqueue(session, topic="orders", payload={}, available_at=datetime.now())
        delayed = await enqueue(session, topic="orders", key="d", payload={}, available_at=later)
        await enqueue(session, topic="orders", key="e", payload={})  # the transaction goes on
    await engine.dispose()
    assert (bad_topic.value.field, bad_payload.value.field, naive_time.value.field) == (
        "topic",
        "payload",
        "available_at",
    )
    claimed = (await backend.store.claim(10)).events
    assert [e.key for e in claimed] == ["e"]  # the delayed one waits for its time
    assert delayed not in {e.id for e in claimed}


async def test_enqueue_flushes_pending_orm_rows_first(backend: Backend) -> None:
    engine = create_async_engine(sqlalchemy_async_url(backend.url))
    async with AsyncSession(engine) as session, session.begin():
        session.add(OutboxEvent(topic="orders", key="a", payload={"n": 1}))
        await enqueue(session, topic="orders", key="a", payload={"n": 2})
        await session.execute(select(1))  # in the transaction now: asyncpg's own path
        session.add(OutboxEvent(topic="orders", key="a", payload={"n": 3}))
        await enqueue(session, topic="orders", key="a", payload={"n": 4})
    await engine.dispose()
    claimed = (await backend.store.claim(10)).events
    assert [json.loads(e.payload)["n"] for e in claimed] == [1, 2, 3, 4]


async def test_two_dead_events_with_one_id_do_not_crash_the_relay(backend: Backend) -> None:
    twin = uuid.uuid4()
    *_, other = await backend.add(event("a", 1, id=twin), event("b", 2, id=twin), event("c", 3))
    recorder = RecordingPublisher()
    relay = Relay(
        backend.store,
        FaultInjector.scripted(recorder, poison={twin}),
        relay_id="contract",
        poll_interval=0.01,
    )
    stats = await relay.drain()  # raises if the relay crashed
    assert stats.dead_lettered == 2
    assert [e.id for e in recorder.published] == [other.id]
    dead = sorted(await backend.dead_letters(), key=lambda d: d.original_seq)
    assert [(d.event_id, d.key) for d in dead] == [(twin, "a"), (twin, "b")]
