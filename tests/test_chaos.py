"""Chaos: relay processes killed, frozen and restarted, Postgres restarted, LISTEN and query
connections terminated, Redis stopped, poison rows mixed into the load. Writers commit events
while the faults happen; at the end tests/verifier.py judges from the writers' ledger, the
consumer's view of the broker and the database alone.

Each scenario is short by default (the normal test run); `pytest --soak` runs them longer
(20+ kills, a 60 s Redis outage). `pytest -s` shows the figures: events, duplicates, and the
recovery time after each fault (from the fault until every event committed before it has left
the outbox).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from outbox.urls import asyncpg_dsn
from tests.helpers import ROOT, create_topic, eventually, read_all, services
from tests.kafka_broker import KafkaBroker, free_port_run, kafka_available
from tests.verifier import (
    DB_ERRORS,
    INSERT,
    Arrival,
    CommitCutter,
    Ledger,
    Report,
    Writer,
    check,
    read_redis_stream,
    writers,
)

pytestmark = [pytest.mark.chaos, pytest.mark.postgres, pytest.mark.slow]

LEASE = 2.0
BATCH = 50
COMMON = ("--lease-seconds", str(LEASE), "--batch-size", str(BATCH), "--poll-interval", "0.2")


@pytest.fixture
def soak(request: pytest.FixtureRequest) -> bool:
    return bool(request.config.getoption("--soak"))


# -- the database, seen from outside --------------------------------------------------------


async def query(database_url: str, sql: str, *args: Any, timeout: float = 120) -> Any:
    """One value, on a connection of its own; waits through a database outage."""
    async with asyncio.timeout(timeout):
        while True:
            try:
                conn = await asyncio.wait_for(
                    asyncpg.connect(
                        asyncpg_dsn(database_url),
                        server_settings={"application_name": "chaos-monitor"},
                    ),
                    5,
                )
            except DB_ERRORS:
                await asyncio.sleep(0.2)
                continue
            try:
                return await conn.fetchval(sql, *args)
            except DB_ERRORS:
                await asyncio.sleep(0.2)
            finally:
                with contextlib.suppress(Exception):
                    await asyncio.wait_for(conn.close(), 2)


async def recovery(database_url: str, t0: float, timeout: float = 120) -> float:
    """Seconds from `t0` (a fault) until every event committed before now left the outbox."""
    mark = await query(database_url, "SELECT coalesce(max(seq), 0) FROM outbox_events")

    async def gone() -> bool:
        return bool(
            await query(
                database_url,
                "SELECT NOT EXISTS (SELECT 1 FROM outbox_events WHERE seq <= $1)",
                mark,
            )
        )

    await eventually(gone, timeout, every=0.1)
    return time.monotonic() - t0


async def outbox_left(database_url: str) -> int:
    return int(await query(database_url, "SELECT count(*) FROM outbox_events"))


async def dead_letter_ids(database_url: str) -> list[uuid.UUID]:
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        return [r["event_id"] for r in await conn.fetch("SELECT event_id FROM outbox_dead_letters")]
    finally:
        await conn.close()


async def wait_drained(database_url: str, timeout: float = 90, relays: Fleet | None = None) -> None:
    async def empty() -> bool:
        return await outbox_left(database_url) == 0

    try:
        await eventually(empty, timeout, every=0.2)
    except TimeoutError:
        conn = await asyncpg.connect(asyncpg_dsn(database_url))
        try:
            left = await conn.fetch(
                "SELECT bucket, count(*), min(seq), max(attempts), max(last_error)"
                " FROM outbox_events GROUP BY bucket ORDER BY bucket"
            )
            leases = await conn.fetch(
                "SELECT owner, count(*), max(lease_until) - now() AS left"
                " FROM outbox_bucket_leases GROUP BY owner"
            )
            live = await conn.fetch("SELECT relay_id, heartbeat_at FROM outbox_relays")
            activity = await conn.fetch(
                "SELECT application_name, state, wait_event_type, wait_event, left(query, 80)"
                " FROM pg_stat_activity WHERE datname = current_database()"
            )
        finally:
            await conn.close()
        raise AssertionError(
            f"outbox not drained in {timeout} s: {[tuple(r) for r in left]}\n"
            f"leases: {[tuple(r) for r in leases]}\nrelays: {[tuple(r) for r in live]}\n"
            f"activity: {[tuple(r) for r in activity]}\n"
            f"{relays.diagnose() if relays is not None else ''}"
        ) from None


# -- relay processes -------------------------------------------------------------------------


class Fleet:
    """Relay processes (the real CLI), logging to files; every one is killed at the end."""

    def __init__(self, database_url: str, logs: Path, args: Sequence[str], size: int) -> None:
        self.database_url = database_url
        self.logs = logs
        self.args = list(args)
        self.procs: list[subprocess.Popen[bytes]] = []
        self.names: dict[int, str] = {}
        self.crashes = 0
        self.kills = 0
        self._started = 0
        for _ in range(size):
            self.procs.append(self._spawn())

    def _spawn(self) -> subprocess.Popen[bytes]:
        self._started += 1
        name = f"chaos-{self._started}"
        env = os.environ | {
            "OUTBOX_DATABASE_URL": self.database_url,
            "OUTBOX_LOG_FORMAT": "json",
        }
        with open(self.logs / f"{name}.log", "wb") as log:
            proc = subprocess.Popen(
                [sys.executable, "-m", "outbox.relay.cli", "run", *self.args, "--relay-id", name],
                env=env,
                cwd=ROOT,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        self.names[proc.pid] = name
        return proc

    def started(self) -> bool:
        """Whether every relay logged relay_started (its signal handlers are in place)."""
        return all(
            "relay_started" in (self.logs / f"{self.names[p.pid]}.log").read_text(errors="replace")
            for p in self.procs
        )

    def restart_crashed(self) -> int:
        """Restart the relays that exited on their own (a supervisor's job); how many."""
        crashed = [i for i, p in enumerate(self.procs) if p.poll() is not None]
        for i in crashed:
            self.procs[i] = self._spawn()
        self.crashes += len(crashed)
        return len(crashed)

    async def supervise(self) -> None:
        """Restart crashed relays until cancelled."""
        while True:
            self.restart_crashed()
            await asyncio.sleep(0.2)

    def kill_and_restart(self, index: int) -> None:
        proc = self.procs[index]
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        self.kills += 1
        self.procs[index] = self._spawn()

    def assert_alive(self) -> None:
        dead = [(p.pid, p.returncode) for p in self.procs if p.poll() is not None]
        assert not dead, f"relay processes exited on their own: {dead}\n{self.tail()}"

    def diagnose(self) -> str:
        """Each relay's state and, with py-spy at hand, its Python stacks."""
        out = []
        spy = Path(sys.executable).parent / "py-spy"
        for proc in self.procs:
            out.append(f"relay pid {proc.pid}: returncode {proc.poll()}")
            if proc.poll() is None and spy.exists():
                dump = subprocess.run(
                    [str(spy), "dump", "--pid", str(proc.pid)],
                    capture_output=True,
                    text=True,
                    timeout=30,
                    check=False,
                )
                out.append(dump.stdout[-3000:] + dump.stderr[-500:])
        return "\n".join(out)

    def log_text(self) -> str:
        return "".join(p.read_text(errors="replace") for p in sorted(self.logs.glob("*.log")))

    def tail(self, lines: int = 30) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:])

    def stop(self, timeout: float = 30) -> list[int | None]:
        """SIGTERM every relay; their exit codes (a clean stop is 0)."""
        for proc in self.procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGCONT)
                proc.send_signal(signal.SIGTERM)
        codes: list[int | None] = []
        for proc in self.procs:
            try:
                codes.append(proc.wait(timeout))
            except subprocess.TimeoutExpired:
                codes.append(None)
        return codes

    def close(self) -> None:
        """Kill whatever is left (finally blocks)."""
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGCONT)
                    proc.kill()
                with contextlib.suppress(subprocess.TimeoutExpired):
                    proc.wait(10)


@pytest.fixture
def fleets() -> Iterator[list[Fleet]]:
    """The fleets a test starts, every process killed at teardown (before the database goes)."""
    made: list[Fleet] = []
    yield made
    for relays in made:
        relays.close()


async def start_fleet(
    fleets: list[Fleet], database_url: str, tmp_path: Path, args: Sequence[str], size: int
) -> Fleet:
    relays = Fleet(database_url, tmp_path, args, size)
    fleets.append(relays)
    await wait_for_owners(database_url, size)
    return relays


async def wait_for_owners(database_url: str, size: int, timeout: float = 60) -> None:
    """Until all 64 buckets are leased, by as many relays as there are (the share-out)."""

    async def shared() -> bool:
        return bool(
            await query(
                database_url,
                "SELECT count(DISTINCT owner) >= $1 AND count(*) = 64 FROM outbox_bucket_leases"
                " WHERE owner IS NOT NULL AND lease_until > now()",
                size,
            )
        )

    await eventually(shared, timeout, every=0.2)


async def stop_cleanly(relays: Fleet) -> None:
    relays.assert_alive()

    async def started() -> bool:
        return relays.started()

    await eventually(started, 60, every=0.2)
    codes = await asyncio.to_thread(relays.stop)
    assert codes == [0] * len(codes), f"exit codes {codes}\n{relays.tail()}"


# -- writers ---------------------------------------------------------------------------------


@contextlib.asynccontextmanager
async def writing(ws: Sequence[Writer]) -> AsyncIterator[None]:
    tasks = [asyncio.create_task(w.run()) for w in ws]
    try:
        yield
    finally:
        for w in ws:
            w.stop()
        async with asyncio.timeout(60):
            await asyncio.gather(*tasks)


def redis_args(redis_url: str) -> tuple[str, ...]:
    return ("--broker", "redis", "--redis-url", redis_url, *COMMON)


def figures(report: Report) -> None:
    report.print()


# -- 1. SIGKILL and a zombie -----------------------------------------------------------------


@pytest.mark.redis
async def test_relays_killed_and_a_zombie_lose_nothing(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    """4 relays; a random one SIGKILLed every 1-2 s and restarted; one frozen with SIGSTOP
    past its lease and resumed (a zombie that finds its buckets taken)."""
    started = time.monotonic()
    kills = 24 if soak else 5
    rand = random.Random(1)
    ledger = Ledger()
    recoveries: list[asyncio.Task[float]] = []
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 4)
    async with writing(writers(database_url, topic, ledger, count=3, pause=0.03)):
        zombie = relays.procs[0]
        zombie.send_signal(signal.SIGSTOP)
        frozen_at = time.monotonic()
        frozen = 0.0
        try:
            for i in range(kills):
                await asyncio.sleep(rand.uniform(1, 2))
                if i == 2:  # frozen for about 2 leases by now
                    zombie.send_signal(signal.SIGCONT)
                    frozen = time.monotonic() - frozen_at
                    recoveries.append(asyncio.create_task(recovery(database_url, time.monotonic())))
                victim = rand.randrange(1, 4)
                t0 = time.monotonic()
                await asyncio.to_thread(relays.kill_and_restart, victim)
                recoveries.append(asyncio.create_task(recovery(database_url, t0)))
        finally:
            zombie.send_signal(signal.SIGCONT)
        assert frozen > LEASE
        await asyncio.sleep(1)
    await wait_drained(database_url, relays=relays)
    recovered = await asyncio.gather(*recoveries)
    await stop_cleanly(relays)
    report = check(
        "kill+zombie",
        ledger,
        await read_redis_stream(redis_url, topic),
        # A killed relay may have published two batches it had not deleted yet (settling
        # overlaps the next publish); the zombie counts as one more fault.
        duplicate_bound=2 * BATCH * (kills + 1),
        dead_letter_ids=await dead_letter_ids(database_url),
        outbox_left=await outbox_left(database_url),
        faults=kills + 1,
        recovery_seconds=recovered,
        started=started,
    )
    figures(report)


# -- 2. Postgres restarted -------------------------------------------------------------------


#: Deletes a crash of Postgres can undo: the relay commits them without waiting for the WAL
#: flush (relay/stores/postgres.py, COMMIT_SETTINGS), at most 3 x wal_writer_delay (0.6 s)
#: of them, at ~400 events/s of these writers. They come back and go out again.
UNFLUSHED = 300


@pytest.mark.redis
@pytest.mark.parametrize("how", ["stop", "crash"])
async def test_postgres_restart_during_load(
    database_url: str,
    redis_url: str,
    topic: str,
    tmp_path: Path,
    soak: bool,
    fleets: list[Fleet],
    how: str,
) -> None:
    """Postgres stopped cleanly, or crashed (`pg_ctl stop -m immediate`: what was not flushed
    is lost), under load: no event committed by a writer is lost, per-key order holds."""
    started = time.monotonic()
    restarts = 3 if soak else 1
    ledger = Ledger()
    recovered: list[float] = []
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 2)
    # A relay that exits during the restart is restarted, as a supervisor would, so that the
    # data is still checked; then the test fails on the crash count.
    supervisor = asyncio.create_task(relays.supervise())
    try:
        async with writing(writers(database_url, topic, ledger, count=3, pause=0.03)):
            for _ in range(restarts):
                await asyncio.sleep(2)
                try:
                    await asyncio.to_thread(services, how, "postgres")
                    await asyncio.sleep(2)
                finally:
                    await asyncio.to_thread(services, "start", "postgres")
                recovered.append(await recovery(database_url, time.monotonic()))
            await asyncio.sleep(1.5)
        await wait_drained(database_url, relays=relays)
    finally:
        supervisor.cancel()
    relays.restart_crashed()
    await stop_cleanly(relays)
    print(f"\n[chaos] postgres restart: {relays.crashes} relay crashes (restarted)")
    assert relays.crashes == 0  # relay/relay.py once let a failed settle escape its loop
    figures(
        check(
            f"postgres {how}",
            ledger,
            await read_redis_stream(redis_url, topic),
            # two relays (and their restarts), two batches in flight each; after a crash,
            # the deletes it undid
            duplicate_bound=2 * BATCH * (2 * restarts + relays.crashes)
            + (UNFLUSHED * restarts if how == "crash" else 0),
            dead_letter_ids=await dead_letter_ids(database_url),
            outbox_left=await outbox_left(database_url),
            faults=restarts,
            recovery_seconds=recovered,
            started=started,
        )
    )
    assert ledger.transactions["committed"] > 0
    assert ledger.reconnects + ledger.transactions["failed"] + ledger.transactions["unknown"] > 0


# -- 3. LISTEN connections terminated --------------------------------------------------------

LISTENERS = (
    "SELECT pid FROM pg_stat_activity WHERE datname = $1"
    " AND application_name LIKE 'outbox-relay listen %'"
)


async def terminate(database_url: str, sql: str, every: float, until: float) -> int:
    """Terminate the backends `sql` finds, every `every` seconds until `until`."""
    conn = await asyncpg.connect(
        asyncpg_dsn(database_url), server_settings={"application_name": "chaos-killer"}
    )
    dbname = database_url.rsplit("/", 1)[1]
    killed = 0
    try:
        while time.monotonic() < until:
            for row in await conn.fetch(sql, dbname):
                killed += bool(await conn.fetchval("SELECT pg_terminate_backend($1)", row["pid"]))
            await asyncio.sleep(every)
    finally:
        await conn.close()
    return killed


@pytest.mark.redis
async def test_listen_connections_terminated_polling_covers(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    started = time.monotonic()
    ledger = Ledger()
    recoveries: list[asyncio.Task[float]] = []
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 2)
    async with writing(writers(database_url, topic, ledger, count=2, pause=0.05)):
        killed = 0
        for _ in range(20 if soak else 4):
            killed += await terminate(database_url, LISTENERS, 0.1, time.monotonic() + 1)
            recoveries.append(asyncio.create_task(recovery(database_url, time.monotonic())))
    await wait_drained(database_url, relays=relays)
    recovered = await asyncio.gather(*recoveries)
    await stop_cleanly(relays)
    assert killed >= 2
    assert "listener_reconnecting" in relays.log_text()
    report = check(
        "LISTEN killed",
        ledger,
        await read_redis_stream(redis_url, topic),
        duplicate_bound=0,  # the LISTEN connection carries no delivery
        dead_letter_ids=await dead_letter_ids(database_url),
        outbox_left=await outbox_left(database_url),
        faults=killed,
        recovery_seconds=recovered,
        started=started,
    )
    figures(report)
    # Polling (0.2 s) covers the missing notifications: no fault costs more than a few polls
    # plus the time to publish what was queued.
    assert max(recovered) < 5


# -- 4. Mid-query kills ----------------------------------------------------------------------

RELAY_QUERIES = (
    "SELECT pid FROM pg_stat_activity WHERE datname = $1"
    " AND application_name LIKE 'outbox-relay%' AND state = 'active'"
    " AND application_name NOT LIKE 'outbox-relay listen %'"
)


async def backlog(database_url: str, topic: str, ledger: Ledger) -> list[Writer]:
    """About 3,600 events waiting before the relays start: they are busy from the start.
    Returns the writers, to go on with (each key's numbers go on from there)."""
    ws = writers(database_url, topic, ledger, count=2, pause=0, per_txn=(20, 40))
    await asyncio.gather(*(w.run(limit=60) for w in ws))
    for w in ws:
        w.pause, w.per_txn = 0.03, (2, 6)
    return ws


@pytest.mark.redis
async def test_connections_killed_mid_query_on_busy_relays(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    """The relays' backends terminated while their queries run: no relay exits, and the data
    is whole and in order. (Relays that exit are restarted, as a supervisor would, so that the
    data is still checked; then the test fails on the crash count.)"""
    started = time.monotonic()
    ledger = Ledger()
    ws = await backlog(database_url, topic, ledger)
    killed = 0
    recoveries: list[asyncio.Task[float]] = []
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 2)
    supervisor = asyncio.create_task(relays.supervise())
    try:
        async with writing(ws):
            # Rounds of kills until at least 3 hit a running query: a relay's statements take
            # about a millisecond, so a poll finds one running only now and then.
            rounds = 0
            while rounds < (10 if soak else 2) or (killed < 3 and rounds < 12):
                until = time.monotonic() + 1.5
                killed += await terminate(database_url, RELAY_QUERIES, 0.005, until)
                recoveries.append(asyncio.create_task(recovery(database_url, time.monotonic())))
                await asyncio.sleep(0.5)
                rounds += 1
        await wait_drained(database_url, relays=relays)
        recovered = await asyncio.gather(*recoveries)
    finally:
        supervisor.cancel()
    relays.restart_crashed()
    await stop_cleanly(relays)
    assert killed >= 3
    figures(
        check(
            "mid-query kills",
            ledger,
            await read_redis_stream(redis_url, topic),
            duplicate_bound=2 * BATCH * (killed + relays.crashes),
            dead_letter_ids=await dead_letter_ids(database_url),
            outbox_left=await outbox_left(database_url),
            faults=killed,
            recovery_seconds=recovered,
            started=started,
        )
    )
    print(f"[chaos] mid-query kills: {killed} backends terminated, {relays.crashes} relay crashes")
    assert relays.crashes == 0


@pytest.mark.redis
async def test_relay_processes_survive_mid_query_kills(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    ws = await backlog(database_url, topic, Ledger())
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 2)
    deadline = time.monotonic() + (60 if soak else 10)
    killed = 0
    async with writing(ws):
        while time.monotonic() < deadline and all(p.poll() is None for p in relays.procs):
            killed += await terminate(database_url, RELAY_QUERIES, 0.02, time.monotonic() + 1)
            await asyncio.sleep(0.3)
    crashed = [line for line in relays.log_text().splitlines() if "relay_crashed" in line]
    print(f"\n[chaos] {killed} backends terminated; crashes: {crashed}")
    relays.assert_alive()


# -- 5. Redis stopped ------------------------------------------------------------------------

REDIS_DUMP = ROOT / ".services" / "redis" / "dump.rdb"


async def stop_redis_keeping_data(redis_url: str) -> None:
    """Stop Redis as services.sh does, but with SHUTDOWN SAVE: the shared Redis runs without
    persistence, and the consumer reads the streams at the end, so what the relays were told
    was stored must survive the restart (dump.rdb, loaded by the next start)."""
    client = aioredis.Redis.from_url(redis_url)
    with contextlib.suppress(Exception):
        await client.shutdown(save=True)
    with contextlib.suppress(Exception):
        await client.aclose()
    await asyncio.to_thread(services, "stop", "redis")  # tidies the pid file


@pytest.mark.redis
async def test_redis_outage_dead_letters_nothing(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    started = time.monotonic()
    outage = 60.0 if soak else 10.0
    ledger = Ledger()
    # Few attempts, short backoff: were an outage counted against events, they would be
    # dead-lettered within the outage.
    args = (*redis_args(redis_url), "--max-attempts", "2", "--backoff-base", "0.1")
    relays = await start_fleet(fleets, database_url, tmp_path, (*args, "--backoff-max", "0.5"), 2)
    async with writing(writers(database_url, topic, ledger, count=2, pause=0.05)):
        await asyncio.sleep(1.5)
        try:
            await stop_redis_keeping_data(redis_url)
            await asyncio.sleep(outage)
            attempts = await query(
                database_url, "SELECT coalesce(max(attempts), 0) FROM outbox_events"
            )
        finally:
            await asyncio.to_thread(services, "start", "redis")
            REDIS_DUMP.unlink(missing_ok=True)
        recovered = await recovery(database_url, time.monotonic())
        await asyncio.sleep(1)
    await wait_drained(database_url, relays=relays)
    await stop_cleanly(relays)
    assert attempts == 0
    assert "broker_unavailable" in relays.log_text()
    figures(
        check(
            "redis outage",
            ledger,
            await read_redis_stream(redis_url, topic),
            duplicate_bound=2 * BATCH * 2,
            dead_letter_ids=await dead_letter_ids(database_url),
            outbox_left=await outbox_left(database_url),
            faults=1,
            recovery_seconds=[recovered],
            started=started,
        )
    )


# -- 6. Poison rows --------------------------------------------------------------------------


async def insert_rows(database_url: str, rows: Sequence[tuple[uuid.UUID, str, str, str]]) -> None:
    """Raw SQL rows (id, topic, key, payload JSON text), in one transaction, in order."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        async with conn.transaction():
            for event_id, topic, key, payload in rows:
                await conn.execute(INSERT, event_id, topic, key, payload)
    finally:
        await conn.close()


@pytest.mark.kafka
async def test_poison_rows_dead_letter_exactly_themselves(
    database_url: str, kafka_bootstrap: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    started = time.monotonic()
    topic = f"chaos-{uuid.uuid4().hex[:8]}"
    await create_topic(kafka_bootstrap, topic, configs={"max.message.bytes": "3000"})
    ledger = Ledger()
    big = [uuid.uuid4() for _ in range(3)]  # an oversize event, then two of its key
    bad = [uuid.uuid4() for _ in range(2)]  # an invalid topic name, then one of its key
    odd_payloads = ['"a bare string"', "42", "null", "[1, 2]", "true", "3.5e10", '{"": []}']
    odd = [uuid.uuid4() for _ in odd_payloads]
    rows = [
        (big[0], topic, "poison-big", json.dumps({"n": 1, "blob": "x" * 5000})),
        (bad[0], "not a valid topic!", "poison-topic", json.dumps({"n": 1})),
        (big[1], topic, "poison-big", json.dumps({"n": 2})),
        (bad[1], topic, "poison-topic", json.dumps({"n": 2})),
        (big[2], topic, "poison-big", json.dumps({"n": 3})),
        *[(i, topic, "odd", p) for i, p in zip(odd, odd_payloads, strict=True)],
    ]
    args: tuple[str, ...] = ("--broker", "kafka", "--kafka-bootstrap", kafka_bootstrap, *COMMON)
    args = (*args, "--max-attempts", "3", "--backoff-base", "0.05", "--backoff-max", "0.2")
    relays = await start_fleet(fleets, database_url, tmp_path, args, 2)
    async with writing(writers(database_url, topic, ledger, count=2, pause=0.05)):
        await asyncio.sleep(10 if soak else 1.5)
        await insert_rows(database_url, rows)
        await asyncio.sleep(10 if soak else 2)
    await wait_drained(database_url, timeout=90, relays=relays)
    await stop_cleanly(relays)
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        dead = await conn.fetch(
            "SELECT event_id, error_class, held_behind FROM outbox_dead_letters"
            " ORDER BY original_seq"
        )
    finally:
        await conn.close()
    by_id = {r["event_id"]: (r["error_class"], r["held_behind"]) for r in dead}
    print(f"\n[chaos] poison dead letters: {sorted(set(by_id.values()), key=str)}")
    assert by_id.get(big[0], ("?", None))[0] == "MessageSizeTooLargeError"
    assert by_id.get(bad[0], ("?", None))[1] is None
    for parked, poison in [(big[1], big[0]), (big[2], big[0]), (bad[1], bad[0])]:
        assert by_id.get(parked) == ("Quarantined", poison)
    received = [
        Arrival(e.id, e.key, json.loads(e.payload)) for e in await read_all(kafka_bootstrap, topic)
    ]
    extra = {i: ("odd", n) for n, i in enumerate(odd, 1)}
    report = check(
        "poison rows",
        ledger,
        received,
        duplicate_bound=0,
        dead_letter_ids=list(by_id),
        expected_dead={*big, *bad},
        outbox_left=await outbox_left(database_url),
        started=started,
        extra=extra,
    )
    figures(report)
    got = {a.id: a.payload for a in received}
    assert [got[i] for i in odd] == [json.loads(p) for p in odd_payloads]


# -- 7. High write rate while relays are killed ----------------------------------------------


@pytest.mark.redis
async def test_high_write_rate_while_relays_are_killed(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    started = time.monotonic()
    kills = 20 if soak else 5
    rand = random.Random(7)
    ledger = Ledger()
    recoveries: list[asyncio.Task[float]] = []
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 3)
    async with writing(writers(database_url, topic, ledger, count=4, pause=0, per_txn=(5, 20))):
        for _ in range(kills):
            await asyncio.sleep(rand.uniform(1, 1.5))
            t0 = time.monotonic()
            await asyncio.to_thread(relays.kill_and_restart, rand.randrange(3))
            recoveries.append(asyncio.create_task(recovery(database_url, t0)))
    written = time.monotonic() - started
    await wait_drained(database_url, timeout=120, relays=relays)
    recovered = await asyncio.gather(*recoveries)
    await stop_cleanly(relays)
    report = check(
        "high rate + kills",
        ledger,
        await read_redis_stream(redis_url, topic),
        duplicate_bound=2 * BATCH * kills,
        dead_letter_ids=await dead_letter_ids(database_url),
        outbox_left=await outbox_left(database_url),
        faults=kills,
        recovery_seconds=recovered,
        started=started,
    )
    figures(report)
    print(f"[chaos] write rate {report.events / written:.0f} events/s committed")


# -- 5b. Kafka killed while sends are in flight ----------------------------------------------


@pytest.mark.kafka
async def test_kafka_killed_mid_send_loses_and_dead_letters_nothing(
    database_url: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    """A broker of our own (tests/kafka_broker.py) SIGKILLed under load, so sends are in
    flight, and started again after the outage: nothing is lost, nothing is dead-lettered,
    per-key order holds. Its data dir survives, as a crashed broker's disk does."""
    if not kafka_available():
        pytest.skip("no Kafka jars in .services/kafka/libs (run scripts/services.sh up)")
    started = time.monotonic()
    outage = 60.0 if soak else 10.0
    broker = KafkaBroker("chaos-kill", free_port_run(2, 39092), auto_create=False)
    try:
        await asyncio.to_thread(broker.start)
        topic = f"chaos-{uuid.uuid4().hex[:8]}"
        await create_topic(broker.bootstrap, topic)
        ledger = Ledger()
        args: tuple[str, ...] = ("--broker", "kafka", "--kafka-bootstrap", broker.bootstrap)
        args = (
            *args,
            *COMMON,
            "--max-attempts",
            "2",
            "--backoff-base",
            "0.1",
            "--backoff-max",
            "0.5",
        )
        relays = await start_fleet(fleets, database_url, tmp_path, args, 2)
        async with writing(writers(database_url, topic, ledger, count=2, pause=0.01)):
            await asyncio.sleep(2)
            killed = time.monotonic()
            await asyncio.to_thread(broker.kill)
            await asyncio.sleep(outage)
            attempts = await query(
                database_url, "SELECT coalesce(max(attempts), 0) FROM outbox_events"
            )
            await asyncio.to_thread(broker.start)
            back = time.monotonic()
            recovered = await recovery(database_url, back)
            await asyncio.sleep(1)
        await wait_drained(database_url, relays=relays)
        await stop_cleanly(relays)
        assert attempts == 0  # the outage counted against no event
        assert "broker_unavailable" in relays.log_text()
        received = [
            Arrival(e.id, e.key, json.loads(e.payload))
            for e in await read_all(broker.bootstrap, topic)
        ]
        report = check(
            "kafka killed",
            ledger,
            received,
            duplicate_bound=2 * BATCH * 2,
            dead_letter_ids=await dead_letter_ids(database_url),
            outbox_left=await outbox_left(database_url),
            faults=1,
            recovery_seconds=[recovered],
            started=started,
        )
        figures(report)
        print(f"[chaos] kafka down {back - killed:.1f} s; drained {recovered:.2f} s after")
    finally:
        await asyncio.to_thread(broker.cleanup)


# -- 8. COMMITs with an unknown outcome -----------------------------------------------------


@pytest.mark.redis
async def test_commits_cut_mid_flight_arrive_whole_or_not_at_all(
    database_url: str, redis_url: str, topic: str, tmp_path: Path, soak: bool, fleets: list[Fleet]
) -> None:
    """Writers connect through a proxy that breaks their connection during COMMIT (half the
    time after Postgres got it). The writers cannot know those outcomes; the verifier checks
    that each such transaction arrived whole or not at all, and that the committed ones
    kept their key's order."""
    started = time.monotonic()
    cutter = CommitCutter(database_url, every=7)
    await cutter.start()
    ledger = Ledger()
    relays = await start_fleet(fleets, database_url, tmp_path, redis_args(redis_url), 2)
    try:
        async with writing(writers(cutter.url(), topic, ledger, count=3, pause=0.01)):
            await asyncio.sleep(30 if soak else 4)
    finally:
        await cutter.close()
    await wait_drained(database_url, relays=relays)
    await stop_cleanly(relays)
    report = check(
        "commits cut",
        ledger,
        await read_redis_stream(redis_url, topic),
        duplicate_bound=0,
        dead_letter_ids=await dead_letter_ids(database_url),
        outbox_left=await outbox_left(database_url),
        faults=cutter.cut_after + cutter.cut_before,
        started=started,
    )
    figures(report)
    assert cutter.cut_after > 0
    assert cutter.cut_before > 0
    assert report.unknown_transactions == cutter.cut_after + cutter.cut_before
    # Postgres committed exactly those it was handed: they arrived, the others did not.
    assert report.unknown_arrived == cutter.cut_after
