"""faststream-outbox (the incumbent) relaying to the same Kafka / Redis, configured per its docs.

Presets: `defaults` is `@broker.subscriber(queue)` as the README shows it; `tuned` adds the
settings its docs recommend for throughput (the subscriber page's example: 8 workers, fetch batch
50, fetch interval 0.1-1 s, lease 120 s; the performance page's `terminal_flush_batch_size`, 100
in its example). Its recommended autovacuum DDL is applied to the table for both. Access logging
is off for both (FastStream logs two lines per message by default).
`python -m bench.faststream_runner` runs a relay until SIGTERM.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import asyncpg
from sqlalchemy import MetaData, Table, text
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

from bench.infra import is_empty, poll, service_arguments, stop_on_signals
from outbox.urls import asyncpg_dsn, sqlalchemy_async_url

TABLE = "fs_outbox"
QUEUE = "bench"
PRESETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "tuned": {
        "max_workers": 8,
        "fetch_batch_size": 50,
        "min_fetch_interval": 0.1,
        "max_fetch_interval": 1.0,
        "lease_ttl_seconds": 120.0,
        "terminal_flush_batch_size": 100,
    },
}


def make_table(metadata: MetaData | None = None) -> Table:
    from faststream_outbox import make_outbox_table

    table: Table = make_outbox_table(metadata or MetaData(), table_name=TABLE)
    return table


async def create_schema(url: str) -> None:
    """The table as its docs say to migrate it: `make_outbox_table` + recommended autovacuum."""
    from faststream_outbox import outbox_autovacuum_ddl

    metadata = MetaData()
    make_table(metadata)
    engine = create_async_engine(sqlalchemy_async_url(url))
    try:
        async with engine.begin() as conn:
            await conn.run_sync(metadata.create_all)
            await conn.execute(text(outbox_autovacuum_ddl(TABLE)))
    finally:
        await engine.dispose()


class FaststreamRelay:
    """OutboxBroker + a foreign broker's publisher stacked on the outbox subscriber."""

    def __init__(
        self, url: str, broker: str, *, topic: str, preset: str, bootstrap: str, redis_url: str
    ) -> None:
        from faststream.kafka import KafkaBroker
        from faststream.redis import RedisBroker
        from faststream_outbox import OutboxBroker

        self.relayed = 0
        self.engine: AsyncEngine = create_async_engine(
            sqlalchemy_async_url(url), pool_size=10, max_overflow=10
        )
        self.outbox = OutboxBroker(self.engine, outbox_table=make_table(), logger=None)
        self.foreign: Any
        if broker == "kafka":
            self.foreign = KafkaBroker(bootstrap, logger=None)
            publisher = self.foreign.publisher(topic)
        else:
            self.foreign = RedisBroker(redis_url, logger=None)  # type: ignore[arg-type]
            publisher = self.foreign.publisher(stream=topic)

        async def relay(body: dict[str, Any]) -> dict[str, Any]:
            self.relayed += 1
            return body

        handler: Callable[..., Any] = self.outbox.subscriber(QUEUE, **PRESETS[preset])(relay)
        publisher(handler)

    async def start(self) -> None:
        await self.foreign.connect()
        await self.outbox.start()

    async def stop(self) -> None:
        await self.outbox.stop()
        await self.foreign.stop()
        await self.engine.dispose()


async def drain(
    url: str, broker: str, *, topic: str, preset: str, bootstrap: str, redis_url: str, count: int
) -> float:
    """Seconds from a cold start until `count` rows are relayed and gone from the table."""
    started = time.perf_counter()
    relay = FaststreamRelay(
        url, broker, topic=topic, preset=preset, bootstrap=bootstrap, redis_url=redis_url
    )
    await relay.start()
    conn = await asyncpg.connect(asyncpg_dsn(url))

    async def relayed_all() -> bool:
        return relay.relayed >= count

    async def table_empty() -> bool:
        return await is_empty(conn, TABLE, "id")

    try:
        await poll(relayed_all, 0.01, 3600)
        await poll(table_empty, 0.01, 3600)
        elapsed = time.perf_counter() - started
    finally:
        await conn.close()
        await relay.stop()
    return elapsed


def main() -> None:
    parser = service_arguments(__doc__)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--preset", choices=sorted(PRESETS), default="tuned")
    args = parser.parse_args()

    async def _main() -> None:
        stop = stop_on_signals()
        relay = FaststreamRelay(
            args.database_url,
            args.broker,
            topic=args.topic,
            preset=args.preset,
            bootstrap=args.kafka_bootstrap or "127.0.0.1:9092",
            redis_url=args.redis_url or "redis://127.0.0.1:6379/0",
        )
        await relay.start()
        try:
            await stop.wait()
        finally:
            await relay.stop()

    asyncio.run(_main())


if __name__ == "__main__":
    main()
