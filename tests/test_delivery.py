"""End to end on real services: Postgres outbox → relay → real Kafka / Redis, read back by a
real consumer. Retries, dead letters, outages, several relays, SIGKILL and SIGTERM."""

from __future__ import annotations

import asyncio
import json
import signal
import uuid
from collections import Counter

import asyncpg
import pytest

from outbox import Envelope, OutboxEvent
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from outbox.relay.retry import CircuitBreaker, RetryPolicy
from outbox.relay.testing import FaultInjector
from tests.helpers import (
    assert_per_key_order,
    commit_events,
    keyed_events,
    pg_relay,
    read_stream,
    read_topic,
    relay_process,
    services,
)

pytestmark = pytest.mark.postgres


async def commit_and_roll_back(database_url: str, topic: str) -> list[OutboxEvent]:
    """30 committed events of 3 keys, plus one transaction that rolls back."""
    events = keyed_events(topic, keys=3, per_key=10)
    await commit_events(database_url, events)
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    from outbox.urls import sqlalchemy_async_url

    engine = create_async_engine(sqlalchemy_async_url(database_url))
    async with AsyncSession(engine) as session, session.begin():
        session.add(OutboxEvent(topic=topic, key="key-0", payload={"rolled": "back"}))
        await session.flush()
        await session.rollback()
    await engine.dispose()
    return events


@pytest.mark.kafka
async def test_kafka_receives_every_committed_event(
    database_url: str, kafka_bootstrap: str, topic: str, pg: asyncpg.Connection
) -> None:
    events = await commit_and_roll_back(database_url, topic)
    stats = await pg_relay(database_url, KafkaPublisher(kafka_bootstrap)).drain()
    assert stats.delivered == 30
    received = await read_topic(kafka_bootstrap, topic, 30)
    assert [e.id for e in received if e.key == "key-1"] == [
        e.id for e in events if e.key == "key-1"
    ]
    assert {e.id for e in received} == {e.id for e in events}
    first = next(e for e in received if e.id == events[0].id)
    assert first.key == "key-0"
    assert first.event_type == "Counted"
    assert first.headers == {"n": "0"}
    assert json.loads(first.payload) == {"k": 0, "n": 0}
    assert_per_key_order(received)
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0


@pytest.mark.redis
async def test_redis_stream_receives_every_committed_event(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    events = await commit_and_roll_back(database_url, topic)
    await pg_relay(database_url, RedisPublisher(redis_url)).drain()
    received = await read_stream(redis_url, topic, 30)
    assert [e.id for e in received] == [e.id for e in events]  # one key order = seq order here
    assert received[0].headers == {"n": "0"}
    assert received[0].event_type == "Counted"
    assert len(received) == 30
    assert_per_key_order(received)
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0


@pytest.mark.redis
async def test_retry_then_success_keeps_key_order(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    events = keyed_events(topic, keys=2, per_key=3)
    await commit_events(database_url, events)
    flaky = events[0]  # first event of key-0
    publisher = FaultInjector.scripted(RedisPublisher(redis_url), failures={flaky.id: 2})
    relay = pg_relay(database_url, publisher)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.delivered == 6, timeout=30)
    relay.request_stop()
    await task
    received = await read_stream(redis_url, topic, 6)
    assert [e.id for e in received if e.key == "key-0"] == [
        e.id for e in events if e.key == "key-0"
    ]
    assert relay.stats.retried == 2
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0


@pytest.mark.redis
async def test_max_attempts_then_dead_letter(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    doomed, after = keyed_events(topic, keys=1, per_key=2)
    await commit_events(database_url, [doomed, after])
    publisher = FaultInjector.scripted(RedisPublisher(redis_url), failures={doomed.id: 99})
    policy = RetryPolicy(base_seconds=0.02, max_seconds=0.05, max_attempts=3)
    relay = pg_relay(database_url, publisher, relay_id="dlq-test", retry_policy=policy)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.dead_lettered == 2 and s.idle, timeout=30)
    relay.request_stop()
    await task
    assert relay.stats.parked == 1  # `after` waits behind it: same key
    row = await pg.fetchrow("SELECT * FROM outbox_dead_letters ORDER BY original_seq LIMIT 1")
    assert row["event_id"] == doomed.id
    assert row["attempts"] == 3
    assert row["error_class"] == "InjectedError"
    assert row["relay_id"] == "dlq-test"
    assert row["key"] == "key-0"
    assert json.loads(row["payload"]) == {"k": 0, "n": 0}
    assert row["first_failed_at"] <= row["last_failed_at"]
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    parked = await pg.fetchrow("SELECT * FROM outbox_dead_letters ORDER BY original_seq DESC")
    assert (parked["event_id"], parked["held_behind"], parked["attempts"]) == (
        after.id,
        doomed.id,
        0,
    )
    assert await read_stream(redis_url, topic, None) == []


@pytest.mark.kafka
async def test_non_retriable_kafka_error_dead_letters_at_once(
    database_url: str, kafka_bootstrap: str, topic: str, pg: asyncpg.Connection
) -> None:
    big = OutboxEvent(topic=topic, key="a", payload={"blob": "x" * 20_000})
    behind = OutboxEvent(topic=topic, key="a", payload={"ok": True})
    small = OutboxEvent(topic=topic, key="b", payload={"ok": True})
    await commit_events(database_url, [big, behind, small])
    publisher = KafkaPublisher(kafka_bootstrap, max_request_size=10_000)
    stats = await pg_relay(database_url, publisher).drain()
    assert stats.retried == 0
    assert (stats.dead_lettered, stats.parked) == (2, 1)
    rows = await pg.fetch(
        "SELECT event_id, attempts, error_class, held_behind FROM outbox_dead_letters "
        "ORDER BY original_seq"
    )
    assert [(r["event_id"], r["attempts"], r["error_class"], r["held_behind"]) for r in rows] == [
        (big.id, 1, "MessageSizeTooLargeError", None),
        (behind.id, 0, "Quarantined", big.id),  # key a waits behind it, in order
    ]
    assert [e.id for e in await read_topic(kafka_bootstrap, topic, 1)] == [small.id]


@pytest.mark.redis
async def test_dead_letter_replay_from_the_cli(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    poison = OutboxEvent(topic=topic, key="a", payload={"n": 1})
    await commit_events(database_url, [poison])
    await pg_relay(
        database_url, FaultInjector.scripted(RedisPublisher(redis_url), poison={poison.id})
    ).drain()
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 1
    from tests.test_schema import outbox_cli

    listed = await asyncio.to_thread(outbox_cli, "dlq", "list", "--database-url", database_url)
    assert str(poison.id) in listed.stdout
    bad = await asyncio.to_thread(
        outbox_cli, "dlq", "replay", "--id", "nope", "--database-url", database_url
    )
    assert bad.returncode != 0
    assert bad.stderr.count("\n") == 1
    assert "--id" in bad.stderr
    done = await asyncio.to_thread(
        outbox_cli, "dlq", "replay", "--id", str(poison.id), "--database-url", database_url
    )
    assert done.returncode == 0, done.stderr
    assert "replayed 1" in done.stdout
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    await pg_relay(database_url, RedisPublisher(redis_url)).drain()
    assert [e.id for e in await read_stream(redis_url, topic, 1)] == [poison.id]


@pytest.mark.redis
async def test_per_key_order_with_three_relays_and_injected_failures(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    events = keyed_events(topic, keys=20, per_key=30)
    failing = {e.id: 1 + i % 2 for i, e in enumerate(events[:40:3])}  # early events, 1-2 times
    injectors = [
        FaultInjector.scripted(RedisPublisher(redis_url), failures=failing) for _ in range(3)
    ]
    relays = [pg_relay(database_url, p, batch_size=25, lease_seconds=1.5) for p in injectors]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    for relay in relays:  # the buckets are shared out before the events arrive
        await relay.wait_for(lambda s: s.owned_buckets >= 20, timeout=30)
    assert sum(r.stats.owned_buckets for r in relays) == 64
    await commit_events(database_url, events)
    received = await read_stream(redis_url, topic, len(events), timeout=60)
    for relay in relays:
        relay.request_stop()
    await asyncio.gather(*tasks)
    assert_per_key_order(received)
    counts = Counter(e.id for e in received)
    assert set(counts) == {e.id for e in events}
    assert max(counts.values()) == 1  # steady state: nothing published twice
    assert sum(r.stats.retried for r in relays) >= len(failing)
    assert all(r.stats.delivered for r in relays)  # the work was really shared
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0


@pytest.mark.redis
async def test_fencing_a_relay_that_lost_its_lease_changes_nothing(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    from outbox.relay.stores.postgres import PostgresStore

    await commit_events(database_url, keyed_events(topic, keys=4, per_key=2))
    store = PostgresStore(database_url, lease_seconds=30)
    await store.start("zombie")
    assert await store.maintain_leases(rebalance=True) == 64
    batch = (await store.claim(100)).events
    assert len(batch) == 8
    await pg.execute("UPDATE outbox_bucket_leases SET owner = 'usurper'")  # leases taken over
    assert await store.mark_delivered([e.seq for e in batch]) == 0
    assert not await store.claim(100)
    await store.stop()
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 8


@pytest.mark.redis
async def test_postgres_connection_loss_is_survived(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    relay = pg_relay(database_url, RedisPublisher(redis_url))
    relay._breaker = CircuitBreaker(base_seconds=0.05, max_seconds=0.1)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.idle, timeout=10)
    dbname = database_url.rsplit("/", 1)[1]
    await pg.execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
        "WHERE datname = $1 AND pid <> pg_backend_pid()",
        dbname,
    )
    await commit_events(database_url, keyed_events(topic, keys=2, per_key=5))
    await relay.wait_for(lambda s: s.delivered == 10, timeout=30)
    relay.request_stop()
    await task
    assert len(await read_stream(redis_url, topic, 10)) == 10


@pytest.mark.redis
@pytest.mark.slow
async def test_redis_outage_dead_letters_nothing(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    await asyncio.to_thread(services, "stop", "redis")
    try:
        await commit_events(database_url, keyed_events(topic, keys=3, per_key=5))
        relay = pg_relay(database_url, RedisPublisher(redis_url))
        relay._breaker = CircuitBreaker(base_seconds=0.2, max_seconds=1)
        task = asyncio.create_task(relay.run())
        await relay.wait_for(lambda s: s.broker_failures >= 3, timeout=60)
        assert await pg.fetchval("SELECT max(attempts) FROM outbox_events") == 0
    finally:
        await asyncio.to_thread(services, "start", "redis")
    await relay.wait_for(lambda s: s.delivered == 15, timeout=60)
    relay.request_stop()
    await task
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    assert len(await read_stream(redis_url, topic, 15)) == 15


@pytest.mark.kafka
@pytest.mark.slow
async def test_kafka_outage_dead_letters_nothing(
    database_url: str, kafka_bootstrap: str, topic: str, pg: asyncpg.Connection
) -> None:
    await commit_events(database_url, keyed_events(topic, keys=3, per_key=2))
    relay = pg_relay(database_url, KafkaPublisher(kafka_bootstrap, request_timeout_ms=3000))
    relay._breaker = CircuitBreaker(base_seconds=0.5, max_seconds=2)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.delivered == 6, timeout=60)
    await asyncio.to_thread(services, "stop", "kafka")
    try:
        await commit_events(database_url, keyed_events(topic, keys=3, per_key=5))
        await relay.wait_for(lambda s: s.broker_failures >= 2, timeout=90)
        assert await pg.fetchval("SELECT max(attempts) FROM outbox_events") == 0
    finally:
        await asyncio.to_thread(services, "start", "kafka")
    await relay.wait_for(lambda s: s.delivered == 21, timeout=120)
    relay.request_stop()
    await task
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    received = await read_topic(kafka_bootstrap, topic, 21, timeout=60)
    assert len({e.id for e in received}) == 21


@pytest.mark.redis
@pytest.mark.slow
async def test_sigkill_mid_batch_then_another_relay_delivers_everything(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    events = keyed_events(topic, keys=50, per_key=200)  # 10,000 events
    await commit_events(database_url, events)
    victim = relay_process(
        database_url,
        "--broker",
        "redis",
        "--redis-url",
        redis_url,
        "--lease-seconds",
        "2",
        "--batch-size",
        "50",
        "--relay-id",
        "victim",
    )
    await read_stream(redis_url, topic, 500, timeout=60)  # it is busy publishing
    victim.send_signal(signal.SIGKILL)
    victim.wait(10)
    left = await pg.fetchval("SELECT count(*) FROM outbox_events")
    assert 0 < left < len(events)
    owned = await pg.fetchval("SELECT count(*) FROM outbox_bucket_leases WHERE owner = 'victim'")
    assert owned == 64  # still held by the dead relay until the lease expires
    rescuer = pg_relay(database_url, RedisPublisher(redis_url), lease_seconds=2)
    task = asyncio.create_task(rescuer.run())
    await rescuer.wait_for(lambda s: s.delivered >= left, timeout=120)
    received = await read_stream(redis_url, topic, None, timeout=60)  # duplicates included
    rescuer.request_stop()
    await task
    assert {e.id for e in received} >= {e.id for e in events}  # no loss
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    # Order holds per key up to the duplicates re-published after the kill.
    first_seen: dict[uuid.UUID, int] = {}
    for position, event in enumerate(received):
        first_seen.setdefault(event.id, position)
    assert_per_key_order(
        sorted({e.id: e for e in received}.values(), key=lambda e: first_seen[e.id])
    )


@pytest.mark.redis
@pytest.mark.slow
async def test_sigterm_exits_zero_and_releases_everything(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    await commit_events(database_url, keyed_events(topic, keys=5, per_key=20))
    proc = relay_process(
        database_url,
        "--broker",
        "redis",
        "--redis-url",
        redis_url,
        "--relay-id",
        f"term-{uuid.uuid4().hex[:4]}",
    )
    received = await read_stream(redis_url, topic, 100)
    assert len(received) == 100
    proc.send_signal(signal.SIGTERM)
    _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    records = [json.loads(line) for line in stderr.decode().splitlines()]
    started = next(r for r in records if r["event"] == "relay_started")
    assert started["event_loop"] == "uvloop"  # the default where uvloop is installed
    assert records[-1]["event"] == "relay_stopped"
    assert (
        await pg.fetchval("SELECT count(*) FROM outbox_bucket_leases WHERE owner IS NOT NULL") == 0
    )
    assert await pg.fetchval("SELECT count(*) FROM outbox_relays") == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0


@pytest.mark.redis
async def test_redis_pubsub_is_opt_in_and_delivers_to_live_subscribers(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    import redis.asyncio as aioredis

    client = aioredis.Redis.from_url(redis_url)
    pubsub = client.pubsub()
    await pubsub.subscribe(topic)
    await pubsub.get_message(timeout=5)  # the subscribe confirmation
    events = keyed_events(topic, keys=2, per_key=3)
    await commit_events(database_url, events)
    await pg_relay(database_url, RedisPublisher(redis_url, mode="pubsub")).drain()
    received: list[Envelope] = []
    async with asyncio.timeout(30):
        while len(received) < len(events):
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=5)
            if message is not None:
                received.append(Envelope.from_redis_message(topic, message["data"]))
    await pubsub.aclose()  # type: ignore[no-untyped-call]
    await client.aclose()
    assert [m.id for m in received] == [e.id for e in events]
    assert received[0].key == "key-0"
    assert received[0].json() == {"k": 0, "n": 0}
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
