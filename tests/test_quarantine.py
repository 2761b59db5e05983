"""The poison story end to end, on real Postgres with real Kafka and Redis and a consumer:

1. key K gets events 1 to 5, and the broker refuses 2 for good;
2. 3 to 5 are not published, while other keys flow;
3. `outbox-relay dlq list --key K` shows the chain;
4. the cause is fixed (Kafka: the topic's size limit is raised; Redis: the key that is not a
   stream is removed);
5. `outbox-relay dlq replay --key K` is run;
6. the consumer's first arrivals for K are 1, 2, 3, 4, 5.

Also with three relay processes and a SIGKILL during the replay.
"""

from __future__ import annotations

import asyncio
import signal
import subprocess
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka.admin import AIOKafkaAdminClient
from aiokafka.admin.config_resource import ConfigResource, ConfigResourceType

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from outbox.relay.relay import Relay
from tests.helpers import (
    commit_events,
    create_topic,
    eventually,
    first_seen_order,
    pg_relay,
    read_all,
    relay_process,
)
from tests.test_schema import outbox_cli

pytestmark = pytest.mark.postgres


@dataclass
class Scene:
    """One broker's way to refuse K's event 2 for good, to fix the cause, and to read back."""

    topic: str
    bad_topic: str  # where event 2 goes
    poison_payload: dict[str, object]
    relay_args: tuple[str, ...]
    publisher: Callable[[], KafkaPublisher | RedisPublisher]
    fix: Callable[[], Awaitable[None]]
    #: Everything published, in the order the brokers took it.
    arrivals: Callable[[], Awaitable[list[Envelope]]]


async def redis_scene(redis_url: str) -> Scene:
    good, bad = f"good-{uuid.uuid4().hex[:8]}", f"bad-{uuid.uuid4().hex[:8]}"
    client = aioredis.Redis.from_url(redis_url)
    await client.set(bad, "not a stream")  # XADD to it: WRONGTYPE, refused for good
    await client.aclose()

    async def fix() -> None:
        client = aioredis.Redis.from_url(redis_url)
        await client.delete(bad)
        await client.aclose()

    async def arrivals() -> list[Envelope]:
        client = aioredis.Redis.from_url(redis_url)
        entries: list[tuple[tuple[int, int, int], Envelope]] = []
        try:
            for stream in (good, bad):
                if await client.type(stream) != b"stream":
                    continue
                stored: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(stream)  # type: ignore[assignment]
                for entry_id, fields in stored:
                    ms, n = entry_id.decode().split("-")
                    event = Envelope.from_redis(stream, fields)
                    entries.append(((int(ms), event.seq, int(n)), event))
        finally:
            await client.aclose()
        # Entry ids order a stream; across two streams an id is a millisecond, and the seq
        # orders what arrived in the same one.
        return [event for _, event in sorted(entries, key=lambda e: e[0])]

    return Scene(
        good,
        bad,
        {"n": 2},
        ("--broker", "redis", "--redis-url", redis_url),
        lambda: RedisPublisher(redis_url),
        fix,
        arrivals,
    )


async def kafka_scene(bootstrap: str) -> Scene:
    topic = f"q-{uuid.uuid4().hex[:8]}"
    await create_topic(bootstrap, topic, configs={"max.message.bytes": "3000"})

    async def fix() -> None:
        admin = AIOKafkaAdminClient(bootstrap_servers=bootstrap)
        await admin.start()
        try:
            raised = {"max.message.bytes": "1000000"}
            await admin.alter_configs([ConfigResource(ConfigResourceType.TOPIC, topic, raised)])
        finally:
            await admin.close()

    async def arrivals() -> list[Envelope]:
        return await read_all(bootstrap, topic)  # one key: one partition, in its order

    return Scene(
        topic,
        topic,
        {"n": 2, "blob": "x" * 5000},  # above the topic's limit
        ("--broker", "kafka", "--kafka-bootstrap", bootstrap),
        lambda: KafkaPublisher(bootstrap),
        fix,
        arrivals,
    )


@pytest.fixture(
    params=[
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("kafka", marks=pytest.mark.kafka),
    ]
)
async def scene(request: pytest.FixtureRequest) -> AsyncIterator[Scene]:
    if request.param == "redis":
        yield await redis_scene(request.getfixturevalue("redis_url"))
    else:
        yield await kafka_scene(request.getfixturevalue("kafka_bootstrap"))


def story(scene: Scene) -> tuple[list[OutboxEvent], list[OutboxEvent]]:
    """K's chain 1 to 5, and all events: 40 of other keys around it."""
    chain = [
        OutboxEvent(topic=scene.bad_topic, key="K", payload=scene.poison_payload)
        if n == 2
        else OutboxEvent(topic=scene.topic, key="K", payload={"n": n})
        for n in range(1, 6)
    ]
    others = [OutboxEvent(topic=scene.topic, key=f"o{i % 4}", payload={"i": i}) for i in range(40)]
    return chain, others[:20] + chain + others[20:]


def first_arrivals_of(key: str, seen: list[Envelope]) -> list[object]:
    return [e.json()["n"] for e in first_seen_order(seen) if e.key == key]


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return outbox_cli(*args, "--database-url", database_url)


@dataclass
class Running:
    relay: Relay
    task: asyncio.Task[None]

    async def stop(self) -> None:
        self.relay.request_stop()
        await self.task


async def quarantined(database_url: str, scene: Scene) -> tuple[list[OutboxEvent], Running]:
    """Steps 1 and 2, with a relay that goes on running."""
    chain, events = story(scene)
    await commit_events(database_url, events)
    relay = pg_relay(database_url, scene.publisher(), batch_size=10)
    running = Running(relay, asyncio.create_task(relay.run()))
    await relay.wait_for(lambda s: s.delivered == 41 and s.dead_lettered == 4, timeout=60)
    assert relay.stats.parked == 3
    seen = await scene.arrivals()
    assert first_arrivals_of("K", seen) == [1]  # 3 to 5 wait behind 2
    assert len(first_seen_order(seen)) == 41  # every other key flowed
    return chain, running


async def test_poison_quarantines_its_key_and_replay_restores_the_order(
    database_url: str, scene: Scene, pg: asyncpg.Connection
) -> None:
    chain, running = await quarantined(database_url, scene)
    relay = running.relay
    try:
        listed = await asyncio.to_thread(cli, database_url, "dlq", "list", "--key", "K")
        assert listed.returncode == 0, listed.stderr
        header, *rows = listed.stdout.splitlines()  # `dlq list` prints the field names first
        assert header.startswith("event_id\t")
        lines = [line.split("\t") for line in rows]
        assert [line[0] for line in lines] == [str(e.id) for e in chain[1:]]
        assert lines[0][7] in {"ResponseError", "MessageSizeTooLargeError"}
        assert scene.bad_topic in lines[0][8]  # the error names the topic
        assert [line[9] for line in lines] == ["True"] * 4  # each holds the key
        assert {line[10] for line in lines[1:]} == {str(chain[1].id)}  # held behind 2

        middle = await asyncio.to_thread(
            cli, database_url, "dlq", "replay", "--id", str(chain[3].id)
        )
        assert middle.returncode == 1
        assert middle.stderr.count("\n") == 1
        assert "dlq replay --key K" in middle.stderr

        await scene.fix()
        replayed = await asyncio.to_thread(cli, database_url, "dlq", "replay", "--key", "K")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 4" in replayed.stdout
        await relay.wait_for(lambda s: s.delivered == 45, timeout=60)
    finally:
        await running.stop()
    assert first_arrivals_of("K", await scene.arrivals()) == [1, 2, 3, 4, 5]
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0


async def test_discard_the_poison_then_replay_the_rest(
    database_url: str, scene: Scene, pg: asyncpg.Connection
) -> None:
    chain, running = await quarantined(database_url, scene)
    relay = running.relay
    try:
        poison = str(chain[1].id)
        unsure = await asyncio.to_thread(cli, database_url, "dlq", "discard", "--id", poison)
        assert unsure.returncode == 2
        assert unsure.stderr.count("\n") == 1
        assert "--yes" in unsure.stderr
        dropped = await asyncio.to_thread(
            cli, database_url, "dlq", "discard", "--id", poison, "--yes"
        )
        assert dropped.returncode == 0, dropped.stderr
        assert "discarded 1" in dropped.stdout
        replayed = await asyncio.to_thread(cli, database_url, "dlq", "replay", "--key", "K")
        assert "replayed 3" in replayed.stdout, replayed.stderr
        await relay.wait_for(lambda s: s.delivered == 44, timeout=60)
    finally:
        await running.stop()
    assert first_arrivals_of("K", await scene.arrivals()) == [1, 3, 4, 5]
    nothing = await asyncio.to_thread(cli, database_url, "dlq", "discard", "--key", "K", "--yes")
    assert "discarded 0" in nothing.stdout
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0


async def test_replay_with_three_relays_and_a_sigkill(
    database_url: str, scene: Scene, pg: asyncpg.Connection
) -> None:
    _, events = story(scene)
    args = (*scene.relay_args, "--batch-size", "5", "--lease-seconds", "2")
    relays = [relay_process(database_url, *args, "--poll-interval", "0.2") for _ in range(3)]
    try:
        await commit_events(database_url, events)

        async def quarantined_and_drained() -> bool:
            dead = await pg.fetchval("SELECT count(*) FROM outbox_dead_letters")
            return dead == 4 and not await pg.fetchval("SELECT count(*) FROM outbox_events")

        await eventually(quarantined_and_drained, timeout=90)
        assert first_arrivals_of("K", await scene.arrivals()) == [1]

        await scene.fix()
        replay = asyncio.create_task(
            asyncio.to_thread(cli, database_url, "dlq", "replay", "--key", "K")
        )
        relays[0].send_signal(signal.SIGKILL)  # one relay dies while the chain comes back
        replayed = await replay
        assert replayed.returncode == 0, replayed.stderr

        async def chain_arrived() -> bool:
            return len(first_arrivals_of("K", await scene.arrivals())) == 5

        await eventually(chain_arrived, timeout=90, every=0.5)  # a dead relay's buckets move
    finally:
        for process in relays:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in relays:
            process.communicate(timeout=60)
    assert first_arrivals_of("K", await scene.arrivals()) == [1, 2, 3, 4, 5]
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
