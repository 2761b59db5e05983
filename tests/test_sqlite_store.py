"""SqliteStore: the Store contract on SQLite, driven by an injected clock instead of sleeps."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest
from sqlalchemy import Engine, create_engine, func, select
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

from outbox import BUCKETS, DeadLetter, OutboxEvent, OutboxValidationError
from outbox.envelope import Envelope
from outbox.relay.ordering import PoisonPolicy
from outbox.relay.relay import Relay, RelayStats
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import (
    HELD_BACK,
    Claim,
    Dead,
    Failure,
    PublishResult,
    Retry,
    StoreUnavailableError,
    Verdict,
)
from outbox.relay.stores.sqlite import SqliteStore
from outbox.urls import sqlalchemy_async_url
from tests.fakes import FakeClock, migrated_sqlite

pytestmark = pytest.mark.unit

TOPIC = "orders"
#: Upper bound for Relay.wait_for; the conditions normally hold within milliseconds.
WAIT = 5.0


@pytest.fixture
async def url(tmp_path: Path) -> str:
    return await migrated_sqlite(tmp_path / "outbox.db")


@pytest.fixture
def engine(url: str) -> Iterator[Engine]:
    sync_engine = create_engine(url)
    yield sync_engine
    sync_engine.dispose()


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def store(url: str, clock: FakeClock) -> AsyncIterator[SqliteStore]:
    sqlite_store = SqliteStore(url, clock=clock)
    await sqlite_store.start("relay-test")
    yield sqlite_store
    await sqlite_store.stop()


def event(
    key: str | None,
    n: int = 0,
    *,
    event_type: str | None = None,
    available_at: datetime | None = None,
) -> OutboxEvent:
    return OutboxEvent(
        topic=TOPIC, key=key, payload={"n": n}, event_type=event_type, available_at=available_at
    )


def add(engine: Engine, *events: OutboxEvent) -> list[int]:
    """Commit the events in one transaction of a plain SQLAlchemy Session; return their seqs."""
    with Session(engine, expire_on_commit=False) as session:
        with session.begin():
            session.add_all(events)
        return [e.seq for e in events]


def seqs(batch: Claim | Sequence[Envelope]) -> list[int]:
    if isinstance(batch, Claim):
        assert batch.parked == []  # no key is quarantined here
        batch = batch.events
    return [e.seq for e in batch]


async def claim(store: SqliteStore, limit: int) -> list[Envelope]:
    """The events of one claim (none parked)."""
    got = await store.claim(limit)
    assert got.parked == []
    return got.events


def pending(engine: Engine) -> list[int]:
    with Session(engine) as session:
        return list(session.scalars(select(OutboxEvent.seq).order_by(OutboxEvent.seq)))


def dead_letters(engine: Engine) -> list[DeadLetter]:
    with Session(engine, expire_on_commit=False) as session:
        return list(session.scalars(select(DeadLetter).order_by(DeadLetter.dead_letter_id)))


# -- the store on its own ------------------------------------------------------------------------


async def test_claim_returns_available_events_in_seq_order(
    engine: Engine, store: SqliteStore
) -> None:
    first = OutboxEvent(
        topic=TOPIC,
        key="a",
        payload={"name": "café ☕", "items": [1, 2]},
        headers={"trace": "t-1"},
        event_type="OrderPlaced",
    )
    added = add(engine, first, event("b"), event(None), event("a"), event("c"))

    assert seqs(await store.claim(3)) == added[:3]
    batch = await claim(store, 100)
    assert seqs(batch) == added  # a claim changes nothing: the same events until settled

    head = batch[0]
    assert (head.id, head.topic, head.key, head.event_type) == (first.id, TOPIC, "a", "OrderPlaced")
    assert head.json() == {"name": "café ☕", "items": [1, 2]}
    assert dict(head.headers) == {"trace": "t-1"}
    assert head.attempts == 0
    assert head.created_at is not None
    assert head.created_at.tzinfo == UTC
    assert batch[1].headers == {}


async def test_a_key_waits_behind_its_retry(
    engine: Engine, store: SqliteStore, clock: FakeClock
) -> None:
    a1, b1, a2, keyless = add(engine, event("a"), event("b"), event("a"), event(None))
    failed_at = clock.now

    assert await store.schedule_retries([Retry(a1, 30.0, "RequestTimedOut: slow")]) == 1
    assert seqs(await store.claim(100)) == [b1, keyless]  # a2 must not overtake a1
    clock.advance(29.9)
    assert seqs(await store.claim(100)) == [b1, keyless]
    clock.advance(0.1)
    batch = await claim(store, 100)
    assert seqs(batch) == [a1, b1, a2, keyless]
    assert batch[0].attempts == 1

    with Session(engine) as session:
        row = session.get_one(OutboxEvent, a1)
        assert row.attempts == 1
        assert row.last_error == "RequestTimedOut: slow"
        assert row.first_failed_at == failed_at
        assert row.available_at == failed_at + timedelta(seconds=30)


async def test_a_second_retry_keeps_the_first_failure_time(
    engine: Engine, store: SqliteStore, clock: FakeClock
) -> None:
    (seq,) = add(engine, event("a"))
    first_failure = clock.now
    assert await store.schedule_retries([Retry(seq, 1.0, "E: one")]) == 1
    clock.advance(5)
    assert await store.schedule_retries([Retry(seq, 1.0, "E: two")]) == 1

    with Session(engine) as session:
        row = session.get_one(OutboxEvent, seq)
        assert (row.attempts, row.last_error) == (2, "E: two")
        assert row.first_failed_at == first_failure


async def test_delayed_delivery_with_an_aware_non_utc_time(
    url: str, store: SqliteStore, clock: FakeClock
) -> None:
    # Through AsyncSession + aiosqlite, with an offset SQLite itself cannot store.
    pacific = timezone(timedelta(hours=-7))
    due = clock.now.astimezone(pacific) + timedelta(minutes=10)
    async_engine = create_async_engine(sqlalchemy_async_url(url))
    try:
        async with AsyncSession(async_engine, expire_on_commit=False) as session:
            async with session.begin():
                delayed = event("a", 1, available_at=due)
                after = event("a", 2)
                other = event("b", 3)
                session.add_all([delayed, after, other])
            stored = await session.get_one(OutboxEvent, delayed.seq, populate_existing=True)
            assert stored.available_at == due
            assert stored.available_at.tzinfo == UTC
    finally:
        await async_engine.dispose()

    assert seqs(await store.claim(100)) == [other.seq]
    clock.advance(599)
    assert seqs(await store.claim(100)) == [other.seq]
    clock.advance(1)
    assert seqs(await store.claim(100)) == [delayed.seq, after.seq, other.seq]


async def test_changes_return_the_rows_changed(engine: Engine, store: SqliteStore) -> None:
    s1, s2, s3 = add(engine, event("a"), event("b"), event("c"))
    missing = s3 + 1000

    assert await store.mark_delivered([s1, s2, missing]) == 2
    assert pending(engine) == [s3]
    assert await store.mark_delivered([s1]) == 0
    assert await store.mark_delivered([]) == 0
    assert await store.schedule_retries([Retry(missing, 1.0, "E: x")]) == 0
    assert await store.move_to_dead_letters([Dead(missing, "E", "x")]) == 0
    assert await store.move_to_dead_letters([Dead(s3, "E", "x"), Dead(s1, "E", "x")]) == 1
    assert pending(engine) == []
    assert [d.original_seq for d in dead_letters(engine)] == [s3]


async def test_move_to_dead_letters_copies_the_event(
    engine: Engine, store: SqliteStore, clock: FakeClock
) -> None:
    original = OutboxEvent(
        topic=TOPIC, key="a", payload={"total": 10}, headers={"h": "v"}, event_type="OrderPaid"
    )
    (seq,) = add(engine, original)
    with Session(engine) as session:  # a server default: not loaded by the insert
        created_at = session.scalar(select(OutboxEvent.created_at).where(OutboxEvent.seq == seq))
    first_failure = clock.now
    await store.schedule_retries([Retry(seq, 1.0, "RequestTimedOut: slow")])
    clock.advance(5)

    assert await store.move_to_dead_letters([Dead(seq, "MessageTooLarge", "1 MiB limit")]) == 1

    assert pending(engine) == []
    (dead,) = dead_letters(engine)
    assert (dead.event_id, dead.original_seq, dead.topic, dead.key) == (
        original.id,
        seq,
        TOPIC,
        "a",
    )
    assert (dead.payload, dead.headers, dead.event_type) == ({"total": 10}, {"h": "v"}, "OrderPaid")
    assert dead.created_at == created_at
    assert dead.attempts == 2
    assert dead.first_failed_at == first_failure
    assert dead.last_failed_at == first_failure + timedelta(seconds=5)
    assert (dead.error_class, dead.error_message) == ("MessageTooLarge", "1 MiB limit")
    assert dead.relay_id == "relay-test"


async def test_seq_is_never_reused_after_the_table_empties(
    engine: Engine, store: SqliteStore
) -> None:
    (first,) = add(engine, event("a"))
    assert await store.mark_delivered([first]) == 1
    (second,) = add(engine, event("a"))
    assert second > first


async def test_one_relay_owns_every_bucket_in_wal_mode(url: str, store: SqliteStore) -> None:
    assert await store.maintain_leases(rebalance=True) == BUCKETS
    assert await store.maintain_leases(rebalance=False) == BUCKETS
    with sqlite3.connect(store.path) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)


async def test_a_locked_database_is_unavailable_not_broken(
    url: str, engine: Engine, clock: FakeClock
) -> None:
    (seq,) = add(engine, event("a"))
    impatient = SqliteStore(url, clock=clock, busy_timeout=0.05)
    await impatient.start("relay-test")
    holder = sqlite3.connect(impatient.path, isolation_level=None)
    try:
        holder.execute("BEGIN IMMEDIATE")  # another writer holds the write lock
        with pytest.raises(StoreUnavailableError, match="locked"):
            await impatient.mark_delivered([seq])
        holder.execute("ROLLBACK")
        assert await impatient.mark_delivered([seq]) == 1
    finally:
        holder.close()
        await impatient.stop()


@pytest.mark.parametrize("scheme", ["sqlite", "sqlite+aiosqlite"])
def test_url_schemes(tmp_path: Path, scheme: str) -> None:
    path = tmp_path / "x.db"
    assert SqliteStore(f"{scheme}:///{path}").path == path


@pytest.mark.parametrize(
    "bad_url", ["sqlite://", "sqlite:///:memory:", "postgresql://localhost/db"]
)
def test_urls_without_a_file_are_refused(bad_url: str) -> None:
    with pytest.raises(ValueError, match="database_url"):
        SqliteStore(bad_url)


async def test_start_refuses_a_missing_file_or_missing_tables(tmp_path: Path) -> None:
    missing = tmp_path / "missing.db"
    with pytest.raises(FileNotFoundError, match="outbox-relay migrate --database-url sqlite:///"):
        await SqliteStore(f"sqlite:///{missing}").start("r")
    assert not missing.exists()

    empty = tmp_path / "empty.db"
    sqlite3.connect(empty).close()
    with pytest.raises(RuntimeError, match="tables are missing"):
        await SqliteStore(f"sqlite:///{empty}").start("r")


def test_outbox_event_validation_is_the_same_on_sqlite(engine: Engine) -> None:
    with pytest.raises(OutboxValidationError, match="topic"):
        OutboxEvent(topic="no spaces", payload={})
    with pytest.raises(OutboxValidationError, match="available_at"):
        OutboxEvent(topic=TOPIC, payload={}, available_at=datetime(2030, 1, 1))
    with Session(engine) as session:
        assert session.scalar(select(func.count()).select_from(OutboxEvent)) == 0


# -- the real Relay loop on SqliteStore ----------------------------------------------------------


class ScriptedPublisher:
    """Answers each event with `answer(event)`; once an event of a key is not delivered, holds
    back the later events of that key in the batch (HELD_BACK), as the Publisher contract
    requires. Records what it delivered, in order."""

    name = "scripted"

    def __init__(self, answer: Callable[[Envelope], PublishResult]) -> None:
        self.answer = answer
        self.delivered: list[int] = []

    async def start(self) -> None:
        pass

    async def stop(self) -> None:
        pass

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        results: list[PublishResult] = []
        blocked: set[str] = set()
        for e in batch:
            if e.key is not None and e.key in blocked:
                results.append(HELD_BACK)
                continue
            result = self.answer(e)
            if result is None:
                self.delivered.append(e.seq)
            elif e.key is not None:
                blocked.add(e.key)
            results.append(result)
        return results


def relay_for(
    url: str,
    clock: FakeClock,
    publisher: ScriptedPublisher,
    *,
    max_attempts: int = 10,
    poison_policy: PoisonPolicy = PoisonPolicy.QUARANTINE,
) -> Relay:
    """Every retry waits exactly 10 s of the injected clock."""
    return Relay(
        SqliteStore(url, clock=clock),
        publisher,
        relay_id="relay-test",
        poll_interval=0.01,
        retry_policy=RetryPolicy(
            base_seconds=10.0, factor=1.0, jitter=0.0, max_attempts=max_attempts
        ),
        poison_policy=poison_policy,
    )


async def stop(relay: Relay, task: asyncio.Task[None]) -> None:
    relay.request_stop()
    await task


async def test_relay_retries_then_delivers_in_key_order(
    url: str, engine: Engine, clock: FakeClock
) -> None:
    a1, b1, a2 = add(engine, event("a"), event("b"), event("a"))
    failed: set[int] = set()

    def answer(e: Envelope) -> PublishResult:
        if e.seq == a1 and a1 not in failed:
            failed.add(a1)
            return Failure("RequestTimedOut", "slow broker")
        return None

    publisher = ScriptedPublisher(answer)
    relay = relay_for(url, clock, publisher)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.retried == 1 and s.delivered == 1, WAIT)
        assert publisher.delivered == [b1]  # a2 waits behind a1's retry, 10 s away
        assert pending(engine) == [a1, a2]
        clock.advance(10)
        relay.wake()
        await relay.wait_for(lambda s: s.delivered == 3, WAIT)
    finally:
        await stop(relay, task)
    assert publisher.delivered == [b1, a1, a2]
    assert pending(engine) == []
    assert dead_letters(engine) == []


async def test_relay_dead_letters_after_max_attempts(
    url: str, engine: Engine, clock: FakeClock
) -> None:
    (seq,) = add(engine, event("a"))
    first_failure = clock.now
    publisher = ScriptedPublisher(lambda e: Failure("RequestTimedOut", "still slow"))
    relay = relay_for(url, clock, publisher, max_attempts=3)

    def retried(n: int) -> Callable[[RelayStats], bool]:
        return lambda s: s.retried == n

    task = asyncio.create_task(relay.run())
    try:
        for attempt in (1, 2):
            await relay.wait_for(retried(attempt), WAIT)
            clock.advance(10)
            relay.wake()
        await relay.wait_for(lambda s: s.dead_lettered == 1, WAIT)
    finally:
        await stop(relay, task)

    assert pending(engine) == []
    (dead,) = dead_letters(engine)
    assert (dead.original_seq, dead.attempts) == (seq, 3)
    assert (dead.error_class, dead.error_message) == ("RequestTimedOut", "still slow")
    assert dead.first_failed_at == first_failure
    assert dead.last_failed_at == first_failure + timedelta(seconds=20)


async def test_relay_dead_letters_a_non_retriable_failure_at_once(
    url: str, engine: Engine, clock: FakeClock
) -> None:
    """Under the skip policy, the key moves on past its poison event (quarantine, the default,
    is tested in tests/test_relay_loop.py)."""
    poison, a2, b1 = add(engine, event("a", event_type="PoisonPill"), event("a"), event("b"))

    def answer(e: Envelope) -> PublishResult:
        if e.event_type == "PoisonPill":
            return Failure("MessageRejected", "refused", Verdict.POISON)
        return None

    publisher = ScriptedPublisher(answer)
    relay = relay_for(url, clock, publisher, poison_policy=PoisonPolicy.SKIP)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.dead_lettered == 1 and s.delivered == 2, WAIT)
    finally:
        await stop(relay, task)

    assert relay.stats.retried == 0
    # a2 was held back in the poison event's batch (the Publisher contract), then sent.
    assert publisher.delivered == [b1, a2]
    assert pending(engine) == []
    (dead,) = dead_letters(engine)
    assert (dead.original_seq, dead.attempts, dead.error_class) == (poison, 1, "MessageRejected")
    assert (dead.holds_key, dead.held_behind) == (False, None)
    assert dead.first_failed_at == dead.last_failed_at == clock.now
