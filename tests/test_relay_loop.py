"""The loop and the backoff, on the real SqliteStore (a tmp_path file), a fake publisher and a
fake clock injected into the store."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Sequence
from pathlib import Path

import pytest
import structlog.testing

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay.ordering import PoisonPolicy
from outbox.relay.relay import Relay, RelayStats
from outbox.relay.retry import CircuitBreaker, PollPacer, RetryPolicy
from outbox.relay.seams import (
    Claim,
    Failure,
    Position,
    PublishResult,
    StoreUnavailableError,
    Verdict,
)
from outbox.relay.stores.sqlite import SqliteStore
from outbox.relay.testing import FaultInjector
from tests.fakes import FakeClock, OutboxDb, RecordingPublisher, TrackedSqliteStore

pytestmark = pytest.mark.unit


def test_backoff_grows_is_capped_and_jittered() -> None:
    policy = RetryPolicy(base_seconds=1, factor=2, max_seconds=10, max_attempts=5, jitter=0.5)
    assert [policy.delay(n, lambda: 0.0) for n in range(1, 7)] == [1, 2, 4, 8, 10, 10]
    assert policy.delay(3, lambda: 1.0) == 2.0  # full jitter takes off up to half
    assert not policy.exhausted(4)
    assert policy.exhausted(5)


def test_circuit_breaker_backs_off_and_closes() -> None:
    breaker = CircuitBreaker(base_seconds=1, max_seconds=4, rand=lambda: 1.0)
    assert not breaker.is_open
    assert [breaker.record_failure() for _ in range(4)] == [1, 2, 4, 4]
    assert breaker.is_open
    breaker.record_success()
    assert not breaker.is_open


def test_poll_pacer_claims_again_quickly_after_a_find() -> None:
    pacer = PollPacer(interval=1.0, fast=0.01)
    assert pacer.after_claim(found=False) == 1.0  # idle: the full interval
    assert pacer.after_claim(found=True) == 0.01  # found: look again soon
    assert pacer.after_claim(found=True) == 0.01  # ... and again
    backing_off = [pacer.after_claim(found=False) for _ in range(8)]
    assert backing_off == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]
    assert PollPacer(interval=0.005).after_claim(found=True) == 0.005


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
async def db(tmp_path: Path, clock: FakeClock) -> AsyncIterator[OutboxDb]:
    """A SQLite outbox file with the schema; the relay's store runs on the fake clock."""
    outbox = await OutboxDb.create(tmp_path / "outbox.db", clock)
    yield outbox
    await outbox.close()


@pytest.fixture
def store(db: OutboxDb) -> TrackedSqliteStore:
    return db.store()


def make_relay(store: SqliteStore, publisher: object, **kw: object) -> Relay:
    defaults: dict[str, object] = {
        "relay_id": "test",
        "batch_size": 10,
        "poll_interval": 0.01,
        "retry_policy": RetryPolicy(base_seconds=5, factor=2, max_attempts=3, jitter=0.0),
        "rand": lambda: 0.0,
    }
    return Relay(store, publisher, **(defaults | kw))  # type: ignore[arg-type]


def seqs(events: Sequence[Envelope | OutboxEvent]) -> list[int]:
    return [e.seq for e in events]


async def test_drain_publishes_everything_in_order_and_deletes(
    db: OutboxDb, store: TrackedSqliteStore
) -> None:
    publisher = RecordingPublisher()
    events = [await db.add(key=f"k{i % 3}") for i in range(25)]
    stats = await make_relay(store, publisher).drain()
    assert [e.seq for e in publisher.published] == [e.seq for e in events]
    assert stats.delivered == 25
    assert stats.batches == 3  # batch_size 10: keeps draining while batches are full
    assert await db.pending() == []
    assert store.stopped


async def test_retry_holds_back_the_key_then_succeeds(
    db: OutboxDb, store: TrackedSqliteStore, clock: FakeClock
) -> None:
    recorder = RecordingPublisher()
    first = await db.add(key="a")
    second = await db.add(key="a")
    other = await db.add(key="b")
    publisher = FaultInjector.scripted(recorder, failures={first.id: 2})
    relay = make_relay(store, publisher)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.retried == 1 and s.idle, timeout=5)
    assert [e.seq for e in recorder.published] == [other.seq]  # b flows, a waits
    assert (await db.row(first.seq)).attempts == 1
    delays = [await db.retry_delay(first.seq)]
    assert delays == [5.0]
    clock.advance(5)
    relay.wake()
    await relay.wait_for(lambda s: s.retried == 2, timeout=5)
    delays.append(await db.retry_delay(first.seq))
    assert delays == [5.0, 10.0]  # exponential
    clock.advance(10)
    relay.wake()
    await relay.wait_for(lambda s: s.delivered == 3, timeout=5)
    relay.request_stop()
    await task
    assert [e.seq for e in recorder.published] == [other.seq, first.seq, second.seq]
    assert relay.stats.held_back >= 1
    assert await db.dead_letters() == []


async def test_max_attempts_then_dead_letter_and_successor_flows(
    db: OutboxDb, store: TrackedSqliteStore, clock: FakeClock
) -> None:
    """Under the skip policy (the relay's behaviour before quarantine existed)."""
    recorder = RecordingPublisher()
    doomed = await db.add(key="a")
    after = await db.add(key="a")
    relay = make_relay(
        store,
        FaultInjector.scripted(recorder, failures={doomed.id: 99}),
        poison_policy=PoisonPolicy.SKIP,
    )
    task = asyncio.create_task(relay.run())
    for attempt in (1, 2):

        def retried(stats: RelayStats, n: int = attempt) -> bool:
            return stats.retried == n

        await relay.wait_for(retried, timeout=5)
        clock.advance(3600)
        relay.wake()
    await relay.wait_for(lambda s: s.dead_lettered == 1 and s.delivered == 1, timeout=5)
    relay.request_stop()
    await task
    (dead,) = await db.dead_letters()
    assert dead.event_id == doomed.id
    assert dead.error_class == "InjectedError"
    assert [e.id for e in recorder.published] == [after.id]


async def test_non_retriable_goes_to_dead_letters_at_once(
    db: OutboxDb, store: TrackedSqliteStore
) -> None:
    """Under the skip policy (the relay's behaviour before quarantine existed)."""
    recorder = RecordingPublisher()
    poison = await db.add(key="a")
    fine = await db.add(key="a")
    publisher = FaultInjector.scripted(recorder, poison={poison.id})
    stats = await make_relay(store, publisher, poison_policy=PoisonPolicy.SKIP).drain()
    assert stats.retried == 0
    dead = await db.dead_letters()
    assert [d.event_id for d in dead] == [poison.id]
    assert dead[0].error_class == "MessageRejected"
    assert [e.id for e in recorder.published] == [fine.id]


async def test_broker_outage_burns_no_attempts(db: OutboxDb, store: TrackedSqliteStore) -> None:
    publisher = RecordingPublisher()
    for i in range(5):
        await db.add(key=f"k{i}")
    publisher.down = True
    relay = make_relay(store, publisher)
    relay._breaker = CircuitBreaker(base_seconds=0.01, max_seconds=0.02)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.broker_failures >= 3, timeout=5)
    rows = await db.pending()
    assert len(rows) == 5
    assert all(row.attempts == 0 for row in rows)
    assert await db.dead_letters() == []
    publisher.down = False
    await relay.wait_for(lambda s: s.delivered == 5, timeout=5)
    relay.request_stop()
    await task


async def test_crash_in_publisher_stops_the_relay_and_is_raised(
    db: OutboxDb, store: TrackedSqliteStore
) -> None:
    class Broken(RecordingPublisher):
        async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
            raise ValueError("bug in publisher")

    await db.add()
    with pytest.raises(ValueError, match="bug in publisher"):
        await asyncio.wait_for(make_relay(store, Broken()).run(), 5)
    assert store.stopped
    assert len(await db.pending()) == 1  # nothing lost


async def test_stop_finishes_and_releases(store: TrackedSqliteStore) -> None:
    publisher = RecordingPublisher()
    relay = make_relay(store, publisher)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.idle, timeout=5)
    relay.request_stop()
    await asyncio.wait_for(task, 5)
    assert store.stopped


async def test_stop_while_the_broker_is_down_at_startup_is_clean(
    store: TrackedSqliteStore,
) -> None:
    publisher = RecordingPublisher()
    publisher.down = True
    relay = make_relay(store, publisher)
    with structlog.testing.capture_logs() as logs:
        task = asyncio.create_task(relay.run())
        await relay.wait_for(lambda s: s.broker_failures >= 1, timeout=5)
        relay.request_stop()
        await asyncio.wait_for(task, 5)  # returns, does not raise
    events = [entry["event"] for entry in logs]
    assert "relay_started" not in events
    assert events[-1] == "relay_stopped"
    assert relay.stats.stopped
    assert store.stopped


async def test_a_find_makes_the_relay_claim_again_quickly(
    db: OutboxDb, store: TrackedSqliteStore
) -> None:
    """Unannounced events (writers with `outbox.notify = off`: nothing calls wake()) are found
    by the timer; announced or not, a claim that found events is followed by quick claims,
    which pick up the events of transactions whose NOTIFY the trigger skipped."""
    publisher = RecordingPublisher()
    relay = make_relay(store, publisher, poll_interval=0.05)
    delays: list[float] = []
    wait = relay._wait_for_work

    async def recording_wait(delay: float) -> bool:
        delays.append(delay)
        return await wait(delay)

    relay._wait_for_work = recording_wait  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.idle, timeout=5)  # one empty claim done
    await db.add(key="a")  # no relay.wake(): no NOTIFY announced it
    await relay.wait_for(lambda s: s.delivered == 1, timeout=5)
    await relay.wait_for(lambda s: 0.04 in delays, timeout=5)  # backing off after "a"
    relay.wake()  # announced, as a NOTIFY would
    await db.add(key="b")
    relay.wake()
    await relay.wait_for(lambda s: s.delivered == 2, timeout=5)
    await relay.wait_for(lambda s: s.idle, timeout=5)
    relay.request_stop()
    await task
    found_at = delays.index(0.01)  # the wait right after the timer found "a"
    assert delays[:found_at] == [0.05] * found_at
    assert delays[found_at + 1 : found_at + 3] == [0.02, 0.04]  # empty claims back off
    assert 0.01 in delays[found_at + 3 :]  # "b" was announced, and found: quick claims too


# -- per-key order and the poison policy, at the loop level, on SqliteStore ---------------------


async def add_keyed(db: OutboxDb, plan: str) -> dict[str, OutboxEvent]:
    """Commit events named like 'K1 A1 K2 ...' in that order (the letter is the key)."""
    names = plan.split()
    events = await db.add_all(
        [OutboxEvent(topic="t", key=name[0], payload={"name": name}) for name in names]
    )
    return dict(zip(names, events, strict=True))


#: Key K has events 1..5 (K2 will be poison); keys A and B interleave with them.
PLAN = "K1 A1 K2 B1 K3 A2 K4 B2 K5 A3 B3"


#: One claim for everything, pipelined claims, and one event per claim.
BATCH_SIZES = pytest.mark.parametrize(
    "batch_size", [100, 3, 2, 1], ids=["one-claim", "pipelined-3", "pipelined-2", "one-by-one"]
)


def published_of(publisher: RecordingPublisher, key: str) -> list[int]:
    return [e.seq for e in publisher.published if e.key == key]


@BATCH_SIZES
async def test_quarantine_parks_the_rest_of_the_key_in_order_and_other_keys_flow(
    db: OutboxDb, batch_size: int
) -> None:
    ev = await add_keyed(db, PLAN)
    poison = ev["K2"]
    recorder = RecordingPublisher()
    publisher = FaultInjector.scripted(recorder, poison={poison.id})
    stats = await make_relay(db.store(), publisher, batch_size=batch_size).drain()

    # K: only K1 went out; K2 is dead and holds the key; K3..K5 are parked behind it.
    assert published_of(recorder, "K") == [ev["K1"].seq]
    parked = [ev[n] for n in ("K3", "K4", "K5")]
    assert not {e.id for e in parked} & {e.id for e in recorder.published}
    # Every other key: all of it, in order.
    assert published_of(recorder, "A") == seqs([ev["A1"], ev["A2"], ev["A3"]])
    assert published_of(recorder, "B") == seqs([ev["B1"], ev["B2"], ev["B3"]])
    assert await db.pending() == []

    dead = await db.dead_letters()
    assert dead[0].event_id == poison.id  # written first: the parked ones need it there
    assert (dead[0].holds_key, dead[0].held_behind) == (True, None)
    assert (dead[0].error_class, dead[0].attempts) == ("MessageRejected", 1)
    behind = sorted(dead[1:], key=lambda d: d.original_seq)
    assert [d.event_id for d in behind] == [e.id for e in parked]
    assert [d.original_seq for d in behind] == seqs(parked)
    for d in behind:
        assert (d.key, d.holds_key, d.held_behind) == ("K", True, poison.id)
        assert (d.error_class, d.attempts) == ("Quarantined", 0)  # parked: never attempted
    assert (stats.dead_lettered, stats.parked, stats.retried) == (4, 3, 0)
    # Written in seq order too, pipelined or not: a parked event waits at the key gate like
    # any other, so a key's dead letters never overtake its pending events.
    assert [d.original_seq for d in dead] == seqs([poison, *parked])

    # An event of K committed later is parked too; the others still flow.
    late = await add_keyed(db, "K6 A4")
    recorder.published.clear()
    stats = await make_relay(db.store(), publisher, batch_size=batch_size).drain()
    assert [e.seq for e in recorder.published] == [late["A4"].seq]
    assert (stats.dead_lettered, stats.parked, stats.delivered) == (1, 1, 1)
    *_, last = await db.dead_letters()
    assert (last.event_id, last.original_seq) == (late["K6"].id, late["K6"].seq)
    assert (last.holds_key, last.held_behind) == (True, poison.id)
    assert await db.pending() == []


@BATCH_SIZES
async def test_skip_policy_lets_the_key_move_on_past_its_poison_event(
    db: OutboxDb, batch_size: int
) -> None:
    ev = await add_keyed(db, PLAN)
    poison = ev["K2"]
    recorder = RecordingPublisher()
    publisher = FaultInjector.scripted(recorder, poison={poison.id})
    relay = make_relay(
        db.store(), publisher, batch_size=batch_size, poison_policy=PoisonPolicy.SKIP
    )
    stats = await relay.drain()

    assert published_of(recorder, "K") == seqs([ev[n] for n in ("K1", "K3", "K4", "K5")])
    assert published_of(recorder, "A") == seqs([ev["A1"], ev["A2"], ev["A3"]])
    assert published_of(recorder, "B") == seqs([ev["B1"], ev["B2"], ev["B3"]])
    (dead,) = await db.dead_letters()
    assert (dead.event_id, dead.holds_key, dead.held_behind) == (poison.id, False, None)
    assert (stats.dead_lettered, stats.parked, stats.retried) == (1, 0, 0)
    assert await db.pending() == []


async def test_quarantine_also_follows_retries_running_out(db: OutboxDb, clock: FakeClock) -> None:
    ev = await add_keyed(db, "K1 K2 A1 K3")
    recorder = RecordingPublisher()
    publisher = FaultInjector.scripted(recorder, failures={ev["K1"].id: 99})
    relay = make_relay(db.store(), publisher)  # max_attempts=3, the default policy: quarantine
    task = asyncio.create_task(relay.run())
    try:
        for attempt in (1, 2):

            def retried(stats: RelayStats, n: int = attempt) -> bool:
                return stats.retried == n and stats.idle

            await relay.wait_for(retried, timeout=5)
            clock.advance(3600)
            relay.wake()
        await relay.wait_for(lambda s: s.dead_lettered == 3 and s.idle, timeout=5)
    finally:
        relay.request_stop()
        await task
    assert [e.seq for e in recorder.published] == [ev["A1"].seq]
    first, *behind = await db.dead_letters()
    assert (first.event_id, first.attempts, first.error_class) == (ev["K1"].id, 3, "InjectedError")
    assert (first.holds_key, first.held_behind) == (True, None)
    assert [(d.event_id, d.held_behind, d.attempts) for d in behind] == [
        (ev["K2"].id, ev["K1"].id, 0),
        (ev["K3"].id, ev["K1"].id, 0),
    ]
    assert relay.stats.parked == 2
    assert await db.pending() == []


async def test_a_retry_holds_the_key_without_counting_attempts_for_the_held(
    db: OutboxDb, store: TrackedSqliteStore, clock: FakeClock
) -> None:
    ev = await add_keyed(db, "K1 A1 K2 K3 A2")
    recorder = RecordingPublisher()
    publisher = FaultInjector.scripted(recorder, failures={ev["K1"].id: 1})
    relay = make_relay(store, publisher)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.retried == 1 and s.idle, timeout=5)
        # Claims keep coming while K1 waits: K2 and K3 are never claimed, nothing more held.
        claims = store.claims
        await relay.wait_for(lambda s: s.idle and store.claims >= claims + 3, timeout=5)
        assert [e.seq for e in recorder.published] == seqs([ev["A1"], ev["A2"]])
        rows = {row.seq: row for row in await db.pending()}
        assert list(rows) == seqs([ev["K1"], ev["K2"], ev["K3"]])
        assert (rows[ev["K1"].seq].attempts, rows[ev["K1"].seq].last_error) == (
            1,
            "InjectedError: transient failure (test)",
        )
        for name in ("K2", "K3"):
            held = rows[ev[name].seq]
            assert (held.attempts, held.last_error, held.first_failed_at) == (0, None, None)
            assert held.available_at <= clock.now  # not pushed back: only waiting behind K1
        assert relay.stats.held_back == 2  # K2 and K3, once, in the batch K1 failed in
        assert (relay.stats.retried, relay.stats.dead_lettered) == (1, 0)

        clock.advance(5)
        relay.wake()
        await relay.wait_for(lambda s: s.delivered == 5, timeout=5)
    finally:
        relay.request_stop()
        await task
    assert published_of(recorder, "K") == seqs([ev["K1"], ev["K2"], ev["K3"]])
    assert relay.stats.held_back == 2
    assert relay.stats.retried == 1
    assert await db.dead_letters() == []
    assert await db.pending() == []


# -- failures in the pipeline: a prefetched batch, a broker outage, a partial broker refusal ---


class PrefetchGate(TrackedSqliteStore):
    """Lets a test hold the first publish until the next claim (the prefetch) has returned."""

    def __init__(self, db: OutboxDb) -> None:
        super().__init__(db.url, clock=db.clock)
        self.prefetched = asyncio.Event()

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        claim = await super().claim(limit, exclude, after)
        if self.claims >= 2:
            self.prefetched.set()
        return claim


class WaitsForPrefetch(RecordingPublisher):
    def __init__(self, store: PrefetchGate) -> None:
        super().__init__()
        self.store = store

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        await self.store.prefetched.wait()
        return await super().publish(batch)


async def test_a_failure_in_a_prefetched_batch_while_the_previous_batch_retries(
    db: OutboxDb, clock: FakeClock
) -> None:
    ev = await add_keyed(db, "A1 B1 C1 A2 D1 B2 D2")
    store = PrefetchGate(db)
    recorder = WaitsForPrefetch(store)
    publisher = FaultInjector.scripted(recorder, failures={ev["A1"].id: 1}, poison={ev["D1"].id})
    relay = make_relay(store, publisher, batch_size=3)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.retried == 1 and s.dead_lettered == 2 and s.idle, timeout=5)
    # The second batch was claimed while A1 was being published: A2 waited at the gate, the
    # poison D1 quarantined D (D2 parked behind it), B went on.
    assert store.claims >= 2
    assert [e.seq for e in recorder.published] == seqs([ev["B1"], ev["C1"], ev["B2"]])
    assert (await db.row(ev["A2"].seq)).attempts == 0
    dead = await db.dead_letters()
    assert [(d.event_id, d.held_behind) for d in dead] == [
        (ev["D1"].id, None),
        (ev["D2"].id, ev["D1"].id),
    ]
    clock.advance(5)
    relay.wake()
    await relay.wait_for(lambda s: s.delivered == 5, timeout=5)
    relay.request_stop()
    await task
    assert published_of(recorder, "A") == seqs([ev["A1"], ev["A2"]])
    assert relay.stats.retried == 1


async def test_a_poison_event_during_a_broker_outage_costs_nothing_until_the_broker_is_back(
    db: OutboxDb, store: TrackedSqliteStore
) -> None:
    ev = await add_keyed(db, "K1 A1 K2 A2")
    recorder = RecordingPublisher()
    recorder.down = True
    publisher = FaultInjector.scripted(recorder, poison={ev["K1"].id})
    relay = make_relay(store, publisher)
    relay._breaker = CircuitBreaker(base_seconds=0.01, max_seconds=0.02)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.broker_failures >= 3, timeout=5)
    # Down: the poison verdict of the batch never counts, nothing moves.
    assert [e.attempts for e in await db.pending()] == [0, 0, 0, 0]
    assert await db.dead_letters() == []
    recorder.down = False
    await relay.wait_for(lambda s: s.delivered == 2 and s.dead_lettered == 2, timeout=5)
    relay.request_stop()
    await task
    assert [e.seq for e in recorder.published] == seqs([ev["A1"], ev["A2"]])
    dead = await db.dead_letters()
    assert [(d.event_id, d.attempts, d.held_behind) for d in dead] == [
        (ev["K1"].id, 1, None),
        (ev["K2"].id, 0, ev["K1"].id),
    ]


class RefusesWhileFull(RecordingPublisher):
    """A broker that accepts only the first `room` events, then refuses for its own state."""

    def __init__(self, room: int) -> None:
        super().__init__()
        self.room = room

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        taken = batch[: self.room]
        self.room -= len(taken)
        await super().publish(taken)
        full = Failure("OutOfMemoryError", "OOM command not allowed", Verdict.BROKER)
        return [None] * len(taken) + [full] * (len(batch) - len(taken))


async def test_a_partial_broker_refusal_keeps_what_was_acked_and_counts_nothing(
    db: OutboxDb, store: TrackedSqliteStore
) -> None:
    ev = await add_keyed(db, "A1 B1 A2 C1")
    publisher = RefusesWhileFull(room=2)
    relay = make_relay(store, publisher)
    relay._breaker = CircuitBreaker(base_seconds=0.01, max_seconds=0.02)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.broker_failures >= 2, timeout=5)
    assert [e.seq for e in publisher.published] == seqs([ev["A1"], ev["B1"]])
    assert [(e.seq, e.attempts) for e in await db.pending()] == [
        (ev["A2"].seq, 0),
        (ev["C1"].seq, 0),
    ]
    publisher.room = 10  # memory freed
    await relay.wait_for(lambda s: s.delivered == 4, timeout=5)
    relay.request_stop()
    await task
    assert [e.seq for e in publisher.published] == seqs(list(ev.values()))
    assert relay.stats.retried == relay.stats.dead_lettered == 0


class FailsToSettleOnce(TrackedSqliteStore):
    """The database drops out exactly while the deletes of a published batch are written."""

    def __init__(self, db: OutboxDb) -> None:
        super().__init__(db.url, clock=db.clock)
        self.failed = False

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        if not self.failed:
            self.failed = True
            raise StoreUnavailableError("connection was closed in the middle of operation")
        return await super().mark_delivered(seqs, positions)


async def test_the_store_failing_while_a_settle_finishes_is_an_outage_not_a_crash(
    db: OutboxDb,
) -> None:
    """Found by the chaos suite: the settle awaited when the relay goes idle raised past the
    loop's handler, and `outbox-relay run` exited 1."""
    events = [await db.add(key=f"k{i}") for i in range(3)]
    store = FailsToSettleOnce(db)
    recorder = RecordingPublisher()
    relay = make_relay(store, recorder)
    stats = await relay.drain()  # raises if the loop crashed
    assert stats.store_failures == 1
    assert await db.pending() == []
    # Published, not recorded, so published again: at-least-once, in order per key.
    assert [e.seq for e in recorder.published] == seqs(events) * 2


# -- latency: the next claim runs beside the deletes of the last batch ------------------------


class NotesDeletes(TrackedSqliteStore):
    """Notes what each claim left out and the seqs of every delete statement."""

    def __init__(self, db: OutboxDb) -> None:
        super().__init__(db.url, clock=db.clock)
        self.excluded: list[list[int]] = []
        self.deletes: list[list[int]] = []

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        self.excluded.append(list(exclude))
        return await super().claim(limit, exclude, after)

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        self.deletes.append(list(seqs))
        return await super().mark_delivered(seqs, positions)


class SlowDeletes(NotesDeletes):
    """Holds every delete until the test releases it."""

    def __init__(self, db: OutboxDb) -> None:
        super().__init__(db)
        self.deleting = asyncio.Event()
        self.release = asyncio.Event()

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        self.deleting.set()
        await self.release.wait()
        return await super().mark_delivered(seqs, positions)


class SignalsSecondPublish(RecordingPublisher):
    """Commits the second event while it publishes the first: it is there for the relay's
    next claim, whenever that runs. (Committed after the first publish, a claim in between
    found nothing and waited for the held delete, as an empty claim does: a race the test
    lost once in CI.)"""

    def __init__(self, db: OutboxDb) -> None:
        super().__init__()
        self.db = db
        self.added: list[OutboxEvent] = []
        self.second = asyncio.Event()

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        results = await super().publish(batch)
        if not self.added:
            self.added.append(await self.db.add(key="a"))
        if len(self.published) >= 2:
            self.second.set()
        return results


async def test_new_events_are_published_while_the_last_batch_is_still_being_deleted(
    db: OutboxDb,
) -> None:
    """Latency: a NOTIFY is answered at once, not after the last batch's deletes commit.
    The claim leaves out the seqs being deleted, so nothing goes out twice."""
    first = await db.add(key="a")
    store = SlowDeletes(db)
    recorder = SignalsSecondPublish(db)
    relay = make_relay(store, recorder, poll_interval=60.0)
    task = asyncio.create_task(relay.run())
    await asyncio.wait_for(store.deleting.wait(), 5)
    relay.wake()  # the second event's NOTIFY
    await asyncio.wait_for(recorder.second.wait(), 5)  # the first delete is still held
    (second,) = recorder.added
    assert [e.seq for e in recorder.published] == [first.seq, second.seq]
    assert store.excluded[-1] == [first.seq]
    store.release.set()
    await relay.wait_for(lambda s: s.delivered == 2 and s.idle, timeout=5)
    relay.request_stop()
    await task
    assert await db.pending() == []
    assert [e.seq for e in recorder.published] == [first.seq, second.seq]


async def test_a_claim_runs_beside_a_settle_only_if_that_batch_was_all_delivered() -> None:
    from outbox.relay.relay import _Pipeline

    release = asyncio.Event()

    async def deleting() -> None:
        await release.wait()

    pipe = _Pipeline()
    pipe.settle([], [], deleting())
    pipe.settling_clean = True
    assert pipe.can_claim_beside()
    pipe.settling_clean = False  # a retry, a dead letter or a held-back event in it
    assert not pipe.can_claim_beside()
    pipe.settling_clean = True
    pipe.passed_over.append(7)  # the gate left an event out since the last fresh claim
    assert not pipe.can_claim_beside()
    pipe.passed_over.clear()
    pipe.gate.close(Envelope(1, uuid.uuid4(), "t", "a", b"{}"))  # a key waits for its retry
    assert not pipe.can_claim_beside()
    pipe.gate.clear()
    release.set()
    await pipe.finish_settling()
    assert not pipe.can_claim_beside()  # settled: a fresh claim instead


# -- low rates: the deletes of batches one after another go as one statement ------------------


async def test_the_deletes_of_batches_one_after_another_go_as_one_statement(
    db: OutboxDb,
) -> None:
    """At a low rate each claim holds an event or two: their deletes wait up to
    `settle_linger` for the next batches' (claims leave them out meanwhile), and the claim
    that comes back empty ends the wait."""
    first = await db.add(key="a")
    store = NotesDeletes(db)
    recorder = SignalsSecondPublish(db)  # commits the second event while the first goes out
    relay = make_relay(store, recorder, poll_interval=60.0, settle_linger=60.0)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.delivered == 2 and s.idle, timeout=5)
    (second,) = recorder.added
    assert store.deletes == [[first.seq, second.seq]]
    assert store.excluded[-1] == [first.seq, second.seq]  # the empty claim left both out
    relay.request_stop()
    await task
    assert await db.pending() == []
    assert [e.seq for e in recorder.published] == [first.seq, second.seq]


async def test_stopping_deletes_what_waits_to_be_deleted_at_once(db: OutboxDb) -> None:
    event = await db.add(key="a")
    store = NotesDeletes(db)
    relay: Relay | None = None

    class StopsWhilePublishing(RecordingPublisher):
        async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
            assert relay is not None
            relay.request_stop()  # SIGTERM as the batch goes out
            return await super().publish(batch)

    relay = make_relay(store, StopsWhilePublishing(), poll_interval=60.0, settle_linger=60.0)
    await asyncio.wait_for(relay.run(), 5)  # not 60 s: stopping ends the wait
    assert store.deletes == [[event.seq]]
    assert await db.pending() == []


# -- many topics: a claim grows while its events spread over many topics -----------------------
class LimitsSqliteStore(TrackedSqliteStore):
    """Notes the size of every claim the relay asks for."""

    limits: list[int]

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        self.limits.append(limit)
        return await super().claim(limit, exclude, after)


@pytest.mark.parametrize(
    ("topics", "expected"),
    [
        (1, [10, 10, 10, 10, 10, 10, 10]),  # one topic: as configured
        # most events on a topic of their own: the most a claim may grow to (100x batch_size)
        (100, [10, 1000]),
        (20, [10, 1000]),
        # spread: 50 events per topic seen; 50 per topic in the grown claim: it stays grown
        (4, [10, 200, 200, 200]),
    ],
)
async def test_a_claim_grows_while_its_events_spread_over_many_topics(
    db: OutboxDb, clock: FakeClock, topics: int, expected: list[int]
) -> None:
    await _drain_noting_claims(db, clock, topics, expected, PerPartitionPublisher())


@pytest.mark.parametrize("topics", [1, 4, 100])
async def test_a_claim_does_not_grow_for_a_publisher_whose_cost_is_per_event(
    db: OutboxDb, clock: FakeClock, topics: int
) -> None:
    await _drain_noting_claims(db, clock, topics, [10] * 60, RecordingPublisher())


class PerPartitionPublisher(RecordingPublisher):
    """As Kafka's: one record batch per partition (seams.BatchesPerPartition)."""

    batches_per_partition = True


async def _drain_noting_claims(
    db: OutboxDb,
    clock: FakeClock,
    topics: int,
    expected: list[int],
    publisher: RecordingPublisher,
) -> None:
    store = LimitsSqliteStore(db.url, clock=clock)
    store.limits = []
    events = await db.add_all(
        [OutboxEvent(topic=f"t{n % topics}", key=f"k{n}", payload={}) for n in range(600)]
    )
    stats = await make_relay(store, publisher).drain()
    assert stats.delivered == 600
    assert seqs(publisher.published) == seqs(events)
    assert store.limits[: len(expected)] == expected
    assert max(store.limits) <= 1000  # batch_size 10 x SPREAD_GROWTH


# -- the pipeline's statements go out before the publish takes the CPU ------------------------
class NotesStarts(TrackedSqliteStore):
    """Counts the claims and settles the relay has started (entered, not finished)."""

    def __init__(self, db: OutboxDb) -> None:
        super().__init__(db.url, clock=db.clock)
        self.claims_started = 0
        self.settles_started = 0

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        self.claims_started += 1
        return await super().claim(limit, exclude, after)

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        self.settles_started += 1
        return await super().mark_delivered(seqs, positions)


class SeesStarts(RecordingPublisher):
    def __init__(self, store: NotesStarts) -> None:
        super().__init__()
        self.store = store
        self.seen: list[tuple[int, int]] = []

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        self.seen.append((self.store.claims_started, self.store.settles_started))
        return await super().publish(batch)


async def test_the_prefetch_and_the_last_settle_start_before_the_next_publish(db: OutboxDb) -> None:
    """A publish is CPU work before its first await (a Kafka or Redis batch of 500 takes about
    a millisecond to build): the prefetch's claim and the previous batch's settle must already
    be on their way to Postgres then, or the settle becomes the loop's critical path."""
    await db.add_all([OutboxEvent(topic="t", key=f"k{n}", payload={}) for n in range(30)])
    store = NotesStarts(db)
    publisher = SeesStarts(store)
    stats = await make_relay(store, publisher).drain()
    assert stats.delivered == 30
    # publish n (from 0): claims 0..n+1 started (the prefetch), settles of batches 0..n-1
    assert publisher.seen == [(2, 0), (3, 1), (4, 2)]
