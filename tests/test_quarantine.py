"""The poison story end to end, on real Postgres and Redis: a refused event quarantines its key,
the key's later events wait in the dead letters while other keys flow, and after the cause is
fixed, `outbox-relay dlq replay --key K` delivers the chain in its original order."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import uuid

import asyncpg
import pytest
import redis.asyncio as aioredis

from outbox import OutboxEvent
from relay.publishers.redis import RedisPublisher
from tests.helpers import commit_events, eventually, pg_relay, relay_process
from tests.test_schema import outbox_cli

pytestmark = [pytest.mark.postgres, pytest.mark.redis]


def story(good: str, bad: str) -> tuple[list[OutboxEvent], list[OutboxEvent]]:
    """Key K gets 1 to 5, where 2 goes to the `bad` stream (poison until fixed), plus 40 events
    of other keys around them."""
    chain = [
        OutboxEvent(topic=bad if n == 2 else good, key="K", payload={"n": n}) for n in range(1, 6)
    ]
    others = [OutboxEvent(topic=good, key=f"o{i % 4}", payload={"i": i}) for i in range(40)]
    return chain, others[:20] + chain + others[20:]


async def arrivals(redis_url: str, *streams: str) -> list[dict[str, object]]:
    """Every entry of the streams, in the order Redis appended them (entry ids)."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: list[tuple[tuple[int, int], dict[bytes, bytes]]] = []
        for stream in streams:
            for entry_id, fields in await client.xrange(stream):
                ms, n = entry_id.decode().split("-")
                entries.append(((int(ms), int(n)), fields))
    finally:
        await client.aclose()
    # Entry ids order a stream; across two streams an id is a millisecond, and the relay's
    # seq orders what arrived in the same one.
    entries.sort(key=lambda e: (e[0][0], int(e[1][b"seq"]), e[0][1]))
    return [
        {"id": f[b"id"].decode(), "key": f[b"key"].decode(), **json.loads(f[b"payload"])}
        for _, f in entries
    ]


def first_arrivals_of(key: str, seen: list[dict[str, object]]) -> list[object]:
    firsts: dict[object, dict[str, object]] = {}
    for entry in seen:
        firsts.setdefault(entry["id"], entry)
    return [e["n"] for e in firsts.values() if e["key"] == key]


def cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return outbox_cli(*args, "--database-url", database_url)


async def poison_the_bad_stream(redis_url: str, bad: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.set(bad, "not a stream")  # XADD to it: WRONGTYPE, refused for good
    await client.aclose()


async def fix_the_bad_stream(redis_url: str, bad: str) -> None:
    client = aioredis.Redis.from_url(redis_url)
    await client.delete(bad)
    await client.aclose()


async def test_poison_quarantines_its_key_and_replay_restores_the_order(
    database_url: str, redis_url: str, pg: asyncpg.Connection
) -> None:
    good, bad = f"good-{uuid.uuid4().hex[:8]}", f"bad-{uuid.uuid4().hex[:8]}"
    await poison_the_bad_stream(redis_url, bad)
    chain, events = story(good, bad)
    await commit_events(database_url, events)
    relay = pg_relay(database_url, RedisPublisher(redis_url), batch_size=10)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.delivered == 41 and s.dead_lettered == 4, timeout=30)
        seen = await arrivals(redis_url, good)
        assert first_arrivals_of("K", seen) == [1]  # 3 to 5 wait behind 2
        assert len(seen) == 41  # every other key flowed
        assert relay.stats.parked == 3

        listed = await asyncio.to_thread(cli, database_url, "dlq", "list", "--key", "K")
        assert listed.returncode == 0, listed.stderr
        lines = [line.split("\t") for line in listed.stdout.splitlines()]
        assert [line[0] for line in lines] == [str(e.id) for e in chain[1:]]
        assert lines[0][7] == "ResponseError"
        assert "WRONGTYPE" in lines[0][8]
        assert {line[10] for line in lines[1:]} == {str(chain[1].id)}  # held behind 2

        middle = await asyncio.to_thread(
            cli, database_url, "dlq", "replay", "--id", str(chain[3].id)
        )
        assert middle.returncode == 1
        assert middle.stderr.count("\n") == 1
        assert "dlq replay --key K" in middle.stderr

        await fix_the_bad_stream(redis_url, bad)
        replayed = await asyncio.to_thread(cli, database_url, "dlq", "replay", "--key", "K")
        assert replayed.returncode == 0, replayed.stderr
        assert "replayed 4" in replayed.stdout
        await relay.wait_for(lambda s: s.delivered == 45, timeout=30)
    finally:
        relay.request_stop()
        await task
    assert first_arrivals_of("K", await arrivals(redis_url, good, bad)) == [1, 2, 3, 4, 5]
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0


async def test_replay_with_three_relays_and_a_sigkill(
    database_url: str, redis_url: str, pg: asyncpg.Connection
) -> None:
    good, bad = f"good-{uuid.uuid4().hex[:8]}", f"bad-{uuid.uuid4().hex[:8]}"
    await poison_the_bad_stream(redis_url, bad)
    _, events = story(good, bad)
    args = ("--broker", "redis", "--redis-url", redis_url, "--batch-size", "5")
    args += ("--lease-seconds", "2", "--poll-interval", "0.2")
    relays = [relay_process(database_url, *args) for _ in range(3)]
    try:
        await commit_events(database_url, events)

        async def quarantined_and_drained() -> bool:
            dead = await pg.fetchval("SELECT count(*) FROM outbox_dead_letters")
            return dead == 4 and not await pg.fetchval("SELECT count(*) FROM outbox_events")

        await eventually(quarantined_and_drained, timeout=60)
        assert first_arrivals_of("K", await arrivals(redis_url, good)) == [1]

        await fix_the_bad_stream(redis_url, bad)
        replay = asyncio.create_task(
            asyncio.to_thread(cli, database_url, "dlq", "replay", "--key", "K")
        )
        relays[0].send_signal(signal.SIGKILL)  # one relay dies while the chain comes back
        replayed = await replay
        assert replayed.returncode == 0, replayed.stderr

        async def chain_arrived() -> bool:
            return len(first_arrivals_of("K", await arrivals(redis_url, good, bad))) == 5

        await eventually(chain_arrived, timeout=60)  # a dead relay's buckets move after 2 s
    finally:
        for process in relays:
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
        for process in relays:
            process.communicate(timeout=30)
    assert first_arrivals_of("K", await arrivals(redis_url, good, bad)) == [1, 2, 3, 4, 5]
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0


async def test_discard_the_poison_then_replay_the_rest(
    database_url: str, redis_url: str, pg: asyncpg.Connection
) -> None:
    good, bad = f"good-{uuid.uuid4().hex[:8]}", f"bad-{uuid.uuid4().hex[:8]}"
    await poison_the_bad_stream(redis_url, bad)
    chain, events = story(good, bad)
    await commit_events(database_url, events)
    relay = pg_relay(database_url, RedisPublisher(redis_url), batch_size=10)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.delivered == 41 and s.dead_lettered == 4, timeout=30)
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
        await relay.wait_for(lambda s: s.delivered == 44, timeout=30)
    finally:
        relay.request_stop()
        await task
    assert first_arrivals_of("K", await arrivals(redis_url, good)) == [1, 3, 4, 5]
    nothing = await asyncio.to_thread(cli, database_url, "dlq", "discard", "--key", "K", "--yes")
    assert "discarded 0" in nothing.stdout
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
