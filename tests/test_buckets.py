"""Postgres computes the lease bucket (migration 0004): every writer, `OutboxEvent`, `enqueue`
or the raw-SQL INSERT of docs/operations.md, puts a key in the same bucket, raw-SQL events
spread over the buckets, and relays sharing the buckets keep each key's order."""

from __future__ import annotations

import asyncio
import json
import re
import zlib
from collections import defaultdict
from typing import Any

import asyncpg
import pytest
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import OutboxEvent, enqueue, uuid7
from outbox.relay import migrate
from outbox.relay.publishers.redis import RedisPublisher
from outbox.relay.testing import FaultInjector
from outbox.urls import asyncpg_dsn, sqlalchemy_async_url
from tests.helpers import ROOT, assert_per_key_order, pg_relay, read_stream

pytestmark = pytest.mark.postgres

WRITERS = ("orm", "enqueue", "sql")
#: The bucket Postgres computes (the trigger of migration 0004).
HASHED = "hashtext(coalesce(key, id::text)) & 63"


def documented_insert() -> str:
    """The INSERT of "Writing events from any language" in docs/operations.md, as written."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc.split("\n## Writing events from any language\n", 1)[1].split("\n## ", 1)[0]
    (sql,) = re.findall(r"```sql\n(.*?)```", section, re.DOTALL)
    return str(sql).strip()


async def write_round(
    database_url: str, writer: str, topic: str, keys: list[str | None], n: int
) -> None:
    """One transaction of `writer`: event number `n` of each key, in order."""

    def payload(key: str | None) -> dict[str, Any]:
        return {"k": key, "n": n, "w": writer}

    if writer == "sql":
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            async with conn.transaction():
                await conn.executemany(
                    documented_insert(),
                    [
                        (uuid7(), topic, k, json.dumps(payload(k)), '{"via": "sql"}', "Mixed")
                        for k in keys
                    ],
                )
        finally:
            await conn.close()
        return
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    try:
        async with AsyncSession(engine) as session, session.begin():
            for k in keys:
                if writer == "orm":
                    session.add(OutboxEvent(topic=topic, key=k, payload=payload(k)))
                else:
                    await enqueue(session, topic=topic, key=k, payload=payload(k))
    finally:
        await engine.dispose()


async def write_mixed(database_url: str, topic: str, keys: list[str | None], rounds: int) -> None:
    """`rounds` events per key, the writers taking turns: ORM, enqueue, raw SQL, ORM, ..."""
    for n in range(rounds):
        await write_round(database_url, WRITERS[n % len(WRITERS)], topic, keys, n)


async def test_every_writer_puts_a_key_in_the_same_bucket(
    database_url: str, pg: asyncpg.Connection
) -> None:
    keys: list[str | None] = [f"order-{i}" for i in range(50)] + [None]
    await write_mixed(database_url, "orders", keys, rounds=6)
    rows = await pg.fetch(
        f"SELECT key, array_agg(DISTINCT bucket) AS buckets, array_agg(DISTINCT {HASHED}) AS want,"
        " array_agg(DISTINCT payload->>'w') AS writers FROM outbox_events WHERE key IS NOT NULL"
        " GROUP BY key"
    )
    assert len(rows) == 50
    for r in rows:
        assert sorted(r["writers"]) == sorted(WRITERS), r["key"]
        assert r["buckets"] == r["want"], r["key"]  # one bucket per key, whoever wrote
    keyless = await pg.fetch(
        f"SELECT bucket, {HASHED} AS want FROM outbox_events WHERE key IS NULL"
    )
    assert len(keyless) == 6
    assert all(r["bucket"] == r["want"] for r in keyless)  # keyless events: hash of the id


async def test_raw_sql_inserts_spread_over_the_buckets(pg: asyncpg.Connection) -> None:
    sql = documented_insert()
    rows = [(uuid7(), "orders", f"customer-{i}", "{}", "{}", None) for i in range(1000)]
    keyless = [(uuid7(), "audit", None, "{}", "{}", None) for _ in range(1000)]
    await pg.executemany(sql, rows + keyless)
    spread = await pg.fetchrow(
        "SELECT count(DISTINCT bucket) FILTER (WHERE key IS NOT NULL) AS keyed,"
        " count(DISTINCT bucket) FILTER (WHERE key IS NULL) AS keyless FROM outbox_events"
    )
    assert spread["keyed"] >= 60
    assert spread["keyless"] >= 60


async def test_a_bucket_sent_is_overwritten(pg: asyncpg.Connection) -> None:
    """A writer of an older version (or a service that computed crc32 as the docs said) still
    works: its bucket is replaced; so is one set by UPDATE, or made stale by a new key."""
    want = await pg.fetchval("SELECT hashtext('order-42') & 63")
    sent = (want + 1) % 64
    seq = await pg.fetchval(
        "INSERT INTO outbox_events (id, topic, key, bucket, payload) "
        "VALUES (gen_random_uuid(), 't', 'order-42', $1, '{}') RETURNING seq",
        sent,
    )
    bucket = "SELECT bucket FROM outbox_events WHERE seq = $1"
    assert await pg.fetchval(bucket, seq) == want
    await pg.execute("UPDATE outbox_events SET bucket = $2 WHERE seq = $1", seq, sent)
    assert await pg.fetchval(bucket, seq) == want
    await pg.execute("UPDATE outbox_events SET key = 'order-43' WHERE seq = $1", seq)
    assert await pg.fetchval(bucket, seq) == await pg.fetchval("SELECT hashtext('order-43') & 63")
    # Out of range is no error either: the value never reaches the CHECK.
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, bucket, payload) "
        "VALUES (gen_random_uuid(), 't', 'k', 64, '{}')"
    )
    # ENABLE ALWAYS: it fires for a logical-replication apply worker too.
    if await pg.fetchval("SELECT rolsuper FROM pg_roles WHERE rolname = current_user"):
        async with pg.transaction():
            await pg.execute("SET LOCAL session_replication_role = replica")
            seq = await pg.fetchval(
                "INSERT INTO outbox_events (id, topic, key, bucket, payload) "
                "VALUES (gen_random_uuid(), 't', 'order-42', $1, '{}') RETURNING seq",
                sent,
            )
        assert await pg.fetchval(bucket, seq) == want


OLD_KEYS = ["order-42", "ключ-é", "emoji 🎉", "x" * 1024, None, None]


async def test_migration_0004_recomputes_and_downgrade_restores_the_python_hash(
    empty_database_url: str,
) -> None:
    url = empty_database_url
    await asyncio.to_thread(migrate.upgrade, url, "0003")
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        # Rows as the writers of 0003 wrote them: crc32 of the UTF-8 key (or id) modulo 64.
        for key in OLD_KEYS:
            event_id = uuid7()
            crc = zlib.crc32((key if key is not None else str(event_id)).encode()) % 64
            await conn.execute(
                "INSERT INTO outbox_events (id, topic, key, bucket, payload) "
                "VALUES ($1, 't', $2, $3, '{}')",
                event_id,
                key,
                crc,
            )
        buckets = "SELECT bucket FROM outbox_events ORDER BY seq"
        old = [r["bucket"] for r in await conn.fetch(buckets)]
        await asyncio.to_thread(migrate.upgrade, url)
        new = [r["bucket"] for r in await conn.fetch(buckets)]
        want = [r[0] for r in await conn.fetch(f"SELECT {HASHED} FROM outbox_events ORDER BY seq")]
        assert new == want != old
        await asyncio.to_thread(migrate.downgrade, url, "0003")
        assert [r["bucket"] for r in await conn.fetch(buckets)] == old
        await conn.execute(
            "INSERT INTO outbox_events (id, topic, key, bucket, payload) "
            "VALUES (gen_random_uuid(), 't', 'order-42', 7, '{}')"
        )
        assert await conn.fetchval("SELECT bucket FROM outbox_events ORDER BY seq DESC") == 7
        await asyncio.to_thread(migrate.upgrade, url)
        assert not await conn.fetchval(
            f"SELECT count(*) FROM outbox_events WHERE bucket <> {HASHED}"
        )
    finally:
        await conn.close()


@pytest.mark.redis
async def test_two_relays_keep_each_keys_order_across_mixed_writers(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    """ORM, enqueue and raw SQL take turns writing each key while two relays, 32 buckets each,
    publish: every key goes out through one relay, in order, and both relays carry raw-SQL
    events."""
    injectors = [FaultInjector(RedisPublisher(redis_url), lambda _: None) for _ in range(2)]
    relays = [pg_relay(database_url, p, batch_size=50, lease_seconds=5) for p in injectors]
    tasks = [asyncio.create_task(r.run()) for r in relays]
    for relay in relays:  # the buckets are shared out before the events arrive
        await relay.wait_for(lambda s: s.owned_buckets == 32, timeout=30)
    keys: list[str | None] = [f"key-{i}" for i in range(40)]
    await write_mixed(database_url, topic, keys, rounds=9)
    received = await read_stream(redis_url, topic, 40 * 9, timeout=60)
    for relay in relays:
        relay.request_stop()
    await asyncio.gather(*tasks)

    assert_per_key_order(received)
    assert sorted((e.key, e.json()["n"]) for e in received) == sorted(
        (k, n) for k in keys for n in range(9)
    )
    publishers: dict[str | None, set[int]] = defaultdict(set)
    sql_events = [0, 0]
    for i, injector in enumerate(injectors):
        for event in injector.published:
            publishers[event.key].add(i)
            sql_events[i] += event.json()["w"] == "sql"
    assert {k: len(p) for k, p in publishers.items()} == dict.fromkeys(keys, 1)
    assert min(sql_events) > 0, sql_events  # raw-SQL events were shared out too
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
