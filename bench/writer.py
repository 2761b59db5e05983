"""The application side: business transactions through the SQLAlchemy ORM, in its own process.

The business transaction (`--business`) is either `order`, one `orders` row (the least a
transaction can do, so the outbox's share is the largest), or `checkout`: lock three `products`
rows, lower their stock, insert the order and its three `order_lines`. To it, by mode, is added
nothing (`plain`), one `OutboxEvent` (`outbox`; `outbox-nonotify` with `outbox.notify = off` on
the writer's connections), one `await enqueue(session, ...)` (`enqueue`), or one
faststream-outbox row (`faststream`, via `broker.publish`). The `-sql` modes write the same rows
with plain asyncpg: a load generator light enough for 1,000+ tx/s on a small machine.
`--mode a,b,...` runs the modes one after another in this process.
With `--rate`, transactions start on a fixed schedule (open loop, up to `--concurrency` at once);
with `--rate 0`, each of the `--concurrency` tasks commits back to back (closed loop).
The times each COMMIT was sent and returned (`time.monotonic()`, system-wide on Linux) are
written per payload id, so a consumer in another process can compute commit -> broker latency.
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import sys
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from sqlalchemy import BigInteger, ForeignKey, Integer, Numeric, Text, select, text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from bench.infra import PRODUCTS
from bench.seed import key_of, new_bench_id, payload_dict
from outbox import OutboxEvent, enqueue, uuid7
from outbox.relay.cli import loop_factory
from outbox.relay.stores.postgres import keep_session
from outbox.urls import asyncpg_dsn, sqlalchemy_async_url

MODES = (
    "plain",
    "outbox",
    "outbox-nonotify",
    "enqueue",
    "faststream",
    "plain-sql",
    "outbox-sql",
    "outbox-sql-nonotify",
    "faststream-sql",
)


class Base(DeclarativeBase):
    pass


class Order(Base):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    customer: Mapped[str] = mapped_column(Text)
    total: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    lines: Mapped[list[OrderLine]] = relationship()


class Product(Base):
    __tablename__ = "products"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    sku: Mapped[str] = mapped_column(Text)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))
    stock: Mapped[int] = mapped_column(Integer)


class OrderLine(Base):
    __tablename__ = "order_lines"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True)
    order_id: Mapped[int] = mapped_column(ForeignKey("orders.id"))
    product_id: Mapped[int] = mapped_column(ForeignKey("products.id"))
    quantity: Mapped[int] = mapped_column(Integer)
    price: Mapped[Decimal] = mapped_column(Numeric(12, 2))


#: The business part of a transaction for event number n, through the ORM.
Business = Callable[[AsyncSession, int], Awaitable[None]]


async def order_row(session: AsyncSession, n: int) -> None:
    session.add(Order(customer=f"customer-{n % 997}", total=Decimal("19.99")))


async def checkout(session: AsyncSession, n: int) -> None:
    """Three products locked in id order (no deadlocks), stock lowered, order and lines added."""
    ids = sorted({(n * 7919 + i * 3571) % PRODUCTS + 1 for i in range(3)})
    products = await session.scalars(
        select(Product).where(Product.id.in_(ids)).order_by(Product.id).with_for_update()
    )
    order = Order(customer=f"customer-{n % 997}", total=Decimal(0))
    for quantity, product in enumerate(products, start=1):
        if product.stock < quantity:
            raise RuntimeError(f"{product.sku} is out of stock")
        product.stock -= quantity
        order.lines.append(OrderLine(product_id=product.id, quantity=quantity, price=product.price))
        order.total += product.price * quantity
    session.add(order)


BUSINESS: dict[str, Business] = {"order": order_row, "checkout": checkout}


@dataclass
class Tally:
    commits: dict[str, tuple[float, float]] = field(default_factory=dict)
    durations: list[float] = field(default_factory=list)
    errors: int = 0
    #: The process's CPU time when the measured part began.
    cpu_at_start: float = 0.0


Extra = Callable[[AsyncSession, int, dict[str, Any]], Awaitable[None]]


def orm_extra(mode: str, topic: str, keys: int) -> Extra:
    async def plain(session: AsyncSession, n: int, event: dict[str, Any]) -> None:
        return None

    async def outbox(session: AsyncSession, n: int, event: dict[str, Any]) -> None:
        session.add(OutboxEvent(topic=topic, key=key_of(n, keys), payload=event))

    async def enqueue_event(session: AsyncSession, n: int, event: dict[str, Any]) -> None:
        await enqueue(session, topic=topic, key=key_of(n, keys), payload=event)

    if mode == "plain":
        return plain
    if mode.startswith("outbox"):
        return outbox
    if mode == "enqueue":
        return enqueue_event
    from faststream_outbox import OutboxBroker

    from bench.faststream_runner import QUEUE, make_table

    broker = OutboxBroker(None, outbox_table=make_table(), logger=None)

    async def faststream(session: AsyncSession, n: int, event: dict[str, Any]) -> None:
        await broker.publish(event, queue=QUEUE, session=session)

    return faststream


ORDER_SQL = "INSERT INTO orders (customer, total) VALUES ($1, $2)"
OUTBOX_SQL = "INSERT INTO outbox_events (id, topic, key, payload) VALUES ($1, $2, $3, $4)"
# What faststream-outbox's publish sends: one INSERT whose RETURNING also notifies.
FASTSTREAM_SQL = (
    "INSERT INTO fs_outbox (queue, payload, headers) VALUES ($1, $2, $3) "
    "RETURNING id, pg_notify('outbox_fs_outbox', $4::text)"
)
SqlExtra = Callable[[asyncpg.Connection, int, dict[str, Any]], Awaitable[None]]


def sql_extra(mode: str, topic: str, keys: int) -> SqlExtra:
    """The same rows as the ORM modes, written with plain asyncpg (a cheap load generator)."""

    async def plain(conn: asyncpg.Connection, n: int, event: dict[str, Any]) -> None:
        return None

    async def outbox(conn: asyncpg.Connection, n: int, event: dict[str, Any]) -> None:
        await conn.execute(OUTBOX_SQL, uuid7(), topic, key_of(n, keys), json.dumps(event))

    async def faststream(conn: asyncpg.Connection, n: int, event: dict[str, Any]) -> None:
        headers = {"content-type": "application/json", "correlation_id": new_bench_id()}
        body = json.dumps(event).encode()
        await conn.execute(FASTSTREAM_SQL, "bench", body, json.dumps(headers), "bench")

    return {
        "plain-sql": plain,
        "outbox-sql": outbox,
        "outbox-sql-nonotify": outbox,
        "faststream-sql": faststream,
    }[mode]


#: The writers' sessions, by name (the latency runs count their backends' CPU apart); the
#: `-nonotify` modes' also have the trigger's notification turned off.
WRITER_APP = "bench-writer"
NAMED = {"server_settings": {"application_name": WRITER_APP}}
QUIET = {"server_settings": {"application_name": WRITER_APP, "outbox.notify": "off"}}


async def write(args: argparse.Namespace) -> list[dict[str, Any]]:
    modes = args.mode.split(",")
    # Only the connections the modes use: (sql?, notify?) -> an asyncpg pool or an engine.
    needs = {("-sql" in mode, not mode.endswith("-nonotify")) for mode in modes}
    pools = {
        notify: await asyncpg.create_pool(
            asyncpg_dsn(args.database_url),
            min_size=args.concurrency,
            max_size=args.concurrency,
            reset=keep_session,  # as SQLAlchemy's pool: a rollback if needed, no reset query
            **(NAMED if notify else QUIET),
        )
        for sql, notify in needs
        if sql
    }
    engines = {
        notify: create_async_engine(
            sqlalchemy_async_url(args.database_url),
            pool_size=args.concurrency,
            max_overflow=0,
            connect_args=NAMED if notify else QUIET,
        )
        for sql, notify in needs
        if not sql
    }

    def transaction_for(mode: str) -> Transaction:
        notify = not mode.endswith("-nonotify")
        if "-sql" in mode:
            return sql_transaction(pools[notify], sql_extra(mode, args.topic, args.keys))
        sessions = async_sessionmaker(engines[notify], expire_on_commit=False)
        return orm_transaction(
            sessions, BUSINESS[args.business], orm_extra(mode, args.topic, args.keys)
        )

    async def warm(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:
            await conn.execute(text("SELECT 1"))

    await asyncio.gather(*(warm(e) for e in engines.values() for _ in range(args.concurrency)))
    for mode in dict.fromkeys(modes) if args.warmup > 0 else ():
        await run_mode(args, mode, transaction_for(mode), args.warmup)  # results dropped
    if args.go:
        await asyncio.to_thread(sys.stdin.readline)  # the harness says when to start
    runs = [
        await run_mode(args, mode, transaction_for(mode), args.duration, lead_in=args.lead_in)
        for mode in modes
    ]
    for pool in pools.values():
        await pool.close()
    for engine in engines.values():
        await engine.dispose()
    return runs


#: One business transaction for event number n; returns (commit sent, commit returned).
Transaction = Callable[[int, dict[str, Any]], Awaitable[tuple[float, float]]]


def orm_transaction(
    sessions: async_sessionmaker[AsyncSession], business: Business, extra: Extra
) -> Transaction:
    async def run(n: int, event: dict[str, Any]) -> tuple[float, float]:
        async with sessions() as session:
            await business(session, n)
            await extra(session, n, event)
            await session.flush()
            sent = time.monotonic()
            await session.commit()
            return sent, time.monotonic()

    return run


def sql_transaction(pool: asyncpg.Pool, extra: SqlExtra) -> Transaction:
    async def run(n: int, event: dict[str, Any]) -> tuple[float, float]:
        async with pool.acquire() as conn:
            tx = conn.transaction()
            await tx.start()
            try:
                await conn.execute(ORDER_SQL, f"customer-{n % 997}", Decimal("19.99"))
                await extra(conn, n, event)
            except BaseException:
                await tx.rollback()
                raise
            sent = time.monotonic()
            await tx.commit()
            return sent, time.monotonic()

    return run


async def run_mode(
    args: argparse.Namespace,
    mode: str,
    transaction: Transaction,
    duration: float,
    *,
    lead_in: float = 0.0,
) -> dict[str, Any]:
    """`duration` seconds of transactions, after `lead_in` seconds of the same load whose
    transactions are left out of the results (the system under test warms up under it)."""
    tally = Tally(cpu_at_start=time.process_time())
    counter = itertools.count(args.offset)
    total = int(args.rate * (lead_in + duration))
    begun_at = time.monotonic()
    started, deadline = begun_at + lead_in, begun_at + lead_in + duration

    def measuring_starts() -> None:
        tally.cpu_at_start = time.process_time()

    asyncio.get_running_loop().call_at(started, measuring_starts)

    async def one(n: int) -> None:
        bench_id = new_bench_id()
        event = payload_dict(n, bench_id)  # the application builds its event in every mode
        begun = time.monotonic()
        try:
            sent, done = await transaction(n, event)
        except Exception:  # noqa: BLE001 - a failed transaction is counted, not fatal
            if begun >= started:
                tally.errors += 1
            return
        if begun >= started:
            tally.commits[bench_id] = (sent, done)
            tally.durations.append(done - begun)

    async def worker() -> None:
        while True:
            n = next(counter)
            if args.rate > 0:
                i = n - args.offset
                if i >= total or time.monotonic() >= deadline:  # behind schedule: stop on time
                    return
                delay = begun_at + i / args.rate - time.monotonic()
                if delay > 0:
                    await asyncio.sleep(delay)
            elif time.monotonic() >= deadline:
                return
            await one(n)

    await asyncio.gather(*(worker() for _ in range(args.concurrency)))
    ended = time.monotonic()
    return {
        "mode": mode,
        "started": started,
        "ended": ended,
        "cpu_seconds": time.process_time() - tally.cpu_at_start,
        "count": len(tally.durations),
        "errors": tally.errors,
        "commits": tally.commits,
        "durations": tally.durations,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--mode", required=True, help=f"comma-separated of: {','.join(MODES)}")
    parser.add_argument(
        "--business", choices=sorted(BUSINESS), default="order", help="ORM modes' transaction"
    )
    parser.add_argument("--rate", type=float, default=0.0, help="transactions/s; 0: closed loop")
    parser.add_argument("--duration", type=float, default=3.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument(
        "--warmup", type=float, default=0.0, help="seconds of each mode, unmeasured, first"
    )
    parser.add_argument(
        "--lead-in",
        type=float,
        default=0.0,
        help="seconds of the same load, after --go and unmeasured, before each mode's run",
    )
    parser.add_argument(
        "--event-loop", choices=("auto", "uvloop", "asyncio"), default="auto", help="as the relay's"
    )
    parser.add_argument("--topic", default="bench")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--offset", type=int, default=0, help="first event number")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--go", action="store_true", help="start on a line on stdin")
    args = parser.parse_args()
    if not set(args.mode.split(",")) <= set(MODES):
        parser.error(f"--mode: choose from {', '.join(MODES)}")
    if args.business != "order" and any("-sql" in m for m in args.mode.split(",")):
        parser.error("--business: the -sql modes write the order row only")
    with asyncio.Runner(loop_factory=loop_factory(args.event_loop)) as runner:
        result = runner.run(write(args))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
