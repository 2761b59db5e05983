"""The inbox: a consumer applies each event once, however often it is delivered.

The relay delivers at least once (a crash between the broker's acknowledgement and the delete
sends an event again). A consumer that writes to a database makes that effectively once by
recording the event's id in the same transaction as its changes:

    async with inbox.once(session, event.id, consumer="billing") as fresh:
        if fresh:
            session.add(Invoice(...))  # commits with the inbox row, or neither does

`once` inserts `(consumer, event_id)` into `outbox_inbox` with `ON CONFLICT DO NOTHING`.
`fresh` is False when the row is there already: the changes of an earlier delivery are
committed, so this one is skipped. Two deliveries racing: the second insert waits for the
first transaction; if it commits, the second is not fresh; if it rolls back, the second is.
Under REPEATABLE READ or SERIALIZABLE the loser may instead fail with a serialization error:
retry it, and it is then skipped.
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from sqlalchemy import CursorResult, delete
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.ext.asyncio import AsyncSession

from outbox.errors import OutboxValidationError
from outbox.models import InboxEntry
from outbox.validation import MAX_CONSUMER_LENGTH


def _check_consumer(consumer: object) -> str:
    if not isinstance(consumer, str) or not consumer:
        raise OutboxValidationError("consumer", f"must be a non-empty str, got {consumer!r}")
    if len(consumer) > MAX_CONSUMER_LENGTH:
        raise OutboxValidationError(
            "consumer", f"is {len(consumer)} characters long, the limit is {MAX_CONSUMER_LENGTH}"
        )
    return consumer


def _check_event_id(event_id: object) -> uuid.UUID:
    if isinstance(event_id, uuid.UUID):
        return event_id
    try:
        return uuid.UUID(str(event_id))
    except ValueError:
        raise OutboxValidationError("event_id", f"must be a UUID, got {event_id!r}") from None


async def record(session: AsyncSession, event_id: uuid.UUID | str, *, consumer: str) -> bool:
    """Add the inbox row in the session's transaction; False if it was there already. `once`
    is this plus the transaction."""
    row = {"consumer": _check_consumer(consumer), "event_id": _check_event_id(event_id)}
    dialect = postgresql if session.get_bind().dialect.name == "postgresql" else sqlite
    statement = dialect.insert(InboxEntry).values(row).on_conflict_do_nothing()
    result = cast(CursorResult[Any], await session.execute(statement))
    return result.rowcount == 1


@asynccontextmanager
async def once(
    session: AsyncSession, event_id: uuid.UUID | str, *, consumer: str
) -> AsyncIterator[bool]:
    """Whether this consumer sees the event for the first time; apply it in the block.

    In the session's transaction if one is open (its commit is the caller's), else in a new
    one, committed when the block ends and rolled back if it raises."""
    if session.in_transaction():
        yield await record(session, event_id, consumer=consumer)
        return
    async with session.begin():
        yield await record(session, event_id, consumer=consumer)


async def prune(
    session: AsyncSession,
    *,
    older_than: timedelta,
    consumer: str | None = None,
    now: datetime | None = None,
) -> int:
    """Delete the inbox rows processed more than `older_than` ago (of one consumer, or of
    all); return how many. Keep them longer than an event can be redelivered: the broker's
    retention, and how long you keep dead letters you may replay. Commit is the caller's."""
    if older_than <= timedelta(0):
        raise OutboxValidationError("older_than", f"must be positive, got {older_than}")
    cutoff = (now or datetime.now(UTC)) - older_than
    statement = delete(InboxEntry).where(InboxEntry.processed_at < cutoff)
    if consumer is not None:
        statement = statement.where(InboxEntry.consumer == _check_consumer(consumer))
    result = cast(CursorResult[Any], await session.execute(statement))
    return result.rowcount
