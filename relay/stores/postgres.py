"""The production store: PostgreSQL through asyncpg. SQL comes from relay/queries.sql only."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import socket
from collections.abc import Callable, Sequence
from typing import Any

import asyncpg

from outbox.envelope import Envelope
from outbox.relay.floor import Horizon
from outbox.relay.logs import relay_logger
from outbox.relay.seams import Backlog, Claim, Dead, Retry, StoreUnavailableError, park
from outbox.relay.sql import QUERIES
from outbox.urls import asyncpg_dsn, redact
from outbox.validation import BUCKETS

log = relay_logger("relay.store")

NOTIFY_CHANNEL = "outbox_events"
#: Errors that mean "the database cannot serve us now", not "this statement is wrong": the loop
#: backs off and tries again. Connections dropped, refused or closed mid-query (asyncpg then
#: sometimes raises InternalClientError "cannot switch to state", a known asyncpg issue), a
#: statement timeout or a cancel, a shutdown, the connection limit, out of memory or disk,
#: a deadlock or serialization failure, a lock timeout.
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


async def _binary_jsonb(conn: asyncpg.Connection) -> None:
    """jsonb columns arrive as the raw UTF-8 JSON bytes the brokers take: no decode, no copy."""
    await conn.set_type_codec(
        "jsonb",
        schema="pg_catalog",
        format="binary",
        encoder=lambda value: b"\x01" + value,  # version byte 1, then the JSON text
        decoder=lambda data: data[1:],
    )


def _count(status: str) -> int:
    """Rows changed, from a command tag such as 'DELETE 12' or 'INSERT 0 3'."""
    return int(status.rsplit(" ", 1)[-1])


class PostgresStore:
    def __init__(
        self,
        database_url: str,
        *,
        lease_seconds: float = 15.0,
        pool_size: int = 4,
        listen: bool = True,
        max_batch_bytes: int = 16 * 1024 * 1024,
    ) -> None:
        self._dsn = asyncpg_dsn(database_url)
        self._safe_url = redact(database_url)
        self.lease_seconds = lease_seconds
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
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=self._pool_size,
                init=_binary_jsonb,
                server_settings={
                    "application_name": f"outbox-relay {relay_id}"[:63],
                    **PLANNER_SETTINGS,
                },
            )
        except CONNECTION_ERRORS as exc:
            raise StoreUnavailableError(f"{self._safe_url}: {exc}") from exc
        self._sampler = asyncio.create_task(self._sample_horizon(), name="outbox-horizon")

    async def stop(self) -> None:
        for task in (self._listener, self._sampler):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._listener = self._sampler = None
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
            raise StoreUnavailableError(str(exc)) from exc
        return result

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
            raise StoreUnavailableError(str(exc)) from exc
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
        the bytes it really got, how many rows fit the budget: it starts small and doubles
        while claims fit (TCP's slow start), and shrinks at once when one did not."""
        got = sum(len(r[4]) for r in rows)
        if got > self.max_batch_bytes and len(rows) > 1:
            self._row_cap = max(1, len(rows) * self.max_batch_bytes // got)
        elif len(rows) == capped:
            self._row_cap = min(self._row_cap * 2, ROW_CAP_MAX)

    async def backlog(self) -> Backlog:
        try:
            row = await self.pool.fetchrow(QUERIES["backlog"])
        except CONNECTION_ERRORS as exc:
            raise StoreUnavailableError(str(exc)) from exc
        assert row is not None
        return Backlog(
            row["pending"], row["oldest_age"], row["unowned_buckets"], row["oldest_snapshot_age"]
        )

    async def mark_delivered(self, seqs: Sequence[int]) -> int:
        return _count(await self._run("delete_delivered", self._relay_id, seqs))

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
            raise StoreUnavailableError(str(exc)) from exc

    def on_new_events(self, wake: Callable[[], None]) -> None:
        self._wake = wake
        if self._listen and self._listener is None:
            self._listener = asyncio.create_task(self._listen_forever(), name="outbox-listen")

    async def _listen_forever(self) -> None:
        """A dedicated LISTEN connection, pinged and reconnected with backoff when it drops."""
        pause = 0.5
        while True:
            conn: asyncpg.Connection | None = None
            try:
                # Named like the pool's connections, so pg_stat_activity tells it apart.
                name = f"outbox-relay listen {self._relay_id}"[:63]
                conn = await asyncpg.connect(self._dsn, server_settings={"application_name": name})
                await conn.add_listener(NOTIFY_CHANNEL, self._on_notify)
                pause = 0.5
                if self._wake is not None:
                    self._wake()  # notifications may have been missed while disconnected
                while True:
                    await asyncio.sleep(5.0)
                    await asyncio.wait_for(conn.execute("SELECT 1"), 5.0)
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
