"""`outbox-relay demo`: the whole outbox on a throwaway SQLite file, in about a second.

An "orders" handler writes its own rows (its own declarative base) and `OutboxEvent` rows in the
same transactions through a SQLAlchemy `AsyncSession`; one transaction rolls back. Then the real
`Relay` publishes them with `SqliteStore` and the JSON-lines publisher behind a `FaultInjector`, a
wrapper that plays a broker which times out once on one event (retried) and refuses another
(dead-lettered). Only the database and the broker differ from production.
"""

from __future__ import annotations

import asyncio
import shutil
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from sqlalchemy import Text, func, select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay import migrate
from outbox.relay.publishers.stdout import JsonLinesPublisher
from outbox.relay.relay import Relay, RelayStats
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import Failure, Verdict
from outbox.relay.stores.sqlite import SqliteStore
from outbox.relay.testing import Fault, FaultInjector

TOPIC = "orders"
POISON = "PoisonPill"
#: The event the demo broker times out on once: (key, event_type).
FLAKY = ("order-1", "OrderPaid")
#: Upper bound for the relay phase; it normally takes a fraction of a second.
RELAY_TIMEOUT = 8.0
DLQ_QUERY = (
    "SELECT event_id, topic, key, error_class, error_message "
    "FROM outbox_dead_letters ORDER BY last_failed_at DESC;"
)


class ShopBase(DeclarativeBase):
    """The application's own declarative base; the outbox tables live beside it."""


class Order(ShopBase):
    __tablename__ = "orders"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text)
    total_cents: Mapped[int]


class PaymentDeclinedError(Exception):
    """Raised inside a transaction by the demo handler, so that transaction rolls back."""


@dataclass(frozen=True, slots=True)
class Step:
    order_id: str
    event_type: str
    status: str
    rolls_back: bool = False


#: The business transactions, one commit each, in this order.
STEPS = (
    Step("order-1", "OrderPlaced", "placed"),
    Step("order-2", "OrderPlaced", "placed"),
    Step("order-1", "OrderPaid", "paid"),
    Step("order-3", "OrderPlaced", "placed"),
    Step("order-2", "OrderPaid", "paid"),
    Step("order-1", "OrderShipped", "shipped"),
    Step("order-4", "OrderPlaced", "placed", rolls_back=True),
    Step("order-3", POISON, "poisoned"),
    Step("order-2", "OrderShipped", "shipped"),
)


def moody_broker() -> Fault:
    """A broker's moods, for the demo: it refuses `PoisonPill` events for good (non-retriable:
    straight to the dead letters) and times out once on the `FLAKY` event (retriable)."""
    timed_out: set[uuid.UUID] = set()

    def fault(event: Envelope) -> Failure | None:
        if event.event_type == POISON:
            return Failure("MessageRejected", "the broker refused the message", Verdict.POISON)
        if (event.key, event.event_type) == FLAKY and event.id not in timed_out:
            timed_out.add(event.id)
            return Failure("RequestTimedOut", "no acknowledgement in time")
        return None

    return fault


async def run_step(sessions: async_sessionmaker[AsyncSession], step: Step) -> None:
    """One business transaction: the order row and its event commit together, or neither."""
    async with sessions.begin() as session:
        order = await session.get(Order, step.order_id)
        if order is None:
            order = Order(id=step.order_id, status=step.status, total_cents=4200)
            session.add(order)
        order.status = step.status
        session.add(
            OutboxEvent(
                topic=TOPIC,
                key=step.order_id,
                event_type=step.event_type,
                payload={
                    "order_id": step.order_id,
                    "status": step.status,
                    "total_cents": order.total_cents,
                },
                headers={"source": "outbox-demo"},
            )
        )
        if step.rolls_back:
            raise PaymentDeclinedError("card declined")


def table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> list[str]:
    """Left-aligned columns, a dashed rule under the header."""
    cells = [[str(c) for c in header], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = [
        "  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() for row in cells
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return ["   " + line for line in lines]


async def run_demo(
    *, keep: bool = False, jsonl_path: str | None = None, out: IO[str] | None = None
) -> None:
    """Run the demo in a fresh temporary directory; remove it afterwards unless `keep`."""
    stream = out if out is not None else sys.stdout

    def say(line: str) -> None:
        print(line, file=stream, flush=True)

    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="outbox-demo-"))
    try:
        await _demo(workdir, Path(jsonl_path) if jsonl_path else workdir / "published.jsonl", say)
    finally:
        if keep:
            say(f"Kept {workdir} (look around: sqlite3 {workdir / 'outbox.db'})")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
            gone = "the database" if jsonl_path else "the database and the JSON lines"
            say(f"Removed {workdir} ({gone}): run `outbox-relay demo --keep` to keep them.")
    say(f"Done in {time.monotonic() - started:.1f} s.")


async def _demo(workdir: Path, jsonl: Path, say: Callable[[str], None]) -> None:
    url = f"sqlite+aiosqlite:///{workdir / 'outbox.db'}"
    say(f"Outbox demo: SQLite database {workdir / 'outbox.db'}")
    # The tables come from the migrations, as `outbox-relay migrate` makes them (in a thread:
    # Alembic's environment runs its own event loop).
    await asyncio.to_thread(migrate.upgrade, url)
    engine = create_async_engine(url)
    try:
        async with engine.begin() as conn:
            await conn.run_sync(ShopBase.metadata.create_all)
        sessions = async_sessionmaker(engine, expire_on_commit=False)

        say("")
        say("1. Business transactions (the orders row and its OutboxEvent commit together)")
        committed = 0
        for step in STEPS:
            try:
                await run_step(sessions, step)
            except PaymentDeclinedError as exc:
                say(f"   rolled back  {step.order_id}  {step.event_type}  ({exc})")
            else:
                committed += 1
                say(f"   committed    {step.order_id}  {step.event_type}")
        async with sessions() as session:
            orders = await session.scalar(select(func.count()).select_from(Order))
            pending = await session.scalar(select(func.count()).select_from(OutboxEvent))
            lost = await session.get(Order, "order-4")
        say(
            f"   -> {orders} orders and {pending} pending events; order-4 exists: "
            f"{'yes' if lost else 'no'} (neither its row nor its event was committed)"
        )

        say("")
        say("2. The relay (SqliteStore -> moody broker -> JSON lines), until everything is settled")
        broker = FaultInjector(JsonLinesPublisher(jsonl), moody_broker())
        relay = Relay(
            SqliteStore(url),
            broker,
            relay_id="demo",
            batch_size=100,
            poll_interval=0.02,
            retry_policy=RetryPolicy(base_seconds=0.1, max_seconds=0.5, max_attempts=5),
            shutdown_timeout=2.0,
        )
        began = time.monotonic()
        await _run_until(relay, lambda s: s.delivered + s.dead_lettered >= committed)
        s = relay.stats
        say(
            f"   delivered {s.delivered}, retried {s.retried}, held back {s.held_back}, "
            f"dead-lettered {s.dead_lettered} in {time.monotonic() - began:.2f} s"
        )

        say("")
        say("3. Published, in order (per key in seq order; order-1 waited for its retry)")
        for line in table(
            ("seq", "key", "type", "topic"),
            [(e.seq, e.key, e.event_type, e.topic) for e in broker.published],
        ):
            say(line)
        say(f"   JSON lines: {jsonl}")

        say("")
        say("4. Dead letters: the broker refused the PoisonPill, so it was parked, not retried")
        say(f"   {DLQ_QUERY}")
        async with engine.connect() as conn:
            result = await conn.execute(text(DLQ_QUERY))
            # SQLite stores UUIDs as 32 hex digits; show them as Postgres would.
            lines = table(
                tuple(result.keys()), [(str(uuid.UUID(row[0])), *row[1:]) for row in result]
            )
        for line in lines:
            say(line)
        say(
            "   Replay after fixing the cause (with --keep): outbox-relay dlq replay --id "
            f"EVENT_ID --database-url sqlite:///{workdir / 'outbox.db'}"
        )
    finally:
        await engine.dispose()

    say("")
    say("5. Same code in production, with PostgreSQL and Kafka:")
    say("   outbox-relay migrate --database-url postgresql://user:pass@host/db")
    say(
        "   outbox-relay run --database-url postgresql://user:pass@host/db --broker kafka "
        "--kafka-bootstrap host:9092"
    )
    say("   The application keeps adding OutboxEvent rows in its own transactions.")
    say("")


async def _run_until(relay: Relay, settled: Callable[[RelayStats], bool]) -> None:
    """Run the relay until `settled(stats)` holds, then stop it; fail if it does not."""
    runner = asyncio.create_task(relay.run(), name="demo-relay")
    waiter = asyncio.create_task(relay.wait_for(settled, RELAY_TIMEOUT))
    try:
        await asyncio.wait({runner, waiter}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        relay.request_stop()
        waiter.cancel()  # no-op when it is done already
        await asyncio.gather(waiter, return_exceptions=True)
        await runner  # raises if the relay could not start
    if waiter.cancelled():
        raise RuntimeError("the relay stopped before every event was settled")
    try:
        waiter.result()
    except TimeoutError:
        raise RuntimeError(f"the relay did not settle every event in {RELAY_TIMEOUT} s") from None
