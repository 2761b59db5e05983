"""Drain (relays in this process: ours, naive, faststream-outbox), writer overhead and
latency (relay, writers in child processes; consumer here)."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import resource
import socket
import sys
import time
import traceback
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import asyncpg
import psutil

from bench import faststream_runner, naive_relay
from bench.brokers import Broker, BrokerOps, Receiver
from bench.config import FLOOR, BenchConfig
from bench.infra import Databases, Services, is_empty, poll, table_stats
from bench.procs import CpuByRole, Proc, module_argv, relay_argv
from bench.seed import seed_faststream, seed_outbox, seed_waiting
from outbox.envelope import MODES, EnvelopeMode
from outbox.relay.factory import build_relay
from outbox.relay.metrics import RelayMetrics, serve_metrics
from outbox.relay.relay import Relay
from outbox.relay.settings import RelaySettings
from outbox.relay.sql import QUERIES
from outbox.relay.stores.postgres import PostgresStore
from outbox.urls import asyncpg_dsn

Result = dict[str, Any]


@dataclass
class Context:
    services: Services
    dbs: Databases
    ops: BrokerOps
    config: BenchConfig
    run_id: str
    tmp: Path

    def topic(self, label: str) -> str:
        return f"bench-{self.run_id}-{label}-{uuid.uuid4().hex[:6]}"

    def log(self, message: str) -> None:
        print(f"[bench {time.strftime('%H:%M:%S')}] {message}", flush=True)


def rate(events: int, seconds: float) -> float:
    return round(events / seconds, 1) if seconds > 0 else 0.0


def percentile(sorted_values: list[float], q: float) -> float:
    """Nearest-rank percentile of an ascending list."""
    if not sorted_values:
        return float("nan")
    index = min(len(sorted_values) - 1, max(0, math.ceil(q / 100 * len(sorted_values)) - 1))
    return sorted_values[index]


def cdf_points(sorted_values: list[float], points: int = 200) -> list[list[float]]:
    """[value, fraction] pairs, enough to draw a CDF without storing every sample."""
    n = len(sorted_values)
    if n == 0:
        return []
    step = max(1, n // points)
    out = [[round(sorted_values[i], 3), round((i + 1) / n, 4)] for i in range(0, n, step)]
    out.append([round(sorted_values[-1], 3), 1.0])
    return out


def cpu_self() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def machine_busy() -> float:
    """CPU seconds every core of the machine has been busy (neither idle nor waiting for I/O;
    guest time is inside user time on Linux, and stolen time is not ours)."""
    t = psutil.cpu_times()
    return float(t.user + t.nice + t.system + getattr(t, "irq", 0.0) + getattr(t, "softirq", 0.0))


async def guarded(
    ctx: Context, label: str, run: Callable[[], Awaitable[Result]], base: Result
) -> Result:
    """Run one experiment; a failure becomes an `error` entry instead of ending the run."""
    ctx.log(label)
    started = time.perf_counter()
    psutil.cpu_percent()  # starts the machine-wide CPU window read below
    try:
        result = {**base, **(await run())}
    except Exception as exc:  # noqa: BLE001 - one failed experiment must not end the run
        traceback.print_exc()
        result = {**base, "error": f"{type(exc).__name__}: {exc}"}
    # How busy the whole machine was (others' tests included): context for every figure.
    result["machine_cpu_pct"] = psutil.cpu_percent()
    result["load_1m"] = round(os.getloadavg()[0], 2)
    ctx.log(f"  -> {_brief(result)} ({time.perf_counter() - started:.1f}s)")
    return result


def _brief(result: Result) -> str:
    keys = ("events_per_s", "p50_ms", "p99_ms", "error")
    return ", ".join(f"{k}={result[k]}" for k in keys if k in result) or "done"


async def wait_until_empty(url: str, table: str, pk: str, timeout: float) -> float:
    """Poll (20 ms) until `table` is empty; returns time.perf_counter() at that moment."""
    conn = await asyncpg.connect(asyncpg_dsn(url))

    async def empty() -> bool:
        return await is_empty(conn, table, pk)

    try:
        await poll(empty, 0.02, timeout)
        return time.perf_counter()
    finally:
        await conn.close()


# -- drain -------------------------------------------------------------------------------------


async def drain(ctx: Context) -> list[Result]:
    """Every system and size; runs up to 100k repeat `drain_repeats` times, interleaved (so a
    burst of background load hits all systems alike), and the median run is reported."""
    cfg = ctx.config
    experiments: list[tuple[str, Callable[[], Awaitable[Result]], Result]] = []
    for broker in cfg.brokers:
        experiments += [
            (
                f"drain {system} {broker} {size:,}",
                functools.partial(run, ctx, broker, size),
                {"system": system, "broker": broker, "events": size},
            )
            for system, run, sizes in (
                ("outbox", _drain_outbox, cfg.drain_sizes),
                ("naive", _drain_naive, cfg.naive_sizes),
                ("lean", functools.partial(_drain_naive, lean=True), cfg.naive_sizes),
            )
            for size in sizes
        ]
        experiments += [
            (
                f"drain outbox {broker} {cfg.waiting_drain_events:,}, {waiting:,} waiting",
                functools.partial(_drain_outbox, ctx, broker, cfg.waiting_drain_events, waiting),
                {
                    "system": f"outbox, {waiting:,} waiting",
                    "broker": broker,
                    "events": cfg.waiting_drain_events,
                    "waiting": waiting,
                },
            )
            for waiting in cfg.waiting_rows
        ]
        experiments += [
            (
                f"drain faststream-outbox ({preset}) {broker} {size:,}",
                functools.partial(_drain_faststream, ctx, broker, size, preset),
                {"system": f"faststream-{preset}", "broker": broker, "events": size},
            )
            for preset, size in (
                ("tuned", cfg.faststream_tuned_events),
                ("defaults", cfg.faststream_default_events),
            )
        ]
    runs: list[list[Result]] = [[] for _ in experiments]
    for attempt in range(cfg.drain_repeats):
        for i, (label, run, base) in enumerate(experiments):
            if attempt == 0 or base["events"] <= 100_000:
                runs[i].append(await guarded(ctx, f"{label} #{attempt + 1}", run, base))
    return [median_run(r) for r in runs]


class _NoMetrics(RelayMetrics):
    """Metrics recording switched off: the baseline the cost of metrics is measured against."""

    def record_batch(self, *_: Any) -> None:
        return None

    def record_outage(self, *_: Any) -> None:
        return None

    def record_missed_wakeups(self, *_: Any) -> None:
        return None


@contextlib.asynccontextmanager
async def scraper(mode: str) -> AsyncIterator[int]:
    """With "scraped": a port for the relay's metrics, and a process that scrapes it every
    second, as Prometheus would (a thread in the relay's process would take the GIL from it
    for work that is not the relay's). Started before the drain is timed: a scraper runs
    before the relay starts, and its Python's start is not the relay's cost."""
    if mode != "scraped":
        yield 0
        return
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = int(sock.getsockname()[1])
    process = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _SCRAPER, f"http://127.0.0.1:{port}/metrics"
    )
    try:
        yield port
    finally:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def metrics_mode(relay: Relay, mode: str, port: int) -> AsyncIterator[None]:
    """ "off": recording replaced by no-ops; "scraped": also served on `port` (see
    `scraper`)."""
    if mode == "off":
        relay.metrics = _NoMetrics()
    if mode != "scraped":
        yield
        return
    stop_server = serve_metrics(relay, port, "127.0.0.1")
    try:
        yield
    finally:
        stop_server()


_SCRAPER = """
import sys, time, urllib.request
while True:
    time.sleep(1.0)
    try:
        urllib.request.urlopen(sys.argv[1], timeout=5).read()
    except OSError:
        pass
"""


async def long_transaction(ctx: Context) -> list[Result]:
    """The drain while a REPEATABLE READ transaction stays open elsewhere (a report, a session
    idle in transaction): Postgres may not clean up the rows the relay deletes, so their
    index entries stay in the claim's path. Rates per tenth of the drain: the last tenth
    against the first shows whether the claim slows down with the rows delivered."""
    out: list[Result] = []
    for broker in ctx.config.brokers:
        size = ctx.config.long_txn_events
        base = {"system": "outbox, long transaction open", "broker": broker, "events": size}
        run = functools.partial(_drain_holding_snapshot, ctx, broker, size)
        out.append(await guarded(ctx, f"drain {base['system']} {broker}", run, base))
    return out


async def _drain_holding_snapshot(ctx: Context, broker: Broker, size: int) -> Result:
    async with ctx.dbs.fresh() as url:
        topic, _ = await _seeded(ctx, url, broker, size, f"longtx-{broker}")
        holder = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
            await holder.fetchval("SELECT count(*) FROM outbox_events")  # takes the snapshot
            relay = _relay(ctx, url, broker, "bench-longtx")
            marks: list[tuple[float, int]] = []

            async def sample() -> None:
                while True:
                    marks.append((time.perf_counter(), relay.stats.delivered))
                    await asyncio.sleep(0.02)

            sampler = asyncio.create_task(sample())
            try:
                async with asyncio.timeout(ctx.config.drain_timeout):
                    stats = await relay.drain()
            finally:
                sampler.cancel()
            marks.append((time.perf_counter(), relay.stats.delivered))
            held_seconds = await holder.fetchval(
                "SELECT extract(epoch FROM now() - xact_start)::float8 FROM pg_stat_activity"
                " WHERE pid = pg_backend_pid()"
            )
            await holder.execute("ROLLBACK")
        finally:
            await holder.close()
            await ctx.ops.cleanup(broker, topic)
    tenths = _tenth_rates(marks, stats.delivered)
    return {
        "events_per_s": rate(stats.delivered, marks[-1][0] - marks[0][0]),
        "relayed": stats.delivered,
        "tenths_events_per_s": tenths,
        "last_vs_first": round(tenths[-1] / tenths[0], 3) if tenths and tenths[0] else None,
        "snapshot_held_s": round(held_seconds, 1),
    }


def _tenth_rates(marks: list[tuple[float, int]], total: int) -> list[float]:
    """Events per second within each tenth of the events delivered."""
    rates = []
    for i in range(10):
        lo, hi = total * i // 10, total * (i + 1) // 10
        start = next((t for t, n in marks if n >= lo), None)
        end = next((t for t, n in marks if n >= hi), None)
        if start is None or end is None or end <= start:
            continue
        rates.append(rate(hi - lo, end - start))
    return rates


async def metrics_cost(ctx: Context) -> list[Result]:
    """The drain with metrics recorded and scraped every second vs recording switched off."""
    cfg = ctx.config
    return await _drains_by_mode(
        ctx, "metrics", ("off", "scraped"), cfg.metrics_rounds, cfg.metrics_events
    )


async def envelope_cost(ctx: Context) -> list[Result]:
    """The drain in each envelope mode (the target: each within 10 % of plain)."""
    cfg = ctx.config
    return await _drains_by_mode(ctx, "envelope", MODES, cfg.envelope_rounds, cfg.envelope_events)


async def history_cost(ctx: Context) -> list[Result]:
    """The drain with delivered history on (each delivered row moved into outbox_delivered,
    with its broker position) vs off (deleted) (the target: on >= 0.8x off); then what each
    settle statement alone costs Postgres."""
    cfg = ctx.config
    drains = await _drains_by_mode(
        ctx, "history", ("off", "on"), cfg.history_rounds, cfg.history_events
    )
    probes = []
    for statement in ("delete_delivered", "move_delivered"):
        base = {"system": f"settle statement, {statement}", "broker": "postgres"}
        run = functools.partial(_settle_statement_cost, ctx, statement, cfg.history_events)
        probes.append(await guarded(ctx, base["system"], run, base))
    return drains + probes


#: The relay id the settle probe leases every bucket to.
_PROBE_RELAY = "bench-settle-probe"


async def _settle_statement_cost(ctx: Context, statement: str, events: int) -> Result:
    """Postgres's CPU and WAL per event in one settle statement alone (`delete_delivered`, or
    `move_delivered` with Kafka positions as the relay passes them): `events` seeded events
    settled 500 a statement (the relay's batch) by one connection, the backend's CPU read
    from the kernel. No relay, no broker: what history costs Postgres itself."""
    async with ctx.dbs.fresh() as url:
        await seed_outbox(url, events, "settle-probe", ctx.config.keys)
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            await conn.execute(
                "INSERT INTO outbox_relays (relay_id, hostname, pid) VALUES ($1, 'bench', 0)",
                _PROBE_RELAY,
            )
            await conn.execute(
                "UPDATE outbox_bucket_leases SET owner = $1, "
                "lease_until = now() + interval '1 hour'",
                _PROBE_RELAY,
            )
            await conn.execute("ANALYZE outbox_events")
            seqs = [r[0] for r in await conn.fetch("SELECT seq FROM outbox_events ORDER BY seq")]
            backend = psutil.Process(await conn.fetchval("SELECT pg_backend_pid()"))
            if not backend.name().startswith("postgres"):  # Postgres in a container, say
                raise RuntimeError("the connection's backend is not a local process")
            prepared = await conn.prepare(QUERIES[statement])
            lsn = "SELECT pg_current_wal_lsn()"
            wal, cpu, started = await conn.fetchval(lsn), backend.cpu_times(), time.perf_counter()
            for i in range(0, len(seqs), 500):
                chunk = seqs[i : i + 500]
                if statement == "delete_delivered":
                    await prepared.fetch(_PROBE_RELAY, chunk)
                else:  # Kafka's positions: partition and offset arrays, no entry ids
                    offsets = list(range(i, i + len(chunk)))
                    await prepared.fetch(_PROBE_RELAY, chunk, [0] * len(chunk), offsets, [])
            seconds, after = time.perf_counter() - started, backend.cpu_times()
            wal_bytes = await conn.fetchval("SELECT pg_wal_lsn_diff(pg_current_wal_lsn(), $1)", wal)
            left = await conn.fetchval("SELECT count(*) FROM outbox_events")
        finally:
            await conn.close()
    used = (after.user + after.system) - (cpu.user + cpu.system)
    return {
        "events": len(seqs),
        "settled": len(seqs) - left,
        "seconds": round(seconds, 3),
        "postgres_cpu_us_per_event": round(used / max(1, len(seqs)) * 1e6, 2),
        "wal_bytes_per_event": round(float(wal_bytes) / max(1, len(seqs))),
    }


async def _drains_by_mode(
    ctx: Context, setting: str, modes: tuple[str, ...], rounds: int, events: int
) -> list[Result]:
    """Drains of `events` with `_drain_outbox`'s `setting` in each of `modes`, in A B B A
    order per broker; the median run of each mode is reported."""
    out: list[Result] = []
    for broker in ctx.config.brokers:
        runs: dict[str, list[Result]] = {mode: [] for mode in modes}
        for mode in abba(modes, rounds):
            base = {"system": f"outbox, {setting} {mode}", "broker": broker, "events": events}
            options: dict[str, Any] = {setting: mode}  # the mode's name is the setting's value
            run = functools.partial(_drain_outbox, ctx, broker, events, **options)
            runs[mode].append(await guarded(ctx, f"drain {base['system']} {broker}", run, base))
        out += [median_run(r) for r in runs.values()]
    return out


async def prune_cost(ctx: Context) -> list[Result]:
    """Retention on a big history: `prune_history_rows` rows of outbox_delivered older than
    the retention, pruned by the relay's own code (PostgresStore.prune: its own connection,
    batches of 1,000, paced), while the relay drains `prune_drain_events` events with history
    on. Drains alternate A B B A ... (`prune_rounds` rounds): A without pruning, B while the
    prune runs (started before the drain, cancelled after it; it resumes where it stopped).
    Then the prune runs to the end alone. Reports the drain rates, and the prune's rows, time
    (in B windows and alone), statements and longest statement (commit included: the
    longest any of its row locks was held)."""
    cfg = ctx.config
    out: list[Result] = []
    for broker in cfg.brokers:
        async with ctx.dbs.fresh() as url:
            conn = await asyncpg.connect(asyncpg_dsn(url))
            try:
                started = time.perf_counter()
                await conn.execute(
                    "INSERT INTO outbox_delivered (event_id, seq, topic, key, event_type, "
                    "payload, headers, created_at, delivered_at, relay_id, attempts, "
                    "broker_partition, broker_offset) "
                    "SELECT gen_random_uuid(), g, 'orders', 'order-' || g % 1000, 'OrderPlaced', "
                    "jsonb_build_object('order_id', g, 'total_cents', 4200), '{}', "
                    "now() - interval '8 days', now() - interval '8 days' + g * interval '1 ms', "
                    "'bench', 1, g % 3, g / 3 FROM generate_series(1, $1) AS g",
                    cfg.prune_history_rows,
                )
                await conn.execute("VACUUM ANALYZE outbox_delivered")
                await conn.execute("CHECKPOINT")  # the seed's writes are not the prune's
                seeded = time.perf_counter() - started
            finally:
                await conn.close()
            pruner = PostgresStore(url, history=True, history_retention=7 * 86_400.0)
            await pruner.start("bench-pruner")
            runs: dict[str, list[Result]] = {"alone": [], "pruning": []}
            pruning_seconds = 0.0
            try:
                for mode in abba(("alone", "pruning"), cfg.prune_rounds):
                    task = asyncio.create_task(pruner.prune()) if mode == "pruning" else None
                    window = time.perf_counter()
                    base = {
                        "system": f"outbox, history on, {mode}",
                        "broker": broker,
                        "events": cfg.prune_drain_events,
                    }
                    run = functools.partial(
                        _drain_history, ctx, url, broker, cfg.prune_drain_events
                    )
                    result = await guarded(ctx, f"drain {base['system']}", run, base)
                    if task is not None:
                        result["prune_finished_first"] = task.done()
                        task.cancel()
                        await asyncio.gather(task, return_exceptions=True)
                        pruning_seconds += time.perf_counter() - window
                    runs[mode].append(result)
                during = pruner.pruned.get("outbox_delivered")
                rows_during = during.rows if during else 0
                rest = time.perf_counter()
                await pruner.prune()
                rest_seconds = time.perf_counter() - rest
                totals = pruner.pruned.get("outbox_delivered")
            finally:
                await pruner.stop()
            left = await _count_rows(url, "outbox_delivered")
        out += [median_run(r) for r in runs.values()]
        out.append(
            {
                "system": "prune outbox_delivered",
                "broker": broker,
                "history_rows": cfg.prune_history_rows,
                "seed_seconds": round(seeded, 1),
                "rows_during_drains": rows_during,
                "seconds_during_drains": round(pruning_seconds, 1),
                "rows_deleted": totals.rows if totals else None,
                "prune_seconds": round(pruning_seconds + rest_seconds, 1),
                "rows_left": left,  # the drains' own history: not expired
                "statements": totals.statements if totals else None,
                "longest_statement_ms": round(totals.longest * 1000, 1) if totals else None,
                "statements_over_100ms": totals.slow if totals else None,
                "longest_round_trip_ms": round(totals.longest_round_trip * 1000, 1)
                if totals
                else None,
            }
        )
    return out


async def _count_rows(url: str, table: str) -> int:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        count: int = await conn.fetchval(f"SELECT count(*) FROM {table}")
    finally:
        await conn.close()
    return count


async def _drain_history(ctx: Context, url: str, broker: Broker, size: int) -> Result:
    """Seed `size` events into `url` and drain them with history on (no pruning of its own)."""
    topic, _ = await _seeded(ctx, url, broker, size, f"prune-{broker}")
    try:
        started = time.perf_counter()
        relay = _relay(ctx, url, broker, f"bench-prune-{uuid.uuid4().hex[:4]}", history="on")
        async with asyncio.timeout(ctx.config.drain_timeout):
            stats = await relay.drain()
        seconds = time.perf_counter() - started
    finally:
        await ctx.ops.cleanup(broker, topic)
    return {"seconds": round(seconds, 3), "events_per_s": rate(stats.delivered, seconds)}


def median_run(runs: list[Result]) -> Result:
    """The run with the median rate, with every run's rate beside it."""
    ok = sorted((r for r in runs if "error" not in r), key=lambda r: r["events_per_s"])
    if not ok:
        return runs[-1]
    chosen = dict(ok[(len(ok) - 1) // 2])
    chosen["runs_events_per_s"] = [r.get("events_per_s") for r in runs]
    return chosen


async def _seeded(
    ctx: Context, url: str, broker: Broker, size: int, label: str
) -> tuple[str, float]:
    topic = ctx.topic(label)
    await ctx.ops.prepare(broker, topic)
    started = time.perf_counter()
    await seed_outbox(url, size, topic, ctx.config.keys)
    return topic, time.perf_counter() - started


async def _drain_outbox(
    ctx: Context,
    broker: Broker,
    size: int,
    waiting: int = 0,
    metrics: str = "on",
    envelope: EnvelopeMode = "plain",
    history: Literal["off", "on"] = "off",
) -> Result:
    """`metrics`: "on" (kept, not scraped: the default relay), "off" (recording replaced by
    no-ops) or "scraped" (also served over HTTP and scraped every second). `envelope`: the
    relay's envelope mode. `history`: the relay's setting (on: delivered rows are kept)."""
    async with ctx.dbs.fresh() as url:
        topic, seed_seconds = await _seeded(ctx, url, broker, size, f"drain-{broker}")
        if waiting:
            await seed_waiting(url, waiting, topic)
        try:
            async with scraper(metrics) as port:
                await asyncio.sleep(0.5 if port else 0)  # the scraper's Python has started
                cpu, busy = cpu_self(), machine_busy()
                started = time.perf_counter()
                relay = _relay(ctx, url, broker, "bench-drain", envelope=envelope, history=history)
                async with (
                    asyncio.timeout(ctx.config.drain_timeout),
                    metrics_mode(relay, metrics, port),
                ):
                    stats = await relay.drain()
                    seconds = time.perf_counter() - started  # not the metrics server's shutdown
                    cpu, busy = cpu_self() - cpu, machine_busy() - busy
            delivered = await ctx.ops.delivered(broker, topic)
            table = await table_stats(url, "outbox_events")
        finally:
            await ctx.ops.cleanup(broker, topic)
    return {
        "seconds": round(seconds, 3),
        "events_per_s": rate(stats.delivered, seconds),
        "relayed": stats.delivered,
        "delivered": delivered,
        "batches": stats.batches,
        "cpu_seconds": round(cpu, 2),
        "cpu_s_per_10k": round(cpu / max(1, stats.delivered) * 10_000, 3),
        # The relay, Postgres, the broker and the kernel: what a CPU-bound drain divides.
        "machine_cpu_us_per_event": round(busy / max(1, stats.delivered) * 1e6, 1),
        "seed_seconds": round(seed_seconds, 2),
        "dead_tuples": table.get("n_dead_tup"),
        "live_tuples": table.get("n_live_tup"),
        "table_bytes": table.get("total_bytes"),
    }


def _relay(ctx: Context, url: str, broker: Broker, relay_id: str, **options: Any) -> Relay:
    """The relay as the harness runs it in its own process, on the shared services."""
    return build_relay(
        RelaySettings(
            database_url=url,
            broker=broker,
            kafka_bootstrap=ctx.services.kafka_bootstrap,
            redis_url=ctx.services.redis_url,
            relay_id=relay_id,
            **options,
        )
    )


async def _drain_naive(ctx: Context, broker: Broker, size: int, lean: bool = False) -> Result:
    """The naive floor, or with `lean` the lean ceiling (bench/lean_relay.py)."""
    async with ctx.dbs.fresh() as url:
        label = f"{'lean' if lean else 'naive'}-{broker}"
        topic, seed_seconds = await _seeded(ctx, url, broker, size, label)
        try:
            cpu = cpu_self()
            started = time.perf_counter()
            async with asyncio.timeout(ctx.config.drain_timeout):
                relayed = await naive_relay.run(
                    url,
                    broker,
                    kafka_bootstrap=ctx.services.kafka_bootstrap,
                    redis_url=ctx.services.redis_url,
                    until_empty=True,
                    lean=lean,
                )
            seconds = time.perf_counter() - started
            cpu = cpu_self() - cpu
            delivered = await ctx.ops.delivered(broker, topic)
        finally:
            await ctx.ops.cleanup(broker, topic)
    return {
        "seconds": round(seconds, 3),
        "events_per_s": rate(relayed, seconds),
        "relayed": relayed,
        "delivered": delivered,
        "cpu_seconds": round(cpu, 2),
        "cpu_s_per_10k": round(cpu / max(1, relayed) * 10_000, 3),
        "seed_seconds": round(seed_seconds, 2),
    }


async def _drain_faststream(ctx: Context, broker: Broker, size: int, preset: str) -> Result:
    async with ctx.dbs.fresh() as url:
        topic = ctx.topic(f"fs-{broker}")
        await ctx.ops.prepare(broker, topic)
        try:
            await seed_faststream(url, faststream_runner.TABLE, size, faststream_runner.QUEUE)
            cpu = cpu_self()
            async with asyncio.timeout(ctx.config.drain_timeout):
                seconds = await faststream_runner.drain(
                    url,
                    broker,
                    topic=topic,
                    preset=preset,
                    bootstrap=ctx.services.kafka_bootstrap,
                    redis_url=ctx.services.redis_url,
                    count=size,
                )
            cpu = cpu_self() - cpu
            delivered = await ctx.ops.delivered(broker, topic)
            table = await table_stats(url, faststream_runner.TABLE)
        finally:
            await ctx.ops.cleanup(broker, topic)
    return {
        "seconds": round(seconds, 3),
        "events_per_s": rate(size, seconds),
        "delivered": delivered,
        "cpu_seconds": round(cpu, 2),
        "cpu_s_per_10k": round(cpu / size * 10_000, 3),
        "dead_tuples": table.get("n_dead_tup"),
        "table_bytes": table.get("total_bytes"),
        "settings": faststream_runner.PRESETS[preset] or "package defaults",
    }


# -- writers -----------------------------------------------------------------------------------


def spawn_writers(
    ctx: Context,
    url: str,
    modes: str,
    *,
    target_rate: float,
    seconds: float,
    topic: str,
    concurrency: int | None = None,
    business: str = "order",
    warmup: float = 0.0,
    lead_in: float = 0.0,
) -> list[tuple[Proc, Path]]:
    """Writer processes (one per `writer_process_rate` tx/s, at most `max_writer_processes`),
    each waiting for `go()`, on the harness's event loop."""
    per_process = (
        ctx.config.sql_writer_process_rate if "-sql" in modes else ctx.config.writer_process_rate
    )
    needed = math.ceil(target_rate / per_process)
    procs = 1 if target_rate <= 0 else min(ctx.config.max_writer_processes, needed)
    per_proc = target_rate / procs
    width = concurrency or max(4, min(64, math.ceil(per_proc / 50)))
    running: list[tuple[Proc, Path]] = []
    for i in range(procs):
        out = ctx.tmp / f"writer-{uuid.uuid4().hex[:8]}.json"
        argv = module_argv(
            "bench.writer",
            *("--database-url", url, "--mode", modes, "--rate", str(per_proc)),
            *("--duration", str(seconds), "--concurrency", str(width), "--topic", topic),
            *("--keys", str(ctx.config.keys), "--offset", str(i * 10_000_000)),
            *("--business", business, "--warmup", str(warmup), "--lead-in", str(lead_in)),
            *("--event-loop", ctx.config.event_loop),
            *("--out", str(out), "--go"),
        )
        running.append((Proc(argv, out.with_suffix(".log"), stdin=True), out))
    return running


async def collect_writers(running: list[tuple[Proc, Path]], timeout: float) -> list[Result]:
    """Start the writers together; returns every run of every writer."""
    for proc, _ in running:
        proc.go()
    runs: list[Result] = []
    for proc, out in running:
        code = await proc.wait(timeout)
        if code != 0:
            raise RuntimeError(f"writer exited {code}: {proc.tail()}")
        runs.extend(json.loads(out.read_text()))
    return runs


def _split_at_the_broker(commits: dict[str, list[float]], receiver: Receiver) -> Result:
    """Kafka: each event's path cut where the broker appended it (`LogAppendTime`, to the ms:
    the first part reads up to 1 ms short, the second up to 1 ms long)."""
    both = [k for k in commits if k in receiver.appended and k in receiver.receipts]
    if not both:
        return {}
    return {
        "commit_to_broker": _latency_summary([receiver.appended[k] - commits[k][1] for k in both]),
        "broker_to_consumer": _latency_summary(
            [receiver.receipts[k] - receiver.appended[k] for k in both]
        ),
    }


def _latency_summary(values: list[float]) -> Result:
    ordered = sorted(v * 1000 for v in values)
    return {
        "mean_ms": round(sum(ordered) / len(ordered), 3) if ordered else None,
        "p50_ms": round(percentile(ordered, 50), 3),
        "p95_ms": round(percentile(ordered, 95), 3),
        "p99_ms": round(percentile(ordered, 99), 3),
        "max_ms": round(ordered[-1], 3) if ordered else None,
    }


async def overhead(ctx: Context) -> list[Result]:
    """Closed-loop writers, with and without an OutboxEvent, alternating; no relay running."""
    result = await guarded(
        ctx, "writer overhead", functools.partial(_overhead, ctx), {"workload": "overhead"}
    )
    return [result]


#: Per business transaction (see bench/writer.py), the modes run alternately in one writer.
OVERHEAD_MODES = {
    "order": (
        "plain",
        "outbox",
        "enqueue",
        "outbox-nonotify",
        "plain-sql",
        "outbox-sql",
        "outbox-sql-nonotify",
    ),
    "checkout": ("plain", "outbox", "enqueue", "outbox-nonotify"),
}


async def _overhead(ctx: Context) -> Result:
    cfg = ctx.config
    summary: Result = {"concurrency": cfg.overhead_concurrency, "seconds": cfg.overhead_seconds}
    for business, modes in OVERHEAD_MODES.items():
        async with ctx.dbs.fresh() as url:
            writers = spawn_writers(
                ctx,
                url,
                ",".join(abba(modes, cfg.overhead_rounds)),
                target_rate=0,
                seconds=cfg.overhead_seconds,
                topic="bench-overhead",
                concurrency=cfg.overhead_concurrency,
                business=business,
                warmup=cfg.overhead_warmup_seconds,
            )
            timeout = 60 + (
                cfg.overhead_seconds * cfg.overhead_rounds + cfg.overhead_warmup_seconds
            ) * len(modes)
            done = await collect_writers(writers, timeout)
        summary[business] = _overhead_summary(done, modes)
    return summary


def abba(modes: tuple[str, ...], rounds: int) -> list[str]:
    """Every other round reversed (A B B A ...): a steady drift (a table that grows, a cache
    that warms) then weighs on every mode alike instead of on the last ones."""
    return [m for r in range(rounds) for m in (modes if r % 2 == 0 else modes[::-1])]


def _overhead_summary(done: list[Result], modes: tuple[str, ...]) -> Result:
    """Each mode's figures, and each variant's added latency and throughput loss vs `plain`."""
    summary: Result = {}
    for mode in modes:
        outputs = [r for r in done if r["mode"] == mode]
        durations = [d for o in outputs for d in o["durations"]]
        elapsed = sum(o["ended"] - o["started"] for o in outputs)
        cpu = sum(o["cpu_seconds"] for o in outputs)
        summary[mode] = {
            "transactions": len(durations),
            "tx_per_s": rate(len(durations), elapsed),
            "writer_cpu_ms_per_tx": round(cpu / max(1, len(durations)) * 1000, 3),
            "writer_cpu_pct": round(cpu / elapsed * 100, 1),
            "errors": sum(o["errors"] for o in outputs),
            **_latency_summary(durations),
        }
    for mode in modes:
        base = summary["plain-sql" if "-sql" in mode else "plain"]
        if mode in ("plain", "plain-sql"):
            continue
        ran = summary[mode]
        ran["added_latency_pct"] = round((ran["mean_ms"] / base["mean_ms"] - 1) * 100, 1)
        ran["added_p50_ms"] = round(ran["p50_ms"] - base["p50_ms"], 3)
        ran["throughput_loss_pct"] = round((1 - ran["tx_per_s"] / base["tx_per_s"]) * 100, 1)
        ran["added_cpu_ms_per_tx"] = round(
            ran["writer_cpu_ms_per_tx"] - base["writer_cpu_ms_per_tx"], 3
        )
    return summary


# -- latency -----------------------------------------------------------------------------------


async def latency(ctx: Context) -> list[Result]:
    results: list[Result] = []
    cfg = ctx.config
    quiet = f"outbox, notify off, poll {cfg.quiet_poll_interval * 1000:.0f} ms"
    for broker in cfg.brokers:
        # (system, rate, label, what runs): one row each; a rate of 0 leaves the row out.
        runs: list[tuple[str, int, str, dict[str, Any]]] = [
            ("outbox", target, f"outbox {broker} {target}/s", {"mode": "outbox"})
            for target in cfg.latency_rates
        ]
        runs += [
            # Diagnostic, not the product as shipped: the same relay with Postgres JIT off
            # for the database (JIT compiling the claim query stalls it for ~0.2 s a time).
            (
                "outbox, jit=off",
                cfg.latency_jit_off_rate,
                f"outbox {broker} {cfg.latency_jit_off_rate}/s, Postgres jit=off",
                {"mode": "outbox", "jit_off": True},
            ),
            # The documented setting for write-heavy databases: no NOTIFY, paced polls.
            (
                quiet,
                cfg.latency_quiet_rate,
                f"{quiet} {broker} {cfg.latency_quiet_rate}/s",
                {"mode": "outbox", "quiet": True},
            ),
            (
                "faststream-tuned",
                cfg.faststream_latency_rate,
                f"faststream-outbox (tuned) {broker} {cfg.faststream_latency_rate}/s",
                {"mode": "faststream"},
            ),
        ]
        for system, target, label, how in runs:
            if not target:
                continue
            base = {"system": system, "broker": broker, "target_rate": target}
            results.append(
                await guarded(
                    ctx,
                    f"latency {label}",
                    functools.partial(_latency, ctx, broker, target, **how),
                    base,
                )
            )
        for target in cfg.latency_floor_rates:
            base = {"system": FLOOR, "broker": broker, "target_rate": target}
            results.append(
                await guarded(
                    ctx,
                    f"latency {FLOOR} {broker} {target}/s",
                    functools.partial(_broker_floor, ctx, broker, target),
                    base,
                )
            )
    return results


async def _broker_floor(ctx: Context, broker: Broker, target: int) -> Result:
    """Send -> consumer for records sent straight to the broker, one at a time, at `target`/s:
    the part of a commit -> consumer latency that is the broker's and the consumer's."""
    cfg = ctx.config
    topic = ctx.topic(f"floor-{broker}")
    await ctx.ops.prepare(broker, topic)
    receiver = Receiver(ctx.services, broker, topic)
    consumer = asyncio.create_task(receiver.run())
    out = ctx.tmp / f"floor-{uuid.uuid4().hex[:8]}.json"
    argv = module_argv(
        "bench.broker_floor",
        *("--broker", broker, "--topic", topic, "--rate", str(target)),
        *("--seconds", str(cfg.latency_seconds), "--lead-in", str(cfg.latency_lead_in)),
        *("--keys", str(cfg.keys), "--out", str(out)),
        *("--kafka-bootstrap", ctx.services.kafka_bootstrap),
        *("--redis-url", ctx.services.redis_url),
    )
    proc: Proc | None = None
    try:
        async with asyncio.timeout(30):
            await receiver.ready.wait()
        await write_back_dirty_pages()
        proc = Proc(argv, out.with_suffix(".log"))
        code = await proc.wait(cfg.latency_lead_in + cfg.latency_seconds + 60)
        if code != 0:
            raise RuntimeError(f"broker floor exited {code}: {proc.tail()}")
        done = json.loads(out.read_text())
        sent: dict[str, float] = done["sent"]

        async def all_received() -> bool:
            return sent.keys() <= receiver.receipts.keys()

        with contextlib.suppress(TimeoutError):
            await poll(all_received, 0.05, 15)
    finally:
        receiver.stop()
        await asyncio.gather(consumer, return_exceptions=True)
        if proc is not None:
            await proc.stop()
        await ctx.ops.cleanup(broker, topic)
    lat = [receiver.receipts[k] - at for k, at in sent.items() if k in receiver.receipts]
    return {
        "achieved_rate": rate(len(sent), done["ended"] - done["started"]),
        "committed": len(sent),
        "received": len(lat),
        "missing": len(sent) - len(lat),
        **_latency_summary(lat),
        "cdf_ms": cdf_points(sorted(v * 1000 for v in lat)),
    }


async def write_back_dirty_pages() -> float:
    """Have the kernel write its dirty pages to disk now (`sync`); returns the seconds it took.
    A latency run measures the steady state of its own load, not the write-back of what the
    drains before it left in the page cache (185 MB two minutes after them, measured): a disk
    busy writing back stalls Kafka's appends (p99 at 100/s 5.0 ms while a 4 GB file was
    written, 2.2 ms without)."""
    started = time.perf_counter()
    await asyncio.to_thread(os.sync)
    return time.perf_counter() - started


async def start_relay(ctx: Context, url: str, broker: Broker, relay_id: str, *extra: str) -> Proc:
    """`outbox-relay run` in a child process, returned once it has registered itself."""
    proc = Proc(
        relay_argv(url, broker, ctx.services, relay_id, *extra), ctx.tmp / f"{relay_id}.log"
    )
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with asyncio.timeout(30):
            while not await conn.fetchval(
                "SELECT count(*) FROM outbox_relays WHERE relay_id = $1", relay_id
            ):
                if not proc.alive():
                    raise RuntimeError(f"relay exited: {proc.tail()}")
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    await asyncio.sleep(0.5)  # its publisher connects right after it registers
    return proc


async def start_faststream(ctx: Context, url: str, broker: Broker, topic: str) -> Proc:
    """faststream-outbox's relay in a child process, returned once its LISTEN is up."""
    argv = module_argv(
        "bench.faststream_runner",
        "--database-url",
        url,
        "--broker",
        broker,
        "--topic",
        topic,
        "--preset",
        "tuned",
        "--kafka-bootstrap",
        ctx.services.kafka_bootstrap,
        "--redis-url",
        ctx.services.redis_url,
    )
    proc = Proc(argv, ctx.tmp / f"faststream-{topic}.log")
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with asyncio.timeout(30):
            while not await conn.fetchval(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND query ILIKE 'LISTEN%'"
            ):
                if not proc.alive():
                    raise RuntimeError(f"faststream relay exited: {proc.tail()}")
                await asyncio.sleep(0.05)
    finally:
        await conn.close()
    await asyncio.sleep(0.5)
    return proc


async def _latency(
    ctx: Context,
    broker: Broker,
    target: int,
    mode: str,
    *,
    jit_off: bool = False,
    quiet: bool = False,
) -> Result:
    cfg = ctx.config
    async with ctx.dbs.fresh() as url:
        if jit_off:
            conn = await asyncpg.connect(asyncpg_dsn(url))
            try:
                name = await conn.fetchval("SELECT current_database()")
                await conn.execute(f'ALTER DATABASE "{name}" SET jit = off')
            finally:
                await conn.close()
        topic = ctx.topic(f"lat-{broker}")
        await ctx.ops.prepare(broker, topic, append_times=True)
        receiver = Receiver(ctx.services, broker, topic)
        consumer = asyncio.create_task(receiver.run())
        relay: Proc | None = None
        measuring: asyncio.Task[Result] | None = None
        writer_mode = f"{mode}-sql" if cfg.latency_writer == "sql" else mode
        if quiet:
            writer_mode += "-nonotify"
        flush_seconds = await write_back_dirty_pages()
        writers = spawn_writers(
            ctx,
            url,
            writer_mode,
            target_rate=target,
            seconds=cfg.latency_seconds,
            topic=topic,
            lead_in=cfg.latency_lead_in,
        )
        try:
            await asyncio.wait_for(receiver.ready.wait(), 30)
            if mode == "outbox":
                polling = ("--poll-interval", str(cfg.quiet_poll_interval)) if quiet else ()
                relay = await start_relay(ctx, url, broker, f"lat-{uuid.uuid4().hex[:6]}", *polling)
            else:
                relay = await start_faststream(ctx, url, broker, topic)
            cpu = CpuByRole(asyncpg_dsn(url), relay, [proc for proc, _ in writers])
            margin = min(0.5, cfg.latency_seconds / 10)  # the window ends before the writers
            measuring = asyncio.create_task(
                cpu.measure(cfg.latency_lead_in + margin, cfg.latency_seconds - 2 * margin)
            )
            outputs = await collect_writers(writers, cfg.latency_lead_in + cfg.latency_seconds + 60)
            used = await measuring
            commits: dict[str, list[float]] = {}
            for o in outputs:
                commits.update(o["commits"])

            async def all_received() -> bool:
                return commits.keys() <= receiver.receipts.keys()

            with contextlib.suppress(TimeoutError):
                await poll(all_received, 0.05, 15)
        finally:
            if measuring is not None and not measuring.done():
                measuring.cancel()
            receiver.stop()
            await asyncio.gather(consumer, return_exceptions=True)
            if relay is not None:
                await relay.stop()
            for proc, _ in writers:
                await proc.stop()
            await ctx.ops.cleanup(broker, topic)
    got = {k: receiver.receipts[k] for k in commits if k in receiver.receipts}
    lat = [got[k] - commits[k][1] for k in got]  # from COMMIT returned (the definition)
    from_sent = _latency_summary([got[k] - commits[k][0] for k in got])  # an upper bound
    started = min(o["started"] for o in outputs)
    ended = max(o["ended"] for o in outputs)
    achieved = rate(len(commits), ended - started)
    ordered = sorted(v * 1000 for v in lat)
    return {
        "writer": writer_mode,
        "achieved_rate": achieved,
        "writer_processes": len(outputs),
        "committed": len(commits),
        "received": len(lat),
        "missing": len(commits) - len(lat),
        "before_commit_returned": sum(1 for v in lat if v < 0),
        "writer_errors": sum(o["errors"] for o in outputs),
        "order_violations": receiver.order.violations,
        **_latency_summary(lat),
        "from_commit_sent": from_sent,
        **_split_at_the_broker(commits, receiver),
        "machine_busy_pct": used["machine_busy_pct"],
        "cpu_us_per_event": {
            role: round(seconds / max(1.0, used["window_s"] * achieved) * 1e6)
            for role, seconds in used["cpu_seconds"].items()
        },
        "cdf_ms": cdf_points(ordered),
        "dirty_pages_flush_s": round(flush_seconds, 2),
    }
