"""Test helpers around the two seams: a fake clock, a SQLite outbox file to drive the real
`SqliteStore` with, and a publisher that records what it was given.

There is no in-memory store: a hand-written copy of the claim rule drifts from the real one, so
the loop's tests run on `SqliteStore` (the claim rule: relay/ordering.py, `claim_batch`).
"""

from __future__ import annotations

import asyncio
import atexit
import shutil
import tempfile
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, create_async_engine

from outbox import DeadLetter, OutboxEvent
from outbox.envelope import Envelope
from outbox.relay import migrate
from outbox.relay.seams import BrokerUnavailableError, Claim, PublishResult
from outbox.relay.stores.sqlite import SqliteStore
from outbox.urls import sqlalchemy_async_url

#: A SQLite file migrated to head, once per test process; each test gets a copy of it.
_template: Path | None = None


async def migrated_sqlite(path: Path) -> str:
    """A SQLite outbox file at `path` with the schema of the migrations; its sqlite:/// URL."""
    global _template
    if _template is None:
        workdir = tempfile.mkdtemp(prefix="outbox-template-")
        atexit.register(shutil.rmtree, workdir, ignore_errors=True)
        template = Path(workdir) / "outbox.db"
        # In a thread: Alembic's environment runs its own event loop.
        await asyncio.to_thread(migrate.upgrade, f"sqlite:///{template}")
        _template = template
    shutil.copyfile(_template, path)
    return f"sqlite:///{path}"


class FakeClock:
    """Starts a minute ahead of real time, so rows stamped by CURRENT_TIMESTAMP (real time, to
    the second) are due at once; moves only when a test advances it."""

    def __init__(self) -> None:
        self.now = datetime.now(UTC).replace(microsecond=0) + timedelta(seconds=60)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


class TrackedSqliteStore(SqliteStore):
    """The real `SqliteStore`, noting whether it was stopped (the relay gave it back) and how
    many claims it answered."""

    def __init__(self, database_url: str, *, clock: FakeClock) -> None:
        super().__init__(database_url, clock=clock)
        self.stopped = False
        self.claims = 0

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        claim = await super().claim(limit, exclude, after)
        self.claims += 1
        return claim

    async def start(self, relay_id: str) -> None:
        await super().start(relay_id)
        self.stopped = False

    async def stop(self) -> None:
        await super().stop()
        self.stopped = True


class OutboxDb:
    """A SQLite outbox file with the schema: write events as an application does (OutboxEvent in
    a SQLAlchemy session) and read the tables back. Async (aiosqlite), so a test never blocks
    the event loop while a relay's transaction is open."""

    def __init__(self, url: str, clock: FakeClock, engine: AsyncEngine) -> None:
        self.url = url
        self.clock = clock
        self.engine = engine

    @classmethod
    async def create(cls, path: Path, clock: FakeClock) -> OutboxDb:
        url = await migrated_sqlite(path)
        return cls(url, clock, create_async_engine(sqlalchemy_async_url(url)))

    async def close(self) -> None:
        await self.engine.dispose()

    def store(self) -> TrackedSqliteStore:
        """A new `SqliteStore` on this file, on the fake clock."""
        return TrackedSqliteStore(self.url, clock=self.clock)

    async def add(
        self, topic: str = "t", key: str | None = None, payload: Any = None
    ) -> OutboxEvent:
        """Commit one event; it has its `seq` and `id` (other columns are not loaded)."""
        (event,) = await self.add_all([OutboxEvent(topic=topic, key=key, payload=payload or {})])
        return event

    async def add_all(self, events: Sequence[OutboxEvent]) -> list[OutboxEvent]:
        """Commit the events in one transaction, in order (seq ascending)."""
        async with AsyncSession(self.engine, expire_on_commit=False) as session, session.begin():
            for event in events:  # one flush each: seq follows the list order
                session.add(event)
                await session.flush()
        return list(events)

    async def pending(self) -> list[OutboxEvent]:
        """The rows of outbox_events, by seq."""
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            rows = await session.scalars(select(OutboxEvent).order_by(OutboxEvent.seq))
            return list(rows)

    async def row(self, seq: int) -> OutboxEvent:
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            return await session.get_one(OutboxEvent, seq)

    async def retry_delay(self, seq: int) -> float:
        """Seconds from the fake clock's now until the event is due again."""
        return ((await self.row(seq)).available_at - self.clock()).total_seconds()

    async def dead_letters(self) -> list[DeadLetter]:
        """The rows of outbox_dead_letters, in the order they were written."""
        async with AsyncSession(self.engine, expire_on_commit=False) as session:
            rows = await session.scalars(select(DeadLetter).order_by(DeadLetter.dead_letter_id))
            return list(rows)


class RecordingPublisher:
    """Accepts everything and remembers it, in order."""

    name = "recording"

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.down = False

    async def start(self) -> None:
        if self.down:
            raise BrokerUnavailableError("broker is down (test)")

    async def stop(self) -> None:
        return None

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        if self.down:
            raise BrokerUnavailableError("broker is down (test)")
        self.published.extend(batch)
        return [None] * len(batch)
