"""The SQLite store: one relay on one SQLite file (the embedded mode), for small
single-process applications, demos, development and fast tests.

PostgreSQL is for production at scale (several relays sharing key buckets through leases,
LISTEN/NOTIFY). SQLite gets its tables from the same Alembic migrations (`outbox-relay migrate
--database-url sqlite:///app.db`). The hot path uses a raw `aiosqlite` connection, not
SQLAlchemy; its SQL is in relay/queries_sqlite.sql, under the names of relay/queries.sql.

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
import re
import sqlite3
import uuid
from collections.abc import AsyncIterator, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path

import aiosqlite
from sqlalchemy.engine import make_url

from outbox.envelope import Envelope
from outbox.relay.seams import (
    Backlog,
    Claim,
    Dead,
    Position,
    Retry,
    StoreUnavailableError,
    park,
)
from outbox.relay.sql import SQLITE_QUERIES
from outbox.urls import is_sqlite, redact
from outbox.validation import BUCKETS

#: The named statements of relay/queries_sqlite.sql. Named parameters (:now, ...) are bound by
#: sqlite3; times are naive UTC text (see above).
SQL = SQLITE_QUERIES

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


def migrate_hint(path: Path) -> str:
    return f"run `outbox-relay migrate --database-url sqlite:///{path}`"


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
                f"{self.path}: no such SQLite database ({migrate_hint(self.path)})"
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
            await conn.execute(SQL["sqlite_enable_wal"])  # a no-op when migrate did it
            ((tables,),) = await conn.execute_fetchall(SQL["sqlite_tables"])
        except BaseException as exc:
            await conn.close()  # its worker thread would otherwise keep the process alive
            if isinstance(exc, sqlite3.OperationalError) and is_transient(exc):
                raise StoreUnavailableError(f"{self.path}: {exc}") from exc
            raise
        if tables != 2:
            await conn.close()
            raise RuntimeError(
                f"{self.path}: the outbox tables are missing ({migrate_hint(self.path)})"
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
            rows = await conn.execute_fetchall(SQL["claim_batch"], params)
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

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        # No history on SQLite (the settings refuse `history = on`): positions go unused.
        async with self._transaction() as conn:
            cursor = await conn.executemany(SQL["delete_delivered"], [{"seq": seq} for seq in seqs])
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
            cursor = await conn.executemany(SQL["schedule_retries"], params)
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
                cursor = await conn.execute(SQL["move_to_dead_letters"], param)
                if cursor.rowcount == 1:  # copied: step 2 deletes it
                    await conn.execute(SQL["delete_delivered"], {"seq": param["seq"]})
                    moved += 1
            return moved

    async def maintain_leases(self, *, rebalance: bool) -> int:
        """A single relay owns every bucket; nothing to renew."""
        return BUCKETS

    def on_new_events(self, wake: Callable[[], None]) -> None:
        """SQLite has no NOTIFY: the relay finds new events by polling."""

    async def backlog(self) -> Backlog:
        async with self._guard() as conn:
            rows = list(await conn.execute_fetchall(SQL["backlog"]))
        pending, oldest = rows[0]
        age = None if oldest is None else (self._clock() - parse_db_time(oldest)).total_seconds()
        return Backlog(pending, age)


#: `?N`: the Nth parameter of a statement (standing for Postgres's `$N`).
PARAMETER = re.compile(r"\?(\d+)")
#: Between the statements of a block of several.
STATEMENT_END = re.compile(r";\s*\n")


def _bind(value: object) -> object:
    """A parameter as SQLAlchemy stores it in SQLite; a list as a JSON array (for json_each)."""
    if isinstance(value, uuid.UUID):
        return value.hex
    if isinstance(value, datetime):
        return db_time(value)
    if isinstance(value, list):
        return json.dumps([_bind(item) for item in value])
    return value


class SqliteConnection:
    """What `relay/admin.py` asks of an asyncpg connection (`fetch`, `fetchrow`,
    `transaction`), on a SQLite file: the statements of queries_sqlite.sql, whose `?N` are
    bound as asyncpg binds `$N`, and rows as dicts of the Python types asyncpg returns (UUID,
    aware datetime, bool), told by column name. A block of several statements runs them in
    order in one transaction and returns the first one's rows."""

    dialect = "sqlite"
    UUIDS = frozenset({"event_id", "held_behind", "head"})
    TIMES = frozenset({"created_at", "first_failed_at", "last_failed_at", "oldest", "newest"})
    BOOLS = frozenset({"holds_key"})

    def __init__(self, conn: aiosqlite.Connection) -> None:
        self._conn = conn

    @classmethod
    @contextlib.asynccontextmanager
    async def open(
        cls, database_url: str, *, busy_timeout: float = 5.0
    ) -> AsyncIterator[SqliteConnection]:
        path = database_path(database_url)
        if not path.is_file():  # opening would create an empty database
            raise FileNotFoundError(f"{path}: no such SQLite database ({migrate_hint(path)})")
        conn = await aiosqlite.connect(
            path.absolute().as_uri() + "?mode=rw", uri=True, isolation_level=None
        )
        try:
            await conn.execute(f"PRAGMA busy_timeout = {int(busy_timeout * 1000)}")
            yield cls(conn)
        finally:
            await conn.close()

    @contextlib.asynccontextmanager
    async def transaction(self) -> AsyncIterator[None]:
        """BEGIN IMMEDIATE (the write lock up front, as SqliteStore) ... COMMIT."""
        await self._conn.execute("BEGIN IMMEDIATE")
        try:
            yield
        except BaseException:
            if self._conn.in_transaction:
                await self._conn.execute("ROLLBACK")
            raise
        await self._conn.execute("COMMIT")

    async def fetch(self, query: str, *args: object) -> list[dict[str, object]]:
        statements = STATEMENT_END.split(query)
        if len(statements) > 1 and not self._conn.in_transaction:
            async with self.transaction():
                return await self._run(statements, args)
        return await self._run(statements, args)

    async def fetchrow(self, query: str, *args: object) -> dict[str, object] | None:
        rows = await self.fetch(query, *args)
        return rows[0] if rows else None

    async def _run(
        self, statements: Sequence[str], args: Sequence[object]
    ) -> list[dict[str, object]]:
        params = [_bind(arg) for arg in args]
        result: list[dict[str, object]] | None = None
        for statement in statements:
            count = max((int(n) for n in PARAMETER.findall(statement)), default=0)
            async with self._conn.execute(statement, params[:count]) as cursor:
                rows = await cursor.fetchall()
                names = [column[0] for column in cursor.description or ()]
            if result is None:
                result = [self._row(names, row) for row in rows]
        return result or []

    def _row(self, names: Sequence[str], values: Sequence[object]) -> dict[str, object]:
        row: dict[str, object] = {}
        for name, value in zip(names, values, strict=True):
            if value is not None and name in self.UUIDS:
                value = uuid.UUID(str(value))
            elif value is not None and name in self.TIMES:
                value = parse_db_time(str(value))
            elif name in self.BOOLS:
                value = bool(value)
            row[name] = value
        return row
