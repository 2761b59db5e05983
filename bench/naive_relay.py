"""The naive floor: claim 500 rows with SKIP LOCKED, publish, delete, commit. Nothing else.

No per-key order across processes, no retries, no leases: a lower bound on the work any relay
must do, to compare the real relay against. `python -m bench.naive_relay` runs it until SIGTERM.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.infra import service_arguments, stop_on_signals
from outbox.urls import asyncpg_dsn

CLAIM = (
    "SELECT seq, id, topic, key, payload::text AS payload FROM outbox_events "
    "ORDER BY seq FOR UPDATE SKIP LOCKED LIMIT 500"
)
DELETE = "DELETE FROM outbox_events WHERE seq = ANY($1::bigint[])"
Publish = Callable[[Sequence[asyncpg.Record]], Awaitable[None]]


async def step(conn: asyncpg.Connection, publish: Publish) -> int:
    """One batch in one transaction; returns how many rows it published."""
    async with conn.transaction():
        rows = await conn.fetch(CLAIM)
        if rows:
            await publish(rows)
            await conn.execute(DELETE, [r["seq"] for r in rows])
    return len(rows)


def redis_publisher(client: aioredis.Redis) -> Publish:
    async def publish(rows: Sequence[asyncpg.Record]) -> None:
        pipe = client.pipeline(transaction=False)
        for r in rows:
            fields: dict[Any, Any] = {  # the relay's plain field names (docs/consumers.md)
                "outbox-id": str(r["id"]),
                "outbox-seq": r["seq"],
                "outbox-key": r["key"],
                "outbox-payload": r["payload"],
            }
            pipe.xadd(r["topic"], fields)
        await pipe.execute()

    return publish


def kafka_publisher(producer: AIOKafkaProducer) -> Publish:
    async def publish(rows: Sequence[asyncpg.Record]) -> None:
        futures = [
            await producer.send(
                r["topic"],
                value=r["payload"].encode(),
                key=r["key"].encode(),
                headers=[("outbox-id", str(r["id"]).encode()), ("outbox-seq", b"%d" % r["seq"])],
            )
            for r in rows
        ]
        await asyncio.gather(*futures)

    return publish


async def run(
    database_url: str,
    broker: str,
    *,
    kafka_bootstrap: str,
    redis_url: str,
    until_empty: bool,
    stop: asyncio.Event | None = None,
    lean: bool = False,
) -> int:
    """Relay until the table is empty (`until_empty`) or `stop` is set; returns rows published.
    `lean`: the lean ceiling's transport instead (bench/lean_relay.py), same claim and delete."""
    from bench import lean_relay

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    client = aioredis.Redis.from_url(redis_url)
    raw = await lean_relay.RawRedis.connect(redis_url) if lean and broker == "redis" else None
    producer: AIOKafkaProducer | None = None
    if broker == "kafka":
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, acks="all", linger_ms=0)
        await producer.start()
    if producer is not None:
        publish = (lean_relay.kafka_publisher if lean else kafka_publisher)(producer)
    else:
        publish = lean_relay.redis_publisher(raw) if raw else redis_publisher(client)
    total = 0
    try:
        while stop is None or not stop.is_set():
            done = await step(conn, publish)
            total += done
            if not done:
                if until_empty:
                    break
                await asyncio.sleep(0.05)
    finally:
        if producer is not None:
            await producer.stop()
        await client.aclose()
        if raw is not None:
            await raw.close()
        await conn.close()
    return total


def main() -> None:
    parser = service_arguments(__doc__)
    args = parser.parse_args()

    async def _main() -> None:
        stop = stop_on_signals()
        await run(
            args.database_url,
            args.broker,
            kafka_bootstrap=args.kafka_bootstrap or "127.0.0.1:9092",
            redis_url=args.redis_url or "redis://127.0.0.1:6379/0",
            until_empty=False,
            stop=stop,
        )

    asyncio.run(_main())


if __name__ == "__main__":
    main()
