"""Shared helpers of the integration tests: write events, read them back from real brokers."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.structs import TopicPartition
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay.relay import Relay
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import Publisher
from outbox.relay.stores.postgres import PostgresStore
from outbox.urls import sqlalchemy_async_url

ROOT = Path(__file__).resolve().parent.parent


async def commit_events(database_url: str, events: Sequence[OutboxEvent]) -> None:
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        session.add_all(events)
    await engine.dispose()


def keyed_events(topic: str, keys: int, per_key: int) -> list[OutboxEvent]:
    """per_key events for each of `keys` keys, interleaved, with a per-key counter in payload."""
    return [
        OutboxEvent(
            topic=topic,
            key=f"key-{k}",
            payload={"k": k, "n": n},
            headers={"n": str(n)},
            event_type="Counted",
        )
        for n in range(per_key)
        for k in range(keys)
    ]


def pg_relay(
    database_url: str,
    publisher: Publisher,
    *,
    relay_id: str | None = None,
    lease_seconds: float = 3.0,
    database_timeout: float = 30.0,
    batch_size: int = 100,
    retry_policy: RetryPolicy | None = None,
) -> Relay:
    return Relay(
        PostgresStore(database_url, lease_seconds=lease_seconds, database_timeout=database_timeout),
        publisher,
        relay_id=relay_id or f"test-{uuid.uuid4().hex[:6]}",
        batch_size=batch_size,
        poll_interval=0.2,
        lease_seconds=lease_seconds,
        retry_policy=retry_policy
        or RetryPolicy(base_seconds=0.05, max_seconds=0.2, max_attempts=5),
    )


async def read_stream(
    redis_url: str, stream: str, count: int | None, timeout: float = 30
) -> list[Envelope]:
    """Read `count` entries of a Redis stream (None: all it holds now), blocking until they
    are there."""
    client = aioredis.Redis.from_url(redis_url)
    if count is None:
        count = await client.xlen(stream)
    out: list[Envelope] = []
    last: bytes | str = "0-0"
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count:
                reply: list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
                reply = await client.xread({stream: last}, count=1000, block=1000)  # type: ignore[assignment]
                for _, entries in reply:
                    for entry_id, fields in entries:
                        last = entry_id
                        out.append(Envelope.from_redis(stream, fields))
    finally:
        await client.aclose()
    return out


async def poll_envelopes(consumer: AIOKafkaConsumer, timeout_ms: int) -> list[Envelope]:
    """One poll of a consumer, as envelopes."""
    batches = await consumer.getmany(timeout_ms=timeout_ms)
    return [
        Envelope.from_kafka(r.topic, r.key, r.value, r.headers)
        for records in batches.values()
        for r in records
    ]


async def read_topic(bootstrap: str, topic: str, count: int, timeout: float = 60) -> list[Envelope]:
    """Read `count` records of a Kafka topic from the beginning, with a real consumer."""
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        auto_offset_reset="earliest",
        enable_auto_commit=False,
        group_id=None,
    )
    await consumer.start()
    out: list[Envelope] = []
    try:
        async with asyncio.timeout(timeout):
            while len(out) < count:
                out += await poll_envelopes(consumer, 1000)
    finally:
        await consumer.stop()
    return out


async def create_topic(
    bootstrap: str, name: str, partitions: int = 3, configs: dict[str, str] | None = None
) -> None:
    admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(name, partitions, 1, topic_configs=configs or {})])
    finally:
        await admin.close()


async def read_all(
    bootstrap: str, topic: str, partitions: int = 3, timeout: float = 60
) -> list[Envelope]:
    """Every record of a topic (duplicates included), up to its end offsets now."""
    consumer = AIOKafkaConsumer(
        bootstrap_servers=bootstrap, enable_auto_commit=False, group_id=None
    )
    await consumer.start()
    out: list[Envelope] = []
    tps = [TopicPartition(topic, p) for p in range(partitions)]
    try:
        async with asyncio.timeout(timeout):
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)

            async def behind() -> bool:
                return any([await consumer.position(tp) < ends[tp] for tp in tps])

            while await behind():
                out += await poll_envelopes(consumer, 500)
    finally:
        await consumer.stop()
    return out


def first_seen_order(received: list[Envelope]) -> list[Envelope]:
    """The records in the order each event first appeared (resent duplicates dropped)."""
    seen: dict[uuid.UUID, Envelope] = {}
    for event in received:
        seen.setdefault(event.id, event)
    return list(seen.values())


def assert_per_key_order(received: Sequence[Envelope]) -> None:
    last: dict[str | None, int] = {}
    for event in received:
        if event.key is None:
            continue
        assert event.seq > last.get(event.key, 0), (
            f"key {event.key}: {event.seq} after {last[event.key]}"
        )
        last[event.key] = event.seq


def services(*args: str) -> None:
    """scripts/services.sh start|stop NAME, for outage tests."""
    subprocess.run(
        ["bash", str(ROOT / "scripts" / "services.sh"), *args],
        check=True,
        stdout=subprocess.DEVNULL,
        timeout=300,
    )


def relay_process(
    database_url: str, *args: str, env: Mapping[str, str] | None = None
) -> subprocess.Popen[bytes]:
    """The real `outbox-relay run` CLI in a child process; `env`: more variables."""
    environ = os.environ | {"OUTBOX_DATABASE_URL": database_url, "OUTBOX_LOG_FORMAT": "json"}
    return subprocess.Popen(
        [sys.executable, "-m", "outbox.relay.cli", "run", *args],
        env=environ | dict(env or {}),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )


async def eventually(
    check: Callable[[], Awaitable[bool]], timeout: float, every: float = 0.1
) -> None:
    """Wait until `check()` holds, for state that only another process changes (a relay in a
    child process, a broker): there is no event of ours to wait on. TimeoutError if not."""
    async with asyncio.timeout(timeout):
        while True:
            if await check():
                return
            await asyncio.sleep(every)


def free_port() -> int:
    """A loopback TCP port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port
