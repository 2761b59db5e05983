"""Fast setup: pending events written with binary COPY, never through the ORM."""

from __future__ import annotations

import json
import uuid
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg

from outbox import uuid7
from outbox.urls import asyncpg_dsn

#: Rows per COPY call (bounds the memory of a 1M seed).
CHUNK = 50_000
#: No bucket: Postgres computes it, for COPY too (migration 0004).
OUTBOX_COLUMNS = ("id", "topic", "key", "payload", "headers", "created_at", "available_at")
#: Each seeded event has a `created_at` of its own, this far after the one before, as if
#: written one per transaction (100,000 a second). One COPY transaction would give them all
#: its start time, which a relay converts once for the whole backlog: the drain measured
#: ~7 % faster than with events as writers make them. `available_at` is the same instant
#: (a later one would make the row a waiting one: a retry or a delayed delivery).
EVENT_SPACING = timedelta(microseconds=10)
FASTSTREAM_COLUMNS = ("queue", "payload", "headers")


def new_bench_id() -> str:
    """The id the consumers find in every payload (32 hex digits)."""
    return uuid.uuid4().hex


def payload_dict(n: int, bench_id: str) -> dict[str, Any]:
    """A small order event (~170 bytes as JSON), the same for every system measured."""
    return {
        "b": bench_id,
        "n": n,
        "order_id": f"order-{n}",
        "customer": f"customer-{n % 997}",
        "total": "19.99",
        "currency": "EUR",
        "lines": [{"sku": "SKU-1", "qty": 2}, {"sku": "SKU-7", "qty": 1}],
    }


def payload(n: int, bench_id: str) -> str:
    return json.dumps(payload_dict(n, bench_id), separators=(",", ":"))


def key_of(n: int, keys: int) -> str:
    return f"order-{n % keys}"


def _outbox_rows(
    start: int, stop: int, topics: Sequence[str], keys: int, first: datetime
) -> Iterator[tuple[object, ...]]:
    """Event n has key n % keys, topic n % len(topics), created (and due) at `first` +
    n * EVENT_SPACING."""
    for n in range(start, stop):
        topic = topics[n % len(topics)]
        created = first + n * EVENT_SPACING
        yield (uuid7(), topic, key_of(n, keys), payload(n, new_bench_id()), "{}", created, created)


async def seed_outbox(
    url: str,
    count: int,
    topic: str,
    keys: int,
    *,
    on_commit: Callable[[], None] | None = None,
    topics: Sequence[str] = (),
) -> None:
    """`count` pending OutboxEvent rows in one transaction (relays see them all at commit).

    `on_commit` runs right after the commit, before ANALYZE: the moment a running relay can
    start on them. `topics`: spread the events over these topics instead of `topic`."""
    first = datetime.now(UTC) - timedelta(seconds=1) - count * EVENT_SPACING
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with conn.transaction():
            for start in range(0, count, CHUNK):
                stop = min(count, start + CHUNK)
                await conn.copy_records_to_table(
                    "outbox_events",
                    records=list(_outbox_rows(start, stop, topics or (topic,), keys, first)),
                    columns=OUTBOX_COLUMNS,
                )
        if on_commit is not None:
            on_commit()
        await conn.execute("ANALYZE outbox_events")
    finally:
        await conn.close()


async def seed_waiting(url: str, count: int, topic: str) -> None:
    """`count` rows of other keys that wait an hour (as a retry backoff or a delayed delivery
    would), then ANALYZE: the statistics the retry cliff came from."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await conn.execute(
            "INSERT INTO outbox_events (id, topic, key, payload, available_at, attempts) "
            "SELECT gen_random_uuid(), $2, 'waiting-' || g, '{}', "
            "now() + interval '1 hour', 1 FROM generate_series(1, $1) AS g",
            count,
            topic,
        )
        await conn.execute("ANALYZE outbox_events")
    finally:
        await conn.close()


async def seed_faststream(url: str, table: str, count: int, queue: str) -> None:
    """`count` rows as faststream-outbox's `broker.publish` writes them (JSON body + headers)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with conn.transaction():
            for start in range(0, count, CHUNK):
                rows = [
                    (
                        queue,
                        payload(n, new_bench_id()).encode(),
                        json.dumps(
                            {
                                "content-type": "application/json",
                                "correlation_id": str(uuid.uuid4()),
                            }
                        ),
                    )
                    for n in range(start, min(count, start + CHUNK))
                ]
                await conn.copy_records_to_table(table, records=rows, columns=FASTSTREAM_COLUMNS)
        await conn.execute(f"ANALYZE {table}")
    finally:
        await conn.close()
