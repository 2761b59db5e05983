"""Operator actions on the dead letters (used by `outbox-relay dlq ...`)."""

from __future__ import annotations

import uuid
from typing import Any

import asyncpg

from outbox.urls import asyncpg_dsn
from outbox.validation import bucket_for
from relay.sql import QUERIES


async def list_dead_letters(
    database_url: str, topic: str | None, limit: int
) -> list[dict[str, Any]]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return [dict(r) for r in await conn.fetch(QUERIES["list_dead_letters"], topic, limit)]
    finally:
        await conn.close()


async def replay_dead_letters(
    database_url: str, event_ids: list[uuid.UUID] | None, topic: str | None
) -> int:
    """Move the chosen dead letters back into outbox_events in one transaction."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with conn.transaction():
            rows = await conn.fetch(QUERIES["take_dead_letters"], event_ids, topic)
            if rows:
                await conn.execute(
                    QUERIES["requeue_events"],
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
    finally:
        await conn.close()
