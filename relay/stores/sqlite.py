"""The SQLite store: one relay on one SQLite file, for demos, development and fast tests.

PostgreSQL is for production (several relays sharing key buckets through leases, LISTEN/NOTIFY,
Alembic migrations). SQLite has no migrations: `create_schema()` creates the tables from
`outbox.metadata`. The hot path uses a raw `aiosqlite` connection, not SQLAlchemy, and the SQL
lives here as the named constants below, because relay/queries.sql is PostgreSQL-specific.

Semantics match `PostgresStore` for a single relay: there are no leases (the relay owns every
bucket, so run exactly one relay per database file), a claim returns the oldest available
events in seq order and skips any event whose key has an earlier event not yet available, and
every change says how many rows it changed.

Time: SQLite has no timestamp type. SQLAlchemy (through `outbox.models.UtcDateTime`) stores
naive UTC text 'YYYY-MM-DD HH:MM:SS.ffffff' and the CURRENT_TIMESTAMP defaults store
'YYYY-MM-DD HH:MM:SS' (UTC). This store writes and compares the first format; text comparison
orders both correctly, since a value without microseconds is a prefix of the same second with
them. "Now" comes from the injectable `clock`, so tests control time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import create_async_engine

from outbox.envelope import Envelope
from outbox.models import metadata
from outbox.relay.seams import Backlog, Claim, Dead, Retry, StoreUnavailableError, park
from outbox.urls import is_sqlite, redact, sqlalchemy_async_url
from outbox.validation import BUCKETS

# -- SQL ---------------------------------------------------------------------------------------
# Named parameters (:now, ...) are bound by sqlite3. Times are naive UTC text (see above).

#: The claim, as Postgres's `claim_batch` (relay/queries.sql; the rule: relay/ordering.py):
#: oldest available events in seq order, skipping any event whose key has an earlier event
#: waiting for a retry or a delayed delivery; `held_behind` names the poison event an event of
#: a quarantined key is parked behind.
CLAIM_BATCH = """
SELECT e.seq, e.id, e.topic, e.key, e.payload, e.headers, e.event_type, e.created_at, e.attempts,
       CASE WHEN e.key IS NOT NULL
                 AND EXISTS (SELECT 1 FROM outbox_dead_letters WHERE holds_key)
            THEN (SELECT coalesce(q.held_behind, q.event_id) FROM outbox_dead_letters AS q
                  WHERE q.key = e.key AND q.holds_key
                  ORDER BY q.original_seq LIMIT 1)
       END AS held_behind
FROM outbox_events AS e
WHERE e.available_at <= :now
  AND (e.key IS NULL
       OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                      WHERE w.available_at > :now AND w.available_at > w.created_at)
       OR NOT EXISTS (SELECT 1 FROM outbox_events AS w
                      WHERE w.key = e.key AND w.seq < e.seq
                        AND w.available_at > w.created_at AND w.available_at > :now))
ORDER BY e.seq
LIMIT :limit
"""

DELETE_EVENT = "DELETE FROM outbox_events WHERE seq = :seq"

SCHEDULE_RETRY = """
UPDATE outbox_events
SET attempts = attempts + 1,
    available_at = :available_at,
    first_failed_at = coalesce(first_failed_at, :now),
    last_error = :error
WHERE seq = :seq
"""

#: Step 1 of a move (step 2 deletes what was copied, in the same transaction). The max() keeps
#: the table's CHECK first_failed_at <= last_failed_at true even if the clock stepped back.
#: A parked event (:held_behind set) moves only while its key is still held, and made no
#: attempt (as in Postgres's `move_to_dead_letters`).
COPY_TO_DEAD_LETTERS = """
INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, event_type,
                                 created_at, attempts, first_failed_at, last_failed_at,
                                 error_class, error_message, relay_id, holds_key, held_behind)
SELECT id, seq, topic, key, payload, headers, event_type, created_at,
       attempts + (:held_behind IS NULL),
       coalesce(first_failed_at, :now), max(:now, coalesce(first_failed_at, :now)),
       :error_class, :error_message, :relay_id, :holds_key, :held_behind
FROM outbox_events AS e
WHERE seq = :seq
  AND (:held_behind IS NULL
       OR EXISTS (SELECT 1 FROM outbox_dead_letters AS q WHERE q.key = e.key AND q.holds_key))
"""


BACKLOG = """
SELECT count(*), (SELECT created_at FROM outbox_events ORDER BY seq LIMIT 1) FROM outbox_events
"""

TABLES_PRESENT = """
SELECT count(*) FROM sqlite_master
WHERE type = 'table' AND name IN ('outbox_events', 'outbox_dead_letters')
"""

ENABLE_WAL = "PRAGMA journal_mode = WAL"

# ----------------------------------------------------------------------------------------------

#: Primary result codes that mean "busy or unreachable now", not "this statement is wrong".
TRANSIENT_CODES = frozenset(
    {
        5,  # SQLITE_BUSY
        6,  # SQLITE_LOCKED
        10,  # SQLITE_IOERR
        13,  # SQLITE_FULL
        14,  # SQLITE_CANTOPEN
    }
)


def is_transient(exc: sqlite3.Error) -> bool:
    return exc.sqlite_errorcode & 0xFF in TRANSIENT_CODES


def utc_now() -> datetime:
    return datetime.now(UTC)


def db_time(moment: datetime) -> str:
    """`moment` as the naive UTC text SQLAlchemy writes to SQLite; naive input is taken as UTC."""
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC).replace(tzinfo=None)
    return moment.isoformat(" ", "microseconds")


def parse_db_time(text: str) -> datetime:
    """Naive UTC text (with or without microseconds) → an aware UTC datetime."""
    moment = datetime.fromisoformat(text)
    if moment.tzinfo is None:
        return moment.replace(tzinfo=UTC)
    return moment.astimezone(UTC)


def database_path(database_url: str) -> Path:
    """The file of `sqlite:///path.db` or `sqlite+aiosqlite:///path.db` (four slashes: absolute)."""
    if not is_sqlite(database_url):
        raise ValueError(f"database_url: {redact(database_url)!r} is not a sqlite:// URL")
    database = make_url(database_url).database
    if not database or database == ":memory:" or database.startswith("file:"):
        raise ValueError(
            f"database_url: {database_url!r} must name a database file (an in-memory database "
            "is not shared with the application's connections)"
        )
    return Path(database)


async def create_schema(database_url: str) -> None:
    """Create the outbox tables in a SQLite file (created if missing) and switch it to WAL.

    SQLite has no Alembic migrations; `outbox-relay migrate` is for PostgreSQL, the production
    database. Tables that already exist are left alone.
    """
    database_path(database_url)  # rejects non-file URLs before anything is created
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    try:
        async with engine.connect() as conn:
            # WAL is persistent: the application's connections get it too.
            await conn.exec_driver_sql(ENABLE_WAL)
            await conn.run_sync(metadata.create_all)
            await conn.commit()
    finally:
        await engine.dispose()


class SqliteStore:
    """`Store` on one SQLite file for a single relay: no leases, it owns every bucket."""

    def __init__(
        self,
        database_url: str,
        *,
        clock: Callable[[], datetime] = utc_now,
        busy_timeout: float = 5.0,
        max_batch_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self.path = database_path(database_url)
        self._clock = clock
        self._busy_timeout_ms = int(busy_timeout * 1000)
        #: A claim's payload budget (the first event always goes).
        self.max_batch_bytes = max_batch_bytes
        self._conn: aiosqlite.Connection | None = None
        self._lock = asyncio.Lock()  # one statement sequence (transaction) at a time
        self._relay_id = ""

    @property
    def conn(self) -> aiosqlite.Connection:
        if self._conn is None:
            raise RuntimeError("SqliteStore.start() was not called")
        return self._conn

    async def start(self, relay_id: str) -> None:
        self._relay_id = relay_id
        if self._conn is not None:  # already started (a retry, or an embedding that did it)
            return
        if not self.path.is_file():
            # Opening would silently create an empty database.
            raise FileNotFoundError(
                f"{self.path}: no such SQLite database (create it with "
                "outbox.relay.stores.sqlite.create_schema)"
            )
        try:
            # mode=rw: never create the file; isolation_level=None: we issue BEGIN ourselves.
            conn = await aiosqlite.connect(
                self.path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None
            )
        except sqlite3.Error as exc:
            raise StoreUnavailableError(f"{self.path}: {exc}") from exc
        try:
            await conn.execute(f"PRAGMA busy_timeout = {self._busy_timeout_ms}")
            await conn.execute(ENABLE_WAL)  # a no-op when create_schema() already did it
            ((tables,),) = await conn.execute_fetchall(TABLES_PRESENT)
        except BaseException as exc:
            await conn.close()  # its worker thread would otherwise keep the process alive
            if isinstance(exc, sqlite3.OperationalError) and is_transient(exc):
                raise StoreUnavailableError(f"{self.path}: {exc}") from exc
            raise
        if tables != 2:
            await conn.close()
            raise RuntimeError(
                f"{self.path}: the outbox tables are missing (create them with "
                "outbox.relay.stores.sqlite.create_schema)"
            )
        self._conn = conn

    async def stop(self) -> None:
        """Close the connection. There are no leases to release."""
        if self._conn is not None:
            conn, self._conn = self._conn, None
            await conn.close()

    @contextlib.asynccontextmanager
    async def _guard(self) -> AsyncIterator[aiosqlite.Connection]:
        """The connection, one user at a time; busy or I/O errors become StoreUnavailableError."""
        async with self._lock:
            try:
                yield self.conn
            except sqlite3.OperationalError as exc:
                if is_transient(exc):
                    raise StoreUnavailableError(f"{self.path}: {exc}") from exc
                raise

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[aiosqlite.Connection]:
        """BEGIN IMMEDIATE (take the write lock up front, so no upgrade deadlock) ... COMMIT."""
        async with self._guard() as conn:
            await conn.execute("BEGIN IMMEDIATE")
            try:
                yield conn
            except BaseException:
                if conn.in_transaction:  # SQLite may have rolled back already (e.g. disk full)
                    await conn.execute("ROLLBACK")
                raise
            await conn.execute("COMMIT")

    def horizon(self) -> int:
        """No claim floor here: 0 (relay/floor.py is for Postgres's undeletable dead rows)."""
        return 0

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        # `after` is always 0 (horizon() is 0): no floor to apply.
        # Fetch enough to make up for the in-flight rows, then leave those out here.
        params = {"now": db_time(self._clock()), "limit": limit + len(exclude)}
        async with self._guard() as conn:
            rows = await conn.execute_fetchall(CLAIM_BATCH, params)
        skip = set(exclude)
        rows = [row for row in rows if row[0] not in skip][:limit]
        full = len(rows) == limit
        budget = self.max_batch_bytes
        for i, row in enumerate(rows):  # the byte budget, as Postgres's claim_batch
            budget -= len(row[4])
            if budget <= 0:
                full, rows = True, rows[: i + 1]
                break
        claim = Claim(
            [
                Envelope(
                    seq=row[0],
                    id=uuid.UUID(row[1]),
                    topic=row[2],
                    key=row[3],
                    payload=row[4].encode(),  # the JSON text as written, UTF-8
                    headers=json.loads(row[5]) if row[5] != "{}" else {},
                    event_type=row[6],
                    created_at=parse_db_time(row[7]),
                    attempts=row[8],
                )
                for row in rows
                if row[9] is None
            ]
        )
        if len(claim.events) < len(rows):
            claim.parked = [park(r[0], r[3], uuid.UUID(r[9])) for r in rows if r[9] is not None]
        claim.full = full
        return claim

    async def mark_delivered(self, seqs: Sequence[int]) -> int:
        async with self._transaction() as conn:
            cursor = await conn.executemany(DELETE_EVENT, [{"seq": seq} for seq in seqs])
            return cursor.rowcount

    async def schedule_retries(self, retries: Sequence[Retry]) -> int:
        now = self._clock()
        params = [
            {
                "seq": r.seq,
                "now": db_time(now),
                "available_at": db_time(now + timedelta(seconds=r.delay_seconds)),
                "error": r.error,
            }
            for r in retries
        ]
        async with self._transaction() as conn:
            cursor = await conn.executemany(SCHEDULE_RETRY, params)
            return cursor.rowcount

    async def move_to_dead_letters(self, dead: Sequence[Dead]) -> int:
        now = db_time(self._clock())
        params = [
            {
                "seq": d.seq,
                "now": now,
                "error_class": d.error_class,
                "error_message": d.error_message,
                "relay_id": self._relay_id,
                "holds_key": d.holds_key,
                "held_behind": d.held_behind.hex if d.held_behind else None,
            }
            for d in dead
        ]
        async with self._transaction() as conn:
            moved = 0
            for param in params:
                cursor = await conn.execute(COPY_TO_DEAD_LETTERS, param)
                if cursor.rowcount == 1:
                    await conn.execute(DELETE_EVENT, {"seq": param["seq"]})
                    moved += 1
            return moved

    async def maintain_leases(self, *, rebalance: bool) -> int:
        """A single relay owns every bucket; nothing to renew."""
        return BUCKETS

    def on_new_events(self, wake: Callable[[], None]) -> None:
        """SQLite has no NOTIFY: the relay finds new events by polling."""

    async def backlog(self) -> Backlog:
        async with self._guard() as conn:
            rows = list(await conn.execute_fetchall(BACKLOG))
        pending, oldest = rows[0]
        age = None if oldest is None else (self._clock() - parse_db_time(oldest)).total_seconds()
        return Backlog(pending, age)
