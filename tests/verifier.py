"""The chaos suite's independent verifier: writers that remember what they committed, a
consumer's view of the broker, and the checks. It judges from what the writers know, what the
broker holds and what the database holds; it does not use the relay's code.

Writers insert with plain asyncpg (the documented raw-SQL path: Postgres computes the
bucket). Each writer owns its keys, so per key the commit order is the order of the
per-key numbers `n` in the payloads. A transaction's outcome is one of:

- committed: COMMIT returned;
- rolled back: rolled back on purpose, or an INSERT failed (nothing was committed);
- unknown: the connection broke during COMMIT. It must arrive whole or not at all.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import redis.asyncio as aioredis

from outbox.urls import asyncpg_dsn

#: The errors of a connection that broke (a database restart, a terminated backend).
DB_ERRORS = (
    OSError,
    TimeoutError,
    asyncpg.PostgresError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
)

INSERT = (
    "INSERT INTO outbox_events (id, topic, key, payload, headers, event_type)"
    " VALUES ($1, $2, $3, $4::jsonb, '{}'::jsonb, 'Chaos')"
)

#: What a writer knows of one event: its key and its per-key number.
Written = tuple[str, int]


@dataclass
class Ledger:
    """Everything the writers did, shared by all of them."""

    committed: dict[uuid.UUID, Written] = field(default_factory=dict)
    rolled_back: set[uuid.UUID] = field(default_factory=set)
    unknown: list[dict[uuid.UUID, Written]] = field(default_factory=list)
    transactions: Counter[str] = field(default_factory=Counter)
    reconnects: int = 0

    @property
    def events(self) -> int:
        return len(self.committed)


class Writer:
    """Commits transactions of `per_txn` events over its own keys until stopped; retries
    through outages (reconnecting with a short pause)."""

    def __init__(
        self,
        database_url: str,
        topic: str,
        keys: Sequence[str],
        ledger: Ledger,
        *,
        seed: int,
        per_txn: tuple[int, int] = (2, 6),
        rollback_ratio: float = 0.1,
        pause: float = 0.02,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._topic = topic
        self._keys = list(keys)
        self._ledger = ledger
        self._rand = random.Random(seed)
        self.per_txn = per_txn
        self._rollback_ratio = rollback_ratio
        self.pause = pause
        self._next: dict[str, int] = dict.fromkeys(self._keys, 1)
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self, limit: int | None = None) -> None:
        """Write until stop() (or until `limit` transactions were attempted)."""
        conn: asyncpg.Connection | None = None
        attempted = 0
        try:
            while not self._stop.is_set() and (limit is None or attempted < limit):
                if conn is None or conn.is_closed():
                    try:
                        conn = await asyncio.wait_for(asyncpg.connect(self._dsn), 5)
                    except DB_ERRORS:
                        self._ledger.reconnects += 1
                        await asyncio.sleep(0.2)
                        continue
                attempted += 1
                await self._one(conn)
                if self.pause:
                    await asyncio.sleep(self.pause * (0.5 + self._rand.random()))
        finally:
            if conn is not None:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)

    async def _one(self, conn: asyncpg.Connection) -> None:
        batch: dict[uuid.UUID, Written] = {}
        for _ in range(self._rand.randint(*self.per_txn)):
            key = self._rand.choice(self._keys)
            n = self._next[key]
            self._next[key] = n + 1  # numbers are used up whatever happens: gaps are fine
            batch[uuid.uuid4()] = (key, n)
        rollback = self._rand.random() < self._rollback_ratio
        tx = conn.transaction()
        try:
            await tx.start()
            for event_id, (key, n) in batch.items():
                payload = json.dumps({"k": key, "n": n})
                await conn.execute(INSERT, event_id, self._topic, key, payload)
        except DB_ERRORS:
            # Nothing was committed: the transaction never reached COMMIT.
            self._ledger.rolled_back.update(batch)
            self._ledger.transactions["failed"] += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            return
        if rollback:
            try:
                await tx.rollback()
            finally:
                self._ledger.rolled_back.update(batch)
                self._ledger.transactions["rolled_back"] += 1
            return
        try:
            await tx.commit()
        except DB_ERRORS:
            self._ledger.unknown.append(batch)
            self._ledger.transactions["unknown"] += 1
            with contextlib.suppress(Exception):
                await asyncio.wait_for(conn.close(), 2)
            return
        self._ledger.committed.update(batch)
        self._ledger.transactions["committed"] += 1


def writers(
    database_url: str,
    topic: str,
    ledger: Ledger,
    *,
    count: int = 4,
    keys: int = 100,
    pause: float = 0.02,
    per_txn: tuple[int, int] = (2, 6),
) -> list[Writer]:
    """`count` writers sharing `keys` keys (each key has one writer)."""
    names = [f"key-{k}" for k in range(keys)]
    return [
        Writer(database_url, topic, names[w::count], ledger, seed=w, pause=pause, per_txn=per_txn)
        for w in range(count)
    ]


# -- the consumer's view --------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Arrival:
    """One record as a consumer sees it."""

    id: uuid.UUID
    key: str | None
    payload: object


async def read_redis_stream(redis_url: str, stream: str) -> list[Arrival]:
    """Every entry of a stream, in stream order, duplicates included (XRANGE)."""
    client = aioredis.Redis.from_url(redis_url)
    out: list[Arrival] = []
    start = "-"
    try:
        while True:
            entries: list[tuple[bytes, dict[bytes, bytes]]]
            entries = await client.xrange(stream, min=start, count=5000)  # type: ignore[assignment]
            for _, fields in entries:
                key = fields.get(b"outbox-key")  # the plain envelope's fields
                out.append(
                    Arrival(
                        uuid.UUID(fields[b"outbox-id"].decode()),
                        key.decode() if key is not None else None,
                        json.loads(fields[b"outbox-payload"]),
                    )
                )
            if len(entries) < 5000:
                return out
            start = "(" + entries[-1][0].decode()
    finally:
        await client.aclose()


async def stream_length(redis_url: str, stream: str) -> int:
    client = aioredis.Redis.from_url(redis_url)
    try:
        return int(await client.xlen(stream))
    finally:
        await client.aclose()


# -- the checks -----------------------------------------------------------------------------


@dataclass
class Report:
    name: str
    events: int  # committed events
    received: int  # records read, duplicates included
    duplicates: int
    duplicate_bound: int
    rolled_back: int
    unknown_transactions: int
    unknown_arrived: int
    dead_letters: int
    faults: int
    recovery_seconds: list[float]
    seconds: float

    def print(self) -> None:
        worst = max(self.recovery_seconds, default=0.0)
        print(
            f"\n[chaos] {self.name}: {self.events} events committed "
            f"({self.rolled_back} rolled back, {self.unknown_transactions} unknown-outcome "
            f"transactions, {self.unknown_arrived} of them arrived), {self.received} records "
            f"received, {self.duplicates} duplicates (bound {self.duplicate_bound}), "
            f"{self.dead_letters} dead letters, {self.faults} faults, max recovery "
            f"{worst:.2f} s (all: {', '.join(f'{s:.2f}' for s in self.recovery_seconds)}), "
            f"{self.seconds:.1f} s"
        )


def check(
    name: str,
    ledger: Ledger,
    arrivals: Sequence[Arrival],
    *,
    duplicate_bound: int,
    dead_letter_ids: Iterable[uuid.UUID] = (),
    expected_dead: Iterable[uuid.UUID] = (),
    outbox_left: int = 0,
    faults: int = 0,
    recovery_seconds: Sequence[float] = (),
    started: float | None = None,
    extra: dict[uuid.UUID, Written] | None = None,
) -> Report:
    """Assert the guarantees; return the figures. `extra`: committed events written outside
    the writers (raw SQL rows that must arrive in their key's order)."""
    committed = dict(ledger.committed) | (extra or {})
    expected_dead = set(expected_dead)
    arrived = Counter(a.id for a in arrivals)
    unknown_ids = {i for txn in ledger.unknown for i in txn}
    # 1. Nothing committed was lost (except the dead letters the scenario expects).
    missing = set(committed) - set(arrived) - expected_dead
    assert not missing, f"{len(missing)} committed events never arrived: {sorted(missing)[:5]}"
    # 2. Nothing rolled back arrived, nothing arrived that nobody wrote.
    ghosts = set(arrived) & ledger.rolled_back
    assert not ghosts, f"{len(ghosts)} rolled-back events arrived: {sorted(ghosts)[:5]}"
    strangers = set(arrived) - set(committed) - unknown_ids
    assert not strangers, f"{len(strangers)} events arrived that nobody committed"
    wrongly_sent = set(arrived) & expected_dead
    assert not wrongly_sent, f"expected dead letters were published: {wrongly_sent}"
    # 3. A transaction of unknown outcome arrived whole or not at all.
    unknown_arrived = 0
    for txn in ledger.unknown:
        got = [i in arrived for i in txn]
        assert all(got) or not any(got), f"a transaction arrived in part: {got}"
        unknown_arrived += all(got)
        if all(got):
            committed |= txn
    # 4. Per key, first arrivals are in commit order.
    last: dict[str, int] = {}
    seen: set[uuid.UUID] = set()
    for arrival in arrivals:
        if arrival.id in seen:
            continue
        seen.add(arrival.id)
        key, n = committed[arrival.id]
        assert arrival.key == key, f"{arrival.id}: key {arrival.key!r}, written as {key!r}"
        assert n > last.get(key, 0), f"key {key}: first arrival of {n} after {last[key]}"
        last[key] = n
    # 5. Duplicates are bounded.
    duplicates = len(arrivals) - len(arrived)
    assert duplicates <= duplicate_bound, f"{duplicates} duplicates > bound {duplicate_bound}"
    # 6. The outbox holds only what the scenario expects; the dead letters are exactly those.
    dead = set(dead_letter_ids)
    assert dead == expected_dead, (
        f"dead letters: {len(dead - expected_dead)} unexpected, "
        f"{len(expected_dead - dead)} expected ones missing"
    )
    assert outbox_left == 0, f"{outbox_left} events still in the outbox"
    return Report(
        name=name,
        events=len(ledger.committed) + len(extra or {}),
        received=len(arrivals),
        duplicates=duplicates,
        duplicate_bound=duplicate_bound,
        rolled_back=len(ledger.rolled_back),
        unknown_transactions=len(ledger.unknown),
        unknown_arrived=unknown_arrived,
        dead_letters=len(dead),
        faults=faults,
        recovery_seconds=list(recovery_seconds),
        seconds=time.monotonic() - started if started is not None else 0.0,
    )


# -- COMMITs with an unknown outcome -------------------------------------------------------------

#: asyncpg's COMMIT on the wire: a simple Query message ('Q', int32 length, text, NUL).
COMMIT_MESSAGE = b"Q\x00\x00\x00\x0cCOMMIT;\x00"


class CommitCutter:
    """A TCP proxy in front of Postgres that breaks the connection of every `every`-th COMMIT,
    alternately after handing the COMMIT to Postgres (it commits; the writer never hears) and
    instead of handing it over (Postgres rolls back). Either way the writer sees its
    connection break during COMMIT: an outcome it cannot know. Plain TCP only: connect
    through `url()` (sslmode=disable)."""

    def __init__(self, database_url: str, every: int = 10) -> None:
        self._upstream = urlsplit(database_url)
        self._every = every
        self._commits = 0
        self.cut_after = 0  # COMMITs handed over, then the connection cut
        self.cut_before = 0  # COMMITs dropped, then the connection cut
        self._server: asyncio.Server | None = None

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)

    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        netloc = self._upstream.netloc.rsplit("@", 1)[0] + f"@127.0.0.1:{port}"
        return urlunsplit(self._upstream._replace(netloc=netloc, query="sslmode=disable"))

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def _serve(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        host, port = self._upstream.hostname or "127.0.0.1", self._upstream.port or 5432
        try:
            server_r, server_w = await asyncio.open_connection(host, port)
        except OSError:
            client_w.close()
            return
        muted = asyncio.Event()  # set: Postgres's replies no longer reach the writer
        up = asyncio.create_task(self._pump(client_r, server_w, muted, watch=True))
        down = asyncio.create_task(self._pump(server_r, client_w, muted, watch=False))
        await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
        for task in (up, down):
            task.cancel()
        for writer in (client_w, server_w):
            writer.close()

    async def _pump(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        muted: asyncio.Event,
        *,
        watch: bool,
    ) -> None:
        while chunk := await reader.read(65536):
            if muted.is_set():
                continue  # swallowed: the writer never hears
            if watch and COMMIT_MESSAGE in chunk:
                self._commits += 1
                if self._commits % self._every == 0:
                    muted.set()
                    if (self._commits // self._every) % 2:
                        self.cut_after += 1
                        writer.write(chunk)
                        await writer.drain()
                        await asyncio.sleep(0.05)  # Postgres reads and runs the COMMIT
                    else:
                        self.cut_before += 1
                    return
            writer.write(chunk)
            await writer.drain()
