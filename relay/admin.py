"""Operator actions on the dead letters (used by `outbox-relay dlq ...`)."""

from __future__ import annotations

import shlex
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import asyncpg

from outbox.urls import asyncpg_dsn
from outbox.validation import bucket_for
from relay.sql import QUERIES


class ChainError(ValueError):
    """A replay asked for part of a quarantine chain; the message says what to run instead."""


@asynccontextmanager
async def _connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        yield conn
    finally:
        await conn.close()


async def list_dead_letters(
    database_url: str, topic: str | None, limit: int, key: str | None = None
) -> list[dict[str, Any]]:
    """Newest first; with `key`, that key's dead letters in their original order (its chain)."""
    async with _connect(database_url) as conn:
        rows = await conn.fetch(QUERIES["list_dead_letters"], topic, key, limit)
        return [dict(r) for r in rows]


async def replay_dead_letters(
    database_url: str,
    event_ids: list[uuid.UUID] | None,
    topic: str | None,
    key: str | None = None,
) -> int:
    """Move the chosen dead letters back into outbox_events in one transaction, with their
    original id and seq. A quarantine chain goes back whole and in order, and its key is
    released in the same transaction. An id in the middle of a chain raises ChainError."""
    async with _connect(database_url) as conn, conn.transaction():
        if event_ids:
            tails = await conn.fetch(QUERIES["chain_tails"], event_ids)
            if tails:
                tail = tails[0]
                raise ChainError(
                    f"event {tail['event_id']} is held behind event {tail['head']} of key "
                    f"{tail['key']!r}: replay the whole chain with "
                    f"`outbox-relay dlq replay --key {shlex.quote(tail['key'])}`"
                )
        rows = await conn.fetch(QUERIES["take_dead_letters"], event_ids, topic, key)
        if rows:
            await conn.execute(
                QUERIES["requeue_events"],
                [r["original_seq"] for r in rows],
                [r["event_id"] for r in rows],
                [r["topic"] for r in rows],
                [r["key"] for r in rows],
                [bucket_for(r["key"], str(r["event_id"])) for r in rows],
                [r["payload"] for r in rows],
                [r["headers"] for r in rows],
                [r["event_type"] for r in rows],
                [r["created_at"] for r in rows],
            )
        return len(rows)


async def discard_dead_letters(
    database_url: str, event_ids: list[uuid.UUID] | None, key: str | None
) -> int:
    """Delete dead letters for good; deleting a key's chain lifts its quarantine."""
    async with _connect(database_url) as conn:
        return len(await conn.fetch(QUERIES["discard_dead_letters"], event_ids, key))
