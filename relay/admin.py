"""Operator actions on the dead letters (used by `outbox-relay dlq ...`), and republishing
delivered events from the history (`outbox-relay republish`).

Every action chooses dead letters with the same `Filters`, bound as the parameters of one
filtered query (`dlq_chosen` in queries.sql). Replay and purge go in batches of one
transaction each, walking the primary key, so that a replay of a million dead letters holds
neither a million rows in memory nor one long transaction.
"""

from __future__ import annotations

import json
import shlex
import uuid
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from datetime import datetime
from types import MappingProxyType
from typing import Any

import asyncpg

from outbox.relay.sql import QUERIES, SQLITE_QUERIES
from outbox.urls import asyncpg_dsn, is_sqlite

#: Dead letters per transaction of replay and purge (a quarantine chain is never split, so a
#: batch can hold more: the chains of the dead letters it picked).
BATCH_SIZE = 1000


def _filtered(queries: Mapping[str, str]) -> Mapping[str, str]:
    return MappingProxyType(
        {
            name: f"WITH chosen AS ({queries['dlq_chosen']})\n{queries[name]}"
            for name in (
                "dlq_list",
                "dlq_show",
                "dlq_summary",
                "dlq_orphans",
                "dlq_pick",
                "dlq_purge",
            )
        }
    )


#: The dlq_* queries over the filtered dead letters, as they are run (see queries.sql), and
#: their SQLite spelling (queries_sqlite.sql, same names).
FILTERED = _filtered(QUERIES)
SQLITE_FILTERED = _filtered(SQLITE_QUERIES)


def _sql(conn: asyncpg.Connection) -> tuple[Mapping[str, str], Mapping[str, str]]:
    """The (filtered, plain) queries of the connection's database."""
    if getattr(conn, "dialect", None) == "sqlite":  # a SqliteConnection
        return SQLITE_FILTERED, SQLITE_QUERIES
    return FILTERED, QUERIES


#: The fields of a dead letter's JSON document (`dlq list --json`), in this order; `dlq show`
#: adds `headers` and `payload`.
DOCUMENT_FIELDS = (
    "dead_letter_id",
    "event_id",
    "original_seq",
    "topic",
    "key",
    "event_type",
    "error_class",
    "error_message",
    "attempts",
    "created_at",
    "first_failed_at",
    "last_failed_at",
    "relay_id",
    "holds_key",
    "held_behind",
)


#: The history_* queries over the filtered history rows, as they are run (see queries.sql).
HISTORY = MappingProxyType(
    {
        # A block with CTEs of its own continues the WITH list.
        name: f"WITH chosen AS ({QUERIES['history_chosen']})"
        + (f",\n{QUERIES[name][5:]}" if QUERIES[name].startswith("WITH ") else f"\n{QUERIES[name]}")
        for name in ("history_summary", "history_republish")
    }
)


class ChainError(ValueError):
    """A replay asked for part of a quarantine chain; the message says what to run instead."""


@dataclass(frozen=True, slots=True)
class HistoryFilters:
    """Which delivered events `republish` takes: all of the given conditions (none: every
    one). `since` and `until` bound the time a row got to its table: delivered_at here."""

    event_ids: tuple[uuid.UUID, ...] = ()
    topic: str | None = None
    key: str | None = None
    event_type: str | None = None
    since: datetime | None = None
    until: datetime | None = None

    def params(self) -> tuple[Any, ...]:
        """$1 to $6 of `history_chosen`."""
        return (
            list(self.event_ids) or None,
            self.topic,
            self.key,
            self.event_type,
            self.since,
            self.until,
        )


@dataclass(frozen=True, slots=True)
class Filters(HistoryFilters):
    """Which dead letters a command acts on: the same conditions, with the error class, and
    the time they were dead-lettered (last_failed_at)."""

    error_class: str | None = None

    def params(self) -> tuple[Any, ...]:
        """$1 to $7 of `dlq_chosen`: the error class is $5."""
        common = HistoryFilters.params(self)
        return (*common[:4], self.error_class, *common[4:])


@dataclass(frozen=True, slots=True)
class Group:
    """Chosen dead letters of one topic and error class (`dlq count`, `dlq purge`)."""

    topic: str
    error_class: str
    count: int
    #: How many of them hold their key (a quarantine chain).
    holding_key: int
    oldest: datetime
    newest: datetime

    def document(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "error_class": self.error_class,
            "count": self.count,
            "holding_key": self.holding_key,
            "oldest": self.oldest.isoformat(),
            "newest": self.newest.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Replayed:
    replayed: int
    transactions: int
    #: Quarantined keys whose chain went back (their quarantine is lifted).
    released_keys: int


@dataclass(frozen=True, slots=True)
class Purged:
    purged: int
    transactions: int


@asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection that plans every statement with its parameters, so that the filters that
    are not given fold away and the planner sees which indexes the others allow. On SQLite,
    a `SqliteConnection` that answers the same calls."""
    if is_sqlite(database_url):
        from outbox.relay.stores.sqlite import SqliteConnection  # aiosqlite: the sqlite extra

        async with SqliteConnection.open(database_url) as sqlite:
            yield sqlite
        return
    conn = await asyncpg.connect(
        asyncpg_dsn(database_url), server_settings={"plan_cache_mode": "force_custom_plan"}
    )
    try:
        yield conn
    finally:
        await conn.close()


def document(row: asyncpg.Record) -> dict[str, Any]:
    """A dead letter as a JSON-ready dict: DOCUMENT_FIELDS, then headers and payload if read."""
    doc: dict[str, Any] = {}
    for name in DOCUMENT_FIELDS:
        value = row[name]
        if isinstance(value, datetime):
            value = value.isoformat()
        elif isinstance(value, uuid.UUID):
            value = str(value)
        doc[name] = value
    if "payload" in row:
        doc["headers"] = json.loads(row["headers"])
        doc["payload"] = json.loads(row["payload"])
    return doc


async def list_dead_letters(
    conn: asyncpg.Connection, filters: Filters, limit: int
) -> list[asyncpg.Record]:
    """At most `limit`, newest first; with a key, that key's dead letters in their original
    order (its chain)."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _sql(conn)[0]["dlq_list"], *filters.params(), limit
    )
    return rows


async def show_dead_letters(
    conn: asyncpg.Connection, filters: Filters, limit: int | None = None
) -> list[asyncpg.Record]:
    """As `list_dead_letters`, with headers and payload, in original order."""
    rows: list[asyncpg.Record] = await conn.fetch(
        _sql(conn)[0]["dlq_show"], *filters.params(), limit
    )
    return rows


async def summarize(
    conn: asyncpg.Connection, filters: Filters, limit: int | None = None
) -> list[Group]:
    """The chosen dead letters (the first `limit` that replay or purge would take) by topic
    and error class, the largest group first."""
    rows = await conn.fetch(_sql(conn)[0]["dlq_summary"], *filters.params(), limit)
    return [
        Group(r["topic"], r["error_class"], r["dead"], r["held"], r["oldest"], r["newest"])
        for r in rows
    ]


async def check_chains(
    conn: asyncpg.Connection, filters: Filters, limit: int | None = None
) -> None:
    """Replay's chain rule: a quarantine chain goes back whole, with its head (the poison
    event, or the held event of lowest seq once that was purged). A selection that holds part
    of a chain but not its head raises ChainError, which names the command that replays it."""
    if filters == Filters() and limit is None:
        return  # every dead letter: every head is in
    orphan = await conn.fetchrow(_sql(conn)[0]["dlq_orphans"], *filters.params(), limit)
    if orphan is None:
        return
    more = orphan["keys"] - 1
    raise ChainError(
        f"event {orphan['event_id']} is held behind event {orphan['head']} of key "
        f"{orphan['key']!r}, which this selection leaves out: replay the whole chain with "
        f"`outbox-relay dlq replay --key {shell_word(orphan['key'])}`"
        + (f" ({more} more key(s) like it)" if more else "")
    )


async def replay_dead_letters(
    conn: asyncpg.Connection,
    filters: Filters,
    *,
    limit: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> Replayed:
    """Move the chosen dead letters (the first `limit` of them in dead-letter order) back into
    outbox_events with their original id and seq, `batch_size` per transaction. Each batch
    takes the whole quarantine chain of every key it touches, so a chain goes back whole and
    in one transaction, and its key is released in that transaction. Raises ChainError, before
    anything moves, if the selection holds part of a chain without its head."""
    await check_chains(conn, filters, limit)
    params = filters.params()
    filtered, queries = _sql(conn)
    replayed = transactions = released = picked_so_far = 0
    after = 0
    while limit is None or picked_so_far < limit:
        size = batch_size if limit is None else min(batch_size, limit - picked_so_far)
        async with conn.transaction():
            picked = await conn.fetch(filtered["dlq_pick"], *params, after, size)
            if not picked:
                break
            moved = await conn.fetchrow(
                queries["dlq_requeue"],
                [r["dead_letter_id"] for r in picked],
                list({r["key"] for r in picked if r["holds_key"]}),
            )
        after = picked[-1]["dead_letter_id"]
        picked_so_far += len(picked)
        replayed += moved["replayed"]
        released += moved["released"]
        transactions += 1
    return Replayed(replayed, transactions, released)


async def purge_dead_letters(
    conn: asyncpg.Connection,
    filters: Filters,
    *,
    limit: int | None = None,
    batch_size: int = BATCH_SIZE,
) -> Purged:
    """Delete the chosen dead letters for good (the first `limit` in dead-letter order),
    `batch_size` per transaction. Exactly those: deleting the head of a chain leaves the rest
    of it holding the key, and the key is released once none of its held rows is left."""
    params = filters.params()
    purged = transactions = 0
    after = 0
    while limit is None or purged < limit:
        size = batch_size if limit is None else min(batch_size, limit - purged)
        deleted = await conn.fetch(_sql(conn)[0]["dlq_purge"], *params, after, size)
        if not deleted:
            break
        after = max(r["dead_letter_id"] for r in deleted)
        purged += len(deleted)
        transactions += 1
    return Purged(purged, transactions)


def shell_word(text: str) -> str:
    """`text` as one shell word that stays on one line: shlex quoting, or bash's $'...' for
    a text with control characters (a newline in a key would break a one-line message)."""
    if text.isprintable():
        return shlex.quote(text)
    return "$'" + "".join(_ansi_c(ch) for ch in text) + "'"


def _ansi_c(ch: str) -> str:
    if ch.isprintable() and ch not in "\\'":
        return ch
    code = ord(ch)
    return f"\\x{code:02x}" if code < 0x80 else f"\\U{code:08x}"


@dataclass(frozen=True, slots=True)
class HistoryGroup:
    """Chosen history rows of one topic (`republish --dry-run`)."""

    topic: str
    count: int
    oldest: datetime
    newest: datetime

    def document(self) -> dict[str, Any]:
        return {
            "topic": self.topic,
            "count": self.count,
            "oldest": self.oldest.isoformat(),
            "newest": self.newest.isoformat(),
        }


@dataclass(frozen=True, slots=True)
class Republished:
    republished: int
    #: Chosen, but their seq is in the outbox already (pending, or republished before and
    #: not delivered yet): left as they are.
    skipped: int
    transactions: int


async def summarize_history(
    conn: asyncpg.Connection, filters: HistoryFilters
) -> list[HistoryGroup]:
    rows = await conn.fetch(HISTORY["history_summary"], *filters.params())
    return [HistoryGroup(r["topic"], r["events"], r["oldest"], r["newest"]) for r in rows]


async def republish(
    conn: asyncpg.Connection,
    filters: HistoryFilters,
    *,
    at: datetime,
    batch_size: int = BATCH_SIZE,
) -> Republished:
    """Put the chosen delivered events back into outbox_events with their original id, seq
    and created_at, and the header `outbox-republished-at: <at>`; `batch_size` per statement
    (each its own transaction), walking the history's primary key. The relays publish them
    again in seq order, so they keep their relative order."""
    params = filters.params()
    stamp = at.isoformat()
    republished = skipped = transactions = 0
    after = 0
    while True:
        row = await conn.fetchrow(HISTORY["history_republish"], *params, after, batch_size, stamp)
        if not row["picked"]:
            break
        after = row["last"]
        republished += row["republished"]
        skipped += row["picked"] - row["republished"]
        transactions += 1
    return Republished(republished, skipped, transactions)
