"""The production store: PostgreSQL through asyncpg. SQL comes from relay/queries.sql only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import socket
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import asyncpg

from outbox.envelope import Envelope
from outbox.relay.floor import Horizon
from outbox.relay.logs import relay_logger
from outbox.relay.seams import (
    Backlog,
    Claim,
    Dead,
    Position,
    Retry,
    StoreUnavailableError,
    park,
)
from outbox.relay.sql import QUERIES
from outbox.urls import asyncpg_dsn, redact
from outbox.validation import BUCKETS

log = relay_logger("relay.store")

NOTIFY_CHANNEL = "outbox_events"
#: The newest migration (migrations/versions/), which this relay's statements were written for.
SCHEMA_HEAD = "0009"
MIGRATE_HINT = "run `outbox-relay migrate`"
#: Errors that mean "the database cannot serve us now", not "this statement is wrong": the loop
#: backs off and tries again. Connections dropped, refused or closed mid-query (asyncpg then
#: sometimes raises InternalClientError "cannot switch to state", a known asyncpg issue), a
#: statement timeout or a cancel, a shutdown, the connection limit, out of memory or disk,
#: a deadlock or serialization failure, a lock timeout, a server that refuses writes (below).
CONNECTION_ERRORS: tuple[type[BaseException], ...] = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.InternalClientError,
    asyncpg.exceptions.OperatorInterventionError,
    asyncpg.exceptions.InsufficientResourcesError,
    asyncpg.exceptions.TransactionRollbackError,
    asyncpg.exceptions.LockNotAvailableError,
    asyncpg.exceptions.ReadOnlySQLTransactionError,
)


#: A new store claims at most this many rows, then doubles while claims fit the byte budget.
ROW_CAP_START = 32
ROW_CAP_MAX = 1 << 20

#: Planner settings of the relay's sessions. Every statement of the relay is built to walk an
#: index (the claim: the primary key in seq order, with probes into small partial indexes),
#: and its cost must not depend on the statistics of the moment. Left alone, the planner
#: switched the claim to a sequential scan and a sort of the whole table after an ANALYZE
#: that saw a few waiting rows (281 ms a claim instead of ~1 ms), or walked the whole index
#: of waiting rows to answer "is any row waiting?". So the relay forbids both plan shapes.
PLANNER_SETTINGS = {
    "enable_seqscan": "off",
    "enable_sort": "off",
    # The claim's cost estimate can cross jit_above_cost on a churning table, and JIT
    # compiling then takes ~200 ms (p99 stalls) for a ~1 ms statement.
    "jit": "off",
}


#: The relay's own commits (deletes, moves to the history and to dead letters, retries,
#: leases) do not wait for the WAL flush. A Postgres crash can undo the last of them (at most
#: 3 x wal_writer_delay, 0.6 s by default): those events are back in the outbox and go out
#: again, as after a relay killed between the broker's ack and its delete (at least once).
#: None is lost: the events are written by the applications' transactions, with their own
#: settings. Every relay statement checks its lease in SQL, so an undone lease is harmless.
COMMIT_SETTINGS = {"synchronous_commit": "off"}


async def _binary_jsonb(conn: asyncpg.Connection) -> None:
    """jsonb columns arrive as the raw UTF-8 JSON bytes the brokers take: no decode, no copy."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=lambda value: b"\x01" + value,  # version byte 1, then the JSON text
        decoder=lambda data: data[1:],
    )


#: Retention: rows per prune statement, and the pause between two statements, at least this
#: and at least PRUNE_PACING times the last statement's time (so pruning takes at most a
#: tenth of one connection, and every statement commits at once: row locks only, briefly).
#: A fifth (0.05 s, 4x) slowed a Redis drain with history on to 0.82x on two cores; a
#: tenth still prunes ~9,000 rows a second.
PRUNE_BATCH = 1000
PRUNE_PAUSE = 0.1
PRUNE_PACING = 9.0
#: A prune statement slower than this halves the batch (down to PRUNE_BATCH_MIN rows); one
#: four times faster doubles it again, up to `prune_batch`: a statement, and so its row locks,
#: stays well below 100 ms when the database is slow (a checkpoint, a cold cache).
PRUNE_SLOW = 0.04
PRUNE_BATCH_MIN = 50
#: The prune connection gives up on a lock after this (DDL holding the table), and on a
#: statement after 10 s; the round ends, and the next one tries again. Its commits do not
#: wait for the WAL flush: a prune lost in a crash only comes back to be pruned again, and
#: a statement's row locks then never wait on a slow disk (a checkpoint's fsyncs held one for
#: 535 ms in a bench run); nor does it queue its flushes with the relay's own commits.
PRUNE_SETTINGS = {
    "lock_timeout": "100ms",
    "statement_timeout": "10s",
    "synchronous_commit": "off",
}


@dataclass(slots=True)
class Pruned:
    """One prune round of one table."""

    table: str
    rows: int = 0
    statements: int = 0
    #: The longest statement, in seconds, as the server timed it: how long it held its row
    #: locks (until the commit right after, which does not wait for the disk); and how many
    #: took longer than 100 ms.
    longest: float = 0.0
    slow: int = 0
    #: The longest round trip, as the relay timed it (its event loop's delays included).
    longest_round_trip: float = 0.0


def _count(status: str) -> int:
    """Rows changed, from a command tag such as 'DELETE 12' or 'INSERT 0 3'."""
    return int(status.rsplit(" ", 1)[-1])


async def keep_session(conn: asyncpg.Connection) -> None:
    """The pool's reset on release: nothing beyond what asyncpg always does (an open
    transaction is rolled back). Its default, `SELECT pg_advisory_unlock_all(); CLOSE ALL;
    UNLISTEN *; RESET ALL`, was a second round trip after every claim and delete; the relay's
    pool connections hold no cursors, LISTENs, session settings or session locks to undo
    (LISTEN and the prune lock have connections of their own)."""


class PostgresStore:
    def __init__(
        self,
        database_url: str,
        *,
        lease_seconds: float = 15.0,
        database_timeout: float = 30.0,
        pool_size: int = 4,
        listen: bool = True,
        max_batch_bytes: int = 16 * 1024 * 1024,
        history: bool = False,
        history_retention: float | None = None,
        dead_letter_retention: float | None = None,
        prune_interval: float = 60.0,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._safe_url = redact(database_url)
        self.lease_seconds = lease_seconds
        #: A statement (or a connection attempt) with no answer after this many seconds is
        #: given up, and its connection with it: a connection that a firewall, NAT gateway or
        #: load balancer forgot drops every packet, and the kernel gives up on it only after
        #: about 15 minutes. The server's statement_timeout cannot help: it never hears of it.
        self.database_timeout = database_timeout
        self._pool_size = pool_size
        self._listen = listen
        #: A claim's payload budget (estimated from stored sizes, see `claim_batch`).
        self.max_batch_bytes = max_batch_bytes
        self._row_cap = ROW_CAP_START
        self._pool: asyncpg.Pool | None = None
        self._relay_id = ""
        self._wake: Callable[[], None] | None = None
        self._listener: asyncio.Task[None] | None = None
        #: The claim floor's horizon (relay/floor.py), sampled every `horizon_interval`.
        self._horizon = Horizon()
        self.horizon_interval = 0.5
        self._sampler: asyncio.Task[None] | None = None
        #: Delivered events go to outbox_delivered (`move_delivered`) instead of away.
        self.history = history
        #: Retention in seconds (None: keep): pruned every `prune_interval` seconds, jittered.
        self.retention = {"prune_history": history_retention}
        self.retention["prune_dead_letters"] = dead_letter_retention
        self.prune_interval = prune_interval
        self.prune_batch = PRUNE_BATCH
        #: Where each table's walk resumes (its primary key).
        self._prune_after = dict.fromkeys(self.retention, 0)
        #: Per table, every prune statement since start (prune() returns one round's).
        self.pruned: dict[str, Pruned] = {}
        self._pruner: asyncio.Task[None] | None = None

    @property
    def pool(self) -> asyncpg.Pool:
        if self._pool is None:
            raise RuntimeError("PostgresStore.start() was not called")
        return self._pool

    async def start(self, relay_id: str) -> None:
        self._relay_id = relay_id
        if self._pool is not None:  # a retry after maintain_leases failed: keep the pool
            return
        try:
            # Every connection opened now and kept: the first busy moment (claim, publish's
            # settle and prefetch at once) would otherwise wait for TLS and authentication.
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=self._pool_size,
                max_size=self._pool_size,
                max_inactive_connection_lifetime=0,
                command_timeout=self.database_timeout,
                timeout=self.database_timeout,
                init=self._init_connection,
                reset=keep_session,
                server_settings={
                    "application_name": f"outbox-relay {relay_id}"[:63],
                    **PLANNER_SETTINGS,
                    **COMMIT_SETTINGS,
                },
            )
        except CONNECTION_ERRORS as exc:
            raise StoreUnavailableError(f"{self._safe_url}: {exc}") from exc
        await self._check_schema()
        self._sampler = asyncio.create_task(self._sample_horizon(), name="outbox-horizon")
        if any(v is not None for v in self.retention.values()):
            self._pruner = asyncio.create_task(self._prune_forever(), name="outbox-prune")

    async def _check_schema(self) -> None:
        """Warn when the database is not at the revision this relay was built with: a package
        upgraded without `outbox-relay migrate` runs on (each part that needs a newer
        migration says so, as `claim_floor_off` does), but the operator should know."""
        try:
            revision = await self.pool.fetchval(QUERIES["schema_revision"])
        except (*CONNECTION_ERRORS, asyncpg.PostgresError):
            return  # not migrated at all, or no grant: the first statement that needs it says
        if revision is None or revision < SCHEMA_HEAD:  # revisions are 4 digits: "0009"
            log.warning("schema_behind", revision=revision, head=SCHEMA_HEAD, hint=MIGRATE_HINT)
        elif revision > SCHEMA_HEAD:  # a newer relay migrated it (a rolling upgrade)
            log.info("schema_ahead", revision=revision, head=SCHEMA_HEAD)

    async def stop(self) -> None:
        for task in (self._listener, self._sampler, self._pruner):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener = self._sampler = self._pruner = None
        if self._pool is None:
            return
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(QUERIES["release_all"], self._relay_id)
                await conn.execute(QUERIES["deregister"], self._relay_id)
        finally:
            await self.pool.close()
            self._pool = None

    async def _run(self, query: str, *args: Any) -> str:
        try:
            result: str = await self.pool.execute(QUERIES[query], *args)
        except CONNECTION_ERRORS as exc:
            raise await self._outage(exc) from exc
        return result

    async def _outage(self, exc: BaseException) -> StoreUnavailableError:
        """What a store call raises for one of CONNECTION_ERRORS. A server that refused a
        write (SQLSTATE 25006: a standby, as the old primary is after a failover, or a primary
        in read-only mode) refuses every write on these connections for as long as they live:
        they are replaced at their next use, which reaches the new primary (through DNS, a
        proxy or a multi-host URL) or this server once it accepts writes again."""
        if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError) and self._pool:
            await self._pool.expire_connections()
        return StoreUnavailableError(str(exc))

    def horizon(self) -> int:
        return self._horizon.safe

    async def _sample_horizon(self) -> None:
        """Feed `Horizon` (relay/floor.py): the last seq handed out, then who holds the write
        lock, in that order, every `horizon_interval` seconds."""
        while True:
            try:
                last_seq = await self.pool.fetchval(QUERIES["horizon_last_seq"])
                if last_seq is None:
                    log.warning("claim_floor_off", reason="outbox_events' seq sequence caches")
                    return
                writers = await self.pool.fetchval(QUERIES["horizon_writers"])
                self._horizon.observe(last_seq, writers)
            except asyncpg.UndefinedFunctionError:
                log.warning("claim_floor_off", reason="migration 0006 is missing")
                return
            except CONNECTION_ERRORS:
                self._horizon.reset()
            await asyncio.sleep(self.horizon_interval)

    async def _init_connection(self, conn: asyncpg.Connection) -> None:
        """Each pool connection, once: jsonb as bytes, and the claim and the delete prepared.
        A claim's first run on a connection took 7-8 ms (its preparation) against 0.3-0.7 ms
        after: in a latency run most of the slowest 1 % were these first runs, one per
        connection, in the first second. Preparing here makes the first run ~1 ms."""
        await _binary_jsonb(conn)
        settle = "move_delivered" if self.history else "delete_delivered"
        for name in ("claim_batch", settle):
            await conn.prepare(QUERIES[name])

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        try:
            capped = min(limit, self._row_cap)
            rows = await self.pool.fetch(
                QUERIES["claim_batch"],
                self._relay_id,
                capped,
                exclude,
                self.max_batch_bytes,
                after,
            )
        except CONNECTION_ERRORS as exc:
            raise await self._outage(exc) from exc
        # Positional, in the claim's column order: a sixth of the relay's CPU went here.
        claim = Claim(
            [
                Envelope(
                    r[0],
                    r[1],
                    r[2],
                    r[3],
                    r[4],
                    json.loads(r[5]) if r[5] != b"{}" else {},
                    r[6],
                    r[7],
                    r[8],
                )
                for r in rows
                if r[9] is None
            ]
        )
        if len(claim.events) < len(rows):
            claim.parked = [park(r[0], r[3], r[9]) for r in rows if r[9] is not None]
        claim.full = len(rows) == capped or bool(rows and rows[-1][10] >= self.max_batch_bytes)
        self._adapt_row_cap(rows, capped)
        return claim

    def _adapt_row_cap(self, rows: Sequence[Any], capped: int) -> None:
        """The claim's byte budget is estimated from stored sizes; a payload that compresses
        well (toasted) is much bigger in memory than on disk. So the claim also learns, from
        the bytes it really got, how many rows fit the budget: it starts small and shrinks at
        once when a claim did not fit. A full claim whose estimate was not short of the bytes
        received (no payload compressed better than the claim assumed) lifts the cap: the byte
        budget alone bounds the next one. Else the cap doubles (TCP's slow start). Doubling
        from 32 every time took nine claims to reach 10,000 rows: half of a 50k drain over
        1,000 topics went out in small claims (docs/benchmarks.md, "Many topics")."""
        got = sum(len(r[4]) for r in rows)
        if got > self.max_batch_bytes and len(rows) > 1:
            self._row_cap = max(1, len(rows) * self.max_batch_bytes // got)
        elif len(rows) == capped:
            estimated = rows[-1][10] if rows else 0
            grown = ROW_CAP_MAX if got <= estimated else self._row_cap * 2
            self._row_cap = min(grown, ROW_CAP_MAX)

    async def backlog(self) -> Backlog:
        try:
            row = await self.pool.fetchrow(QUERIES["backlog"])
        except CONNECTION_ERRORS as exc:
            raise await self._outage(exc) from exc
        assert row is not None
        return Backlog(
            row["pending"], row["oldest_age"], row["unowned_buckets"], row["oldest_snapshot_age"]
        )

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        if not self.history:
            return _count(await self._run("delete_delivered", self._relay_id, seqs))
        # A broker fills either the Kafka columns or the Redis one: the other goes as an empty
        # array, which the statement's unnest pads with NULLs.
        redis = any(p is not None and p.entry_id is not None for p in positions)
        none: list[None] = []
        return _count(
            await self._run(
                "move_delivered",
                self._relay_id,
                seqs,
                none if redis else [p.partition if p else None for p in positions],
                none if redis else [p.offset if p else None for p in positions],
                [p.entry_id if p else None for p in positions] if redis else none,
            )
        )

    # -- retention -----------------------------------------------------------------------------

    async def _prune_forever(self) -> None:
        """A prune round every `prune_interval` seconds (jittered, so relays started together
        do not try together); only the relay that gets the advisory lock prunes."""
        while True:
            await asyncio.sleep(self.prune_interval * (0.5 + random.random()))
            try:
                await self.prune()
            except (*CONNECTION_ERRORS, asyncpg.PostgresError) as exc:
                log.warning("prune_failed", error=str(exc))

    async def prune(self) -> list[Pruned] | None:
        """One retention round: delete, in batches of `prune_batch` (one short statement each,
        paced), the history and dead-letter rows older than their retention. On its own
        connection, holding the advisory lock `prune_lock`: None when another relay holds it
        (it prunes; one at a time)."""
        conn = await asyncpg.connect(
            self._dsn,
            timeout=self.database_timeout,
            command_timeout=self.database_timeout,
            server_settings={
                "application_name": f"outbox-relay prune {self._relay_id}"[:63],
                **PLANNER_SETTINGS,
                **PRUNE_SETTINGS,
            },
        )
        try:
            if not await conn.fetchval(QUERIES["prune_lock"]):
                return None
            done = []
            for query, retention in self.retention.items():
                if retention is not None:
                    done.append(await self._prune_table(conn, query, retention))
        finally:  # closing the connection releases the lock, also when cancelled
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.close(timeout=1))
        for pruned in done:
            if pruned.rows:
                log.info(
                    "pruned",
                    table=pruned.table,
                    rows=pruned.rows,
                    statements=pruned.statements,
                    longest_ms=round(pruned.longest * 1000, 1),
                    over_100ms=pruned.slow,
                    longest_round_trip_ms=round(pruned.longest_round_trip * 1000, 1),
                )
        return done

    async def _prune_table(self, conn: asyncpg.Connection, query: str, retention: float) -> Pruned:
        table = "outbox_delivered" if query == "prune_history" else "outbox_dead_letters"
        pruned, total = Pruned(table), self.pruned.setdefault(table, Pruned(table))
        batch = self.prune_batch
        while True:
            after = self._prune_after[query]
            started = time.perf_counter()
            row = await conn.fetchrow(QUERIES[query], retention, batch, after)
            round_trip = time.perf_counter() - started
            took = row["took"]
            for counts in (pruned, total):
                counts.statements += 1
                counts.longest = max(counts.longest, took)
                counts.longest_round_trip = max(counts.longest_round_trip, round_trip)
                counts.slow += took > 0.1
                counts.rows += row["deleted"]
            if row["young"] is not None:  # the rest is younger: resume before it next round
                self._prune_after[query] = row["young"] - 1
                return pruned
            if row["last"] is not None:
                self._prune_after[query] = row["last"]
            if row["walked"] < batch:  # the end of the table
                return pruned
            if took > PRUNE_SLOW:
                batch = max(PRUNE_BATCH_MIN, batch // 2)
            elif took < PRUNE_SLOW / 4:
                batch = min(self.prune_batch, batch * 2)
            await asyncio.sleep(max(PRUNE_PAUSE, took * PRUNE_PACING))

    async def schedule_retries(self, retries: Sequence[Retry]) -> int:
        return _count(
            await self._run(
                "schedule_retries",
                self._relay_id,
                [r.seq for r in retries],
                [r.delay_seconds for r in retries],
                [r.error for r in retries],
            )
        )

    async def move_to_dead_letters(self, dead: Sequence[Dead]) -> int:
        return _count(
            await self._run(
                "move_to_dead_letters",
                self._relay_id,
                [d.seq for d in dead],
                [d.error_class for d in dead],
                [d.error_message for d in dead],
                [d.holds_key for d in dead],
                [d.held_behind for d in dead],
            )
        )

    async def maintain_leases(self, *, rebalance: bool) -> int:
        try:
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(
                    QUERIES["heartbeat"], self._relay_id, socket.gethostname(), os.getpid()
                )
                owned = [
                    r["bucket"]
                    for r in await conn.fetch(
                        QUERIES["renew_leases"], self._relay_id, self.lease_seconds
                    )
                ]
                if not rebalance:
                    return len(owned)
                live = [
                    r["relay_id"]
                    for r in await conn.fetch(QUERIES["live_relays"], self.lease_seconds)
                ]
                index = live.index(self._relay_id) if self._relay_id in live else 0
                share, extra = divmod(BUCKETS, max(1, len(live)))
                target = share + (1 if index < extra else 0)
                if len(owned) > target:
                    give_back = sorted(owned)[target:]
                    await conn.execute(QUERIES["release_buckets"], self._relay_id, give_back)
                    owned = sorted(owned)[:target]
                    log.info("buckets_released", count=len(give_back), owned=len(owned))
                elif len(owned) < target:
                    got = await conn.fetch(
                        QUERIES["acquire_buckets"],
                        self._relay_id,
                        target - len(owned),
                        self.lease_seconds,
                    )
                    if got:
                        owned += [r["bucket"] for r in got]
                        log.info(
                            "buckets_acquired",
                            count=len(got),
                            owned=len(owned),
                            live_relays=len(live),
                        )
                await conn.execute(QUERIES["forget_dead_relays"])
                return len(owned)
        except CONNECTION_ERRORS as exc:
            raise await self._outage(exc) from exc

    def on_new_events(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        if self._listen and self._listener is None:
            self._listener = asyncio.create_task(self._listen_forever(), name="outbox-listen")

    async def _listen_forever(self) -> None:
        """A dedicated LISTEN connection, reconnected with backoff when it drops: at once when
        the server closes it (a terminated backend, a restart), else when a ping every 5 s
        fails (a silent network). Until then the relay's polling covers what it missed."""
        pause = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                # Named like the pool's connections, so pg_stat_activity tells it apart.
                name = f"outbox-relay listen {self._relay_id}"[:63]
                conn = await asyncpg.connect(
                    self._dsn,
                    timeout=self.database_timeout,
                    server_settings={"application_name": name},
                )
                closed = asyncio.Event()
                conn.add_termination_listener(lambda _, event=closed: event.set())
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                pause = 0.5
                if self._wake is not None:
                    self._wake()  # notifications may have been missed while disconnected
                while True:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(5.0):
                            await closed.wait()
                    if closed.is_set():
                        raise asyncpg.ConnectionDoesNotExistError("the server closed it")
                    async with asyncio.timeout(5.0):
                        await conn.execute("SELECT 1")
            except CONNECTION_ERRORS as exc:
                log.warning("listener_reconnecting", error=str(exc), retry_in=pause)
            finally:
                if conn is not None:
                    with contextlib.suppress(Exception):
                        await asyncio.shield(conn.close(timeout=1))
            await asyncio.sleep(pause)
            pause = min(pause * 2, 30.0)

    def _on_notify(self, *_: object) -> None:
        if self._wake is not None:
            self._wake()
