"""The loop and the backoff, with the in-memory store, a fake publisher and a fake clock."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

import pytest
import structlog.testing

from outbox.envelope import Envelope
from relay.relay import Relay, RelayStats
from relay.retry import CircuitBreaker, PollPacer, RetryPolicy
from relay.seams import PublishResult
from relay.testing import FaultInjector
from tests.fakes import MemoryStore, RecordingPublisher

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


def test_poll_pacer_polls_fast_only_for_unannounced_events() -> None:
    pacer = PollPacer(interval=1.0, fast=0.01)
    assert pacer.after_claim(found=True, announced=True) == 1.0  # NOTIFYs flow: just wait
    assert pacer.after_claim(found=False, announced=True) == 1.0
    assert pacer.after_claim(found=True, announced=False) == 0.01  # found by the timer
    assert pacer.after_claim(found=True, announced=False) == 0.01  # ... and again
    backing_off = [pacer.after_claim(found=False, announced=False) for _ in range(8)]
    assert backing_off == [0.02, 0.04, 0.08, 0.16, 0.32, 0.64, 1.0, 1.0]
    assert pacer.after_claim(found=True, announced=True) == 1.0
    assert PollPacer(interval=0.005).after_claim(found=True, announced=False) == 0.005


def make_relay(store: MemoryStore, publisher: object, **kw: object) -> Relay:
    defaults: dict[str, object] = {
        "relay_id": "test",
        "batch_size": 10,
        "poll_interval": 0.01,
        "retry_policy": RetryPolicy(base_seconds=5, factor=2, max_attempts=3, jitter=0.0),
        "rand": lambda: 0.0,
    }
    return Relay(store, publisher, **(defaults | kw))  # type: ignore[arg-type]


async def test_drain_publishes_everything_in_order_and_deletes() -> None:
    store, publisher = MemoryStore(), RecordingPublisher()
    events = [store.add(key=f"k{i % 3}") for i in range(25)]
    stats = await make_relay(store, publisher).drain()
    assert [e.seq for e in publisher.published] == [e.seq for e in events]
    assert stats.delivered == 25
    assert stats.batches == 3  # batch_size 10: keeps draining while batches are full
    assert not store.rows
    assert store.stopped


async def test_retry_holds_back_the_key_then_succeeds() -> None:
    store, recorder = MemoryStore(), RecordingPublisher()
    first = store.add(key="a")
    second = store.add(key="a")
    other = store.add(key="b")
    publisher = FaultInjector.scripted(recorder, failures={first.id: 2})
    relay = make_relay(store, publisher)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.retried == 1 and s.idle, timeout=5)
    assert [e.seq for e in recorder.published] == [other.seq]  # b flows, a waits
    assert store.rows[first.seq].event.attempts == 1
    assert store.delays == [5.0]
    store.clock.advance(5)
    relay.wake()
    await relay.wait_for(lambda s: s.retried == 2, timeout=5)
    assert store.delays == [5.0, 10.0]  # exponential
    store.clock.advance(10)
    relay.wake()
    await relay.wait_for(lambda s: s.delivered == 3, timeout=5)
    relay.request_stop()
    await task
    assert [e.seq for e in recorder.published] == [other.seq, first.seq, second.seq]
    assert relay.stats.held_back >= 1
    assert not store.dead


async def test_max_attempts_then_dead_letter_and_successor_flows() -> None:
    store, recorder = MemoryStore(), RecordingPublisher()
    doomed = store.add(key="a")
    after = store.add(key="a")
    relay = make_relay(store, FaultInjector.scripted(recorder, failures={doomed.id: 99}))
    task = asyncio.create_task(relay.run())
    for attempt in (1, 2):

        def retried(stats: RelayStats, n: int = attempt) -> bool:
            return stats.retried == n

        await relay.wait_for(retried, timeout=5)
        store.clock.advance(3600)
        relay.wake()
    await relay.wait_for(lambda s: s.dead_lettered == 1 and s.delivered == 1, timeout=5)
    relay.request_stop()
    await task
    ((event, dead),) = store.dead
    assert event.id == doomed.id
    assert dead.error_class == "InjectedError"
    assert [e.id for e in recorder.published] == [after.id]


async def test_non_retriable_goes_to_dead_letters_at_once() -> None:
    store, recorder = MemoryStore(), RecordingPublisher()
    poison = store.add(key="a")
    fine = store.add(key="a")
    stats = await make_relay(store, FaultInjector.scripted(recorder, poison={poison.id})).drain()
    assert stats.retried == 0
    assert [e.id for e, _ in store.dead] == [poison.id]
    assert store.dead[0][1].error_class == "MessageRejected"
    assert [e.id for e in recorder.published] == [fine.id]


async def test_broker_outage_burns_no_attempts() -> None:
    store, publisher = MemoryStore(), RecordingPublisher()
    for i in range(5):
        store.add(key=f"k{i}")
    publisher.down = True
    relay = make_relay(store, publisher)
    relay._breaker = CircuitBreaker(base_seconds=0.01, max_seconds=0.02)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.broker_failures >= 3, timeout=5)
    assert all(r.event.attempts == 0 for r in store.rows.values())
    assert not store.dead
    publisher.down = False
    await relay.wait_for(lambda s: s.delivered == 5, timeout=5)
    relay.request_stop()
    await task


async def test_crash_in_publisher_stops_the_relay_and_is_raised() -> None:
    class Broken(RecordingPublisher):
        async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
            raise ValueError("bug in publisher")

    store = MemoryStore()
    store.add()
    with pytest.raises(ValueError, match="bug in publisher"):
        await asyncio.wait_for(make_relay(store, Broken()).run(), 5)
    assert store.stopped
    assert len(store.rows) == 1  # nothing lost


async def test_stop_finishes_and_releases() -> None:
    store, publisher = MemoryStore(), RecordingPublisher()
    relay = make_relay(store, publisher)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.idle, timeout=5)
    relay.request_stop()
    await asyncio.wait_for(task, 5)
    assert store.stopped


async def test_stop_while_the_broker_is_down_at_startup_is_clean() -> None:
    store, publisher = MemoryStore(), RecordingPublisher()
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


async def test_unannounced_events_make_the_relay_poll_fast() -> None:
    """Writers with `outbox.notify = off`: nothing calls wake(), the timer finds the events."""
    store, publisher = MemoryStore(), RecordingPublisher()
    relay = make_relay(store, publisher, poll_interval=0.05)
    delays: list[float] = []
    wait = relay._wait_for_work

    async def recording_wait(delay: float) -> bool:
        delays.append(delay)
        return await wait(delay)

    relay._wait_for_work = recording_wait  # type: ignore[method-assign]
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.idle, timeout=5)  # one empty claim done
    store.add(key="a")  # no relay.wake(): no NOTIFY announced it
    await relay.wait_for(lambda s: s.delivered == 1, timeout=5)
    await relay.wait_for(lambda s: 0.04 in delays, timeout=5)  # backing off after "a"
    relay.wake()  # announced, as a NOTIFY would
    store.add(key="b")
    relay.wake()
    await relay.wait_for(lambda s: s.delivered == 2, timeout=5)
    await relay.wait_for(lambda s: s.idle, timeout=5)
    relay.request_stop()
    await task
    found_at = delays.index(0.01)  # the wait right after the timer found "a"
    assert delays[:found_at] == [0.05] * found_at
    assert delays[found_at + 1 : found_at + 3] == [0.02, 0.04]  # empty claims back off
    assert 0.01 not in delays[found_at + 3 :]  # "b" was announced: no fast poll for it
