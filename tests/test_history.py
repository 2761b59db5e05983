"""Delivered history (`history = on`), `outbox-relay republish` and retention, against real
PostgreSQL, Kafka and Redis (issue 13)."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import subprocess
import sys
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer

from outbox import OutboxEvent
from outbox.envelope import HEADER_REPUBLISHED_AT, MODES, Encoder, Envelope, EnvelopeMode
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from outbox.relay.relay import Relay
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import Publisher
from outbox.relay.stores.postgres import PostgresStore
from outbox.urls import asyncpg_dsn
from tests.helpers import (
    ROOT,
    commit_events,
    create_topic,
    eventually,
    keyed_events,
    read_stream,
)

pytestmark = pytest.mark.postgres


def history_relay(database_url: str, publisher: Publisher, *, history: bool = True) -> Relay:
    return Relay(
        PostgresStore(database_url, lease_seconds=3.0, history=history),
        publisher,
        relay_id=f"test-{uuid.uuid4().hex[:6]}",
        batch_size=50,
        poll_interval=0.2,
        lease_seconds=3.0,
        retry_policy=RetryPolicy(base_seconds=0.05, max_seconds=0.2, max_attempts=5),
        record_positions=history,
    )


async def kafka_records(bootstrap: str, topic: str, count: int) -> list[tuple[int, int, Envelope]]:
    """(partition, offset, envelope) of the first `count` records of a topic."""
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[tuple[int, int, Envelope]] = []
    try:
        async with asyncio.timeout(60):
            while len(out) < count:
                for records in (await consumer.getmany(timeout_ms=1000)).values():
                    out += [
                        (
                            r.partition,
                            r.offset,
                            Envelope.from_kafka(r.topic, r.key, r.value, r.headers),
                        )
                        for r in records
                    ]
    finally:
        await consumer.stop()
    return out


async def history_rows(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    rows: list[asyncpg.Record] = await pg.fetch(
        "SELECT * FROM outbox_delivered ORDER BY delivered_id"
    )
    return rows


async def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """The real `outbox-relay` in a child process."""
    return await asyncio.to_thread(
        subprocess.run,
        [sys.executable, "-m", "outbox.relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env=env,
    )


async def republish_cli(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await cli("republish", "--database-url", database_url, *args)


async def test_kafka_history_records_each_delivery_with_its_partition_and_offset(
    database_url: str, pg: asyncpg.Connection, kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=3)
    events = keyed_events(topic, keys=4, per_key=5)
    await commit_events(database_url, events)
    await pg.execute(
        "UPDATE outbox_events SET attempts = 2 WHERE seq = (SELECT min(seq) FROM outbox_events)"
    )
    started = await pg.fetchval("SELECT now()")
    relay = history_relay(database_url, KafkaPublisher(kafka_bootstrap))
    await relay.drain()

    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    rows = await history_rows(pg)
    assert len(rows) == 20
    records = {e.id: (p, o, e) for p, o, e in await kafka_records(kafka_bootstrap, topic, 20)}
    for row in rows:
        partition, offset, envelope = records[row["event_id"]]
        assert (row["broker_partition"], row["broker_offset"]) == (partition, offset)
        assert row["broker_entry_id"] is None
        assert (row["seq"], row["key"], row["topic"]) == (envelope.seq, envelope.key, topic)
        assert json.loads(row["payload"]) == json.loads(envelope.payload)
        assert json.loads(row["headers"]) == dict(envelope.headers)
        assert row["event_type"] == "Counted"
        assert row["relay_id"] == relay.relay_id
        assert row["delivered_at"] >= started >= row["created_at"]
    assert sorted(r["attempts"] for r in rows) == [1] * 19 + [3]


async def test_redis_history_records_the_stream_entry_ids(
    database_url: str, pg: asyncpg.Connection, redis_url: str, topic: str
) -> None:
    await commit_events(database_url, keyed_events(topic, keys=3, per_key=4))
    await history_relay(database_url, RedisPublisher(redis_url)).drain()

    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(topic)  # type: ignore[assignment]
    finally:
        await client.aclose()
    ids = {fields[b"outbox-id"].decode(): entry.decode() for entry, fields in entries}
    rows = await history_rows(pg)
    assert len(rows) == len(ids) == 12
    assert {str(r["event_id"]): r["broker_entry_id"] for r in rows} == ids
    assert {(r["broker_partition"], r["broker_offset"]) for r in rows} == {(None, None)}


async def test_history_off_deletes_and_keeps_nothing(
    database_url: str, pg: asyncpg.Connection, redis_url: str, topic: str
) -> None:
    await commit_events(database_url, keyed_events(topic, keys=2, per_key=3))
    await history_relay(database_url, RedisPublisher(redis_url), history=False).drain()
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_delivered") == 0


async def test_republish_puts_events_back_with_their_ids_order_and_a_header(
    database_url: str, pg: asyncpg.Connection, kafka_bootstrap: str, topic: str
) -> None:
    await create_topic(kafka_bootstrap, topic, partitions=3)
    await commit_events(database_url, keyed_events(topic, keys=3, per_key=4))
    await commit_events(
        database_url, [OutboxEvent(topic=topic, key="other", payload={}, event_type="Other")]
    )
    await history_relay(database_url, KafkaPublisher(kafka_bootstrap)).drain()
    first = {e.id: e for _, _, e in await kafka_records(kafka_bootstrap, topic, 13)}

    dry = await republish_cli(database_url, "--key", "key-1", "--dry-run")
    assert dry.returncode == 0, dry.stderr
    assert dry.stdout.splitlines()[-1] == (
        "would republish 4 event(s); nothing changed: drop --dry-run"
    )
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0

    done = await republish_cli(database_url, "--key", "key-1", "--batch-size", "3")
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines()[-1] == "republished 4 event(s) in 2 transaction(s)"
    again = await republish_cli(database_url, "--key", "key-1", "--json")  # still in the outbox
    assert json.loads(again.stdout) | {"summary": []} == {
        "dry_run": False,
        "matched": 4,
        "republished": 0,
        "skipped": 4,
        "transactions": 1,
        "summary": [],
    }

    await history_relay(database_url, KafkaPublisher(kafka_bootstrap)).drain()
    records = [e for _, _, e in await kafka_records(kafka_bootstrap, topic, 17)]
    second = [e for e in records if HEADER_REPUBLISHED_AT in e.headers]
    assert len(second) == 4
    assert [e.seq for e in second] == sorted(e.seq for e in second)  # one key: one partition
    for event in second:
        original = first[event.id]
        assert (event.seq, event.key, event.payload, event.event_type) == (
            original.seq,
            original.key,
            original.payload,
            original.event_type,
        )
        assert original.created_at == event.created_at
        assert dict(event.headers) == {
            **original.headers,
            HEADER_REPUBLISHED_AT: event.headers[HEADER_REPUBLISHED_AT],
        }
        assert datetime.fromisoformat(event.headers[HEADER_REPUBLISHED_AT]).tzinfo is not None
    assert not any(HEADER_REPUBLISHED_AT in e.headers for e in first.values())
    # The history holds both deliveries; the second says it was a republish.
    marked = await pg.fetchval(
        "SELECT count(*) FROM outbox_delivered WHERE headers ? 'outbox-republished-at'"
    )
    assert (marked, await pg.fetchval("SELECT count(*) FROM outbox_delivered")) == (4, 17)


async def test_republish_refuses_no_selection_and_a_missing_table(
    database_url: str, empty_database_url: str
) -> None:
    nothing = await republish_cli(database_url)
    assert (nothing.returncode, nothing.stdout) == (2, "")
    assert nothing.stderr == (
        "outbox-relay: error: choose what to republish: --id, --key, --topic, --type, "
        "--since, --until, or --all\n"
    )
    bad = await republish_cli(database_url, "--since", "yesterday")
    assert bad.returncode == 2
    assert bad.stderr.startswith("outbox-relay: error: Invalid value for '--since': 'yesterday'")
    missing = await republish_cli(empty_database_url, "--all")
    assert missing.returncode == 1
    assert missing.stderr == (
        "outbox-relay: error: outbox_delivered does not exist in this database:"
        " run `outbox-relay migrate`\n"
    )


async def add_history(pg: asyncpg.Connection, ages: Sequence[float]) -> None:
    """History rows delivered `ages` seconds ago, in this order."""
    await pg.execute(
        "INSERT INTO outbox_delivered (event_id, seq, topic, payload, headers, created_at, "
        "delivered_at, relay_id, attempts) "
        "SELECT gen_random_uuid(), a.n, 't', '{}', '{}', now() - make_interval(secs => a.age), "
        "now() - make_interval(secs => a.age), 'r', 1 "
        "FROM unnest($1::float8[]) WITH ORDINALITY AS a(age, n)",
        list(ages),
    )


async def test_prune_deletes_old_history_in_batches_one_relay_at_a_time(
    database_url: str, pg: asyncpg.Connection
) -> None:
    await add_history(pg, [7200.0] * 2500 + [10.0] * 30)
    store = PostgresStore(database_url, history=True, history_retention=3600)
    store.prune_batch = 1000
    await store.start("pruner")
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await holder.fetchval("SELECT pg_try_advisory_lock(hashtext('outbox-relay prune'))")
        assert await store.prune() is None  # another relay prunes
        assert await pg.fetchval("SELECT count(*) FROM outbox_delivered") == 2530
        await holder.execute("SELECT pg_advisory_unlock_all()")

        (done,) = await store.prune() or []
        assert (done.table, done.rows) == ("outbox_delivered", 2500)
        assert done.statements >= 3  # 1,000 rows each, fewer when one is slow
        assert await pg.fetchval("SELECT count(*) FROM outbox_delivered") == 30
        await add_history(pg, [7200.0] * 5)  # delivered late (ids after the young rows)
        await pg.execute("UPDATE outbox_delivered SET delivered_at = now() - interval '2 h'")
        (done,) = await store.prune() or []
        assert (done.rows, await pg.fetchval("SELECT count(*) FROM outbox_delivered")) == (35, 0)
    finally:
        await holder.close()
        await store.stop()


async def test_dead_letter_retention_keeps_quarantine_chains(
    database_url: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, "
        "created_at, attempts, first_failed_at, last_failed_at, error_class, error_message, "
        "relay_id, holds_key) "
        "SELECT gen_random_uuid(), g, 't', 'k-' || g, '{}', '{}', now() - interval '3 d', 1, "
        "now() - make_interval(days => 3 - (g > 8)::int * 3), "
        "now() - make_interval(days => 3 - (g > 8)::int * 3), 'E', 'm', 'r', g % 4 = 0 "
        "FROM generate_series(1, 10) AS g"
    )
    store = PostgresStore(database_url, dead_letter_retention=86_400)
    await store.start("pruner")
    try:
        (done,) = await store.prune() or []
    finally:
        await store.stop()
    assert (done.table, done.rows) == ("outbox_dead_letters", 6)  # 1-8 but 4 and 8
    left = await pg.fetch("SELECT original_seq FROM outbox_dead_letters ORDER BY 1")
    assert [r[0] for r in left] == [4, 8, 9, 10]


def test_history_needs_postgres(tmp_path: Path) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "outbox.relay.cli", "run", "--history", "on"],
        env={
            "PATH": "/usr/bin:/bin",
            "OUTBOX_DATABASE_URL": f"sqlite:///{tmp_path}/x.db",
        },
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert (done.returncode, done.stderr) == (
        2,
        "outbox-relay: error: history: needs PostgreSQL (database_url is SQLite)\n",
    )


async def test_status_shows_the_history(database_url: str, pg: asyncpg.Connection) -> None:
    await add_history(pg, [90_000.0, 30.0])
    done = await cli(
        "status", "--json", env={"PATH": "/usr/bin:/bin", "OUTBOX_DATABASE_URL": database_url}
    )
    history = json.loads(done.stdout)["history"]
    oldest = await pg.fetchval("SELECT min(delivered_at) FROM outbox_delivered")
    assert history == {"count": 2, "exact": True, "oldest_delivered_at": oldest.isoformat()}
    assert oldest < datetime.now(UTC)


def history_section() -> str:
    doc = (ROOT / "docs" / "operations.md").read_text()
    return doc[doc.index("\n## Delivered history\n") : doc.index("\n## Delivery guarantees\n")]


async def test_the_docs_history_queries_and_republish_commands_run(
    database_url: str, pg: asyncpg.Connection
) -> None:
    section = history_section()
    await add_history(pg, [30.0, 7200.0, 90_000.0])
    await pg.execute(
        "UPDATE outbox_delivered SET key = 'order-42', event_type = 'OrderPlaced', "
        "topic = 'orders', event_id = '01a21433-f6e4-744a-a01f-c65e10c798ba' "
        "WHERE delivered_id = (SELECT min(delivered_id) FROM outbox_delivered)"
    )
    queries = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)
    assert len(queries) == 3
    for query in queries:
        assert await pg.fetch(query), query
    commands = [
        shlex.split(line, comments=True)
        for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL)
        for line in block.splitlines()
        if line.startswith("outbox-relay republish")
    ]
    assert len(commands) == 4
    for argv in commands:
        done = await cli(*argv[1:], env=os.environ | {"OUTBOX_DATABASE_URL": database_url})
        assert (done.returncode, done.stderr) == (0, ""), argv
        assert done.stdout, argv


@pytest.mark.parametrize("mode", MODES)
def test_the_republish_header_goes_out_in_every_envelope_mode(mode: EnvelopeMode) -> None:
    """The one `outbox-*` name an event's stored headers may carry through: the others stay
    reserved to the relay. A consumer reads it back from the decoded envelope."""
    stamp = "2026-11-30T12:00:00+00:00"
    event = Envelope(
        7,
        uuid.uuid4(),
        "orders",
        "order-7",
        b"{}",
        {HEADER_REPUBLISHED_AT: stamp, "outbox-forged": "x", "mine": "y"},
        "OrderPlaced",
        datetime.now(UTC),
    )
    encoder = Encoder(mode)
    value, headers = encoder.kafka(event)
    assert (HEADER_REPUBLISHED_AT, stamp.encode()) in headers
    assert "outbox-forged" not in dict(headers)
    decoded = Envelope.from_kafka("orders", b"order-7", value, headers)
    assert decoded.headers[HEADER_REPUBLISHED_AT] == stamp
    fields = encoder.stream_fields(event)
    if mode != "faststream":  # (faststream: inside its one __data__ field, decoded above)
        named = dict(zip(fields[::2], fields[1::2], strict=True))
        assert named[HEADER_REPUBLISHED_AT.encode()] == stamp.encode()


async def test_a_running_relay_prunes_its_history(
    database_url: str, pg: asyncpg.Connection, redis_url: str, topic: str
) -> None:
    store = PostgresStore(
        database_url, lease_seconds=3.0, history=True, history_retention=0.5, prune_interval=0.2
    )
    relay = Relay(
        store,
        RedisPublisher(redis_url),
        relay_id=f"test-{uuid.uuid4().hex[:6]}",
        poll_interval=0.2,
        lease_seconds=3.0,
        record_positions=True,
    )
    running = asyncio.create_task(relay.run())
    try:
        await commit_events(database_url, keyed_events(topic, keys=2, per_key=3))
        await relay.wait_for(lambda s: s.delivered == 6, timeout=30)

        async def pruned() -> bool:
            left: int = await pg.fetchval("SELECT count(*) FROM outbox_delivered")
            return left == 0

        await eventually(pruned, timeout=30)
    finally:
        relay.request_stop()
        await running
    assert store.pruned["outbox_delivered"].rows == 6
    assert len(await read_stream(redis_url, topic, 6)) == 6
