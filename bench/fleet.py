"""Workloads on relay processes: cost per event, scale-out with per-key order, profile.

Relays start on an empty table and settle first; the events then arrive in one COPY
transaction, and the clock runs from its commit until the table is empty again.
"""

from __future__ import annotations

import asyncio
import collections
import functools
import re
import signal
import subprocess
import time
import uuid
from pathlib import Path
from typing import Any

import asyncpg

from bench.brokers import Broker
from bench.infra import poll, table_stats
from bench.procs import VENV_BIN, Proc, ServerCpu, module_argv
from bench.seed import seed_outbox
from bench.workloads import Context, Result, guarded, rate, start_relay, wait_until_empty
from outbox.urls import asyncpg_dsn


async def _seed_and_drain(
    ctx: Context, url: str, topic: str, events: int, procs: list[Proc]
) -> Result:
    """Seed `events` under running relays; time commit -> empty; CPU of relays and servers."""
    marks: dict[str, Any] = {}
    servers = ServerCpu()

    def committed() -> None:
        marks["t0"] = time.perf_counter()
        marks["cpu0"] = sum(p.cpu_seconds() for p in procs)
        servers.start()

    await seed_outbox(url, events, topic, ctx.config.keys, on_commit=committed)
    ended = await wait_until_empty(url, "outbox_events", "seq", ctx.config.drain_timeout)
    relay_cpu = sum(p.cpu_seconds() for p in procs) - marks["cpu0"]
    seconds = ended - marks["t0"]
    return {
        "seconds": round(seconds, 3),
        "events_per_s": rate(events, seconds),
        "relay_cpu_seconds": round(relay_cpu, 2),
        "relay_cpu_s_per_10k": round(relay_cpu / events * 10_000, 3),
        "relay_cpu_util_pct": round(relay_cpu / seconds * 100, 1),
        "server_cpu_seconds": servers.stop(),
    }


# -- cost --------------------------------------------------------------------------------------


async def cost(ctx: Context) -> list[Result]:
    results = []
    for broker in ctx.config.brokers:
        base = {"system": "outbox", "broker": broker, "events": ctx.config.cost_events}
        results.append(
            await guarded(
                ctx, f"cost outbox-relay {broker}", functools.partial(_cost, ctx, broker), base
            )
        )
    return results


async def _cost(ctx: Context, broker: Broker) -> Result:
    events = ctx.config.cost_events
    async with ctx.dbs.fresh() as url:
        topic = ctx.topic(f"cost-{broker}")
        await ctx.ops.prepare(broker, topic)
        relay = await start_relay(ctx, url, broker, f"cost-{uuid.uuid4().hex[:6]}")
        try:
            result = await _seed_and_drain(ctx, url, topic, events, [relay])
            result["peak_rss_mb"] = round(relay.peak_rss_mb(), 1)
            result["delivered"] = await ctx.ops.delivered(broker, topic)
        finally:
            await relay.stop()
            await ctx.ops.cleanup(broker, topic)
        await asyncio.sleep(0.5)  # the relay's backends report their stats as they exit
        table = await table_stats(url, "outbox_events")
    result["dead_tuples"] = table.get("n_dead_tup")
    result["table_bytes"] = table.get("total_bytes")
    result["autovacuum_runs"] = table.get("autovacuum_count")
    return result


# -- scale-out ---------------------------------------------------------------------------------


async def scaleout(ctx: Context) -> list[Result]:
    """Redis only: several relays on one table; per-key order checked on the whole stream."""
    results = []
    for n in ctx.config.scale_relays:
        base = {"system": "outbox", "broker": "redis", "relays": n}
        results.append(
            await guarded(
                ctx, f"scale-out {n} relay(s)", functools.partial(_scale, ctx, n, naive=False), base
            )
        )
    for n in ctx.config.naive_scale:
        base = {"system": "naive", "broker": "redis", "relays": n}
        results.append(
            await guarded(
                ctx, f"scale-out naive x{n}", functools.partial(_scale, ctx, n, naive=True), base
            )
        )
    return results


async def _wait_balanced(url: str, relays: int) -> None:
    """Until every relay holds its fair share of the 64 buckets."""
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        async with asyncio.timeout(60):
            while True:
                rows = await conn.fetch(
                    "SELECT owner, count(*) AS n FROM outbox_bucket_leases "
                    "WHERE owner IS NOT NULL AND lease_until > now() GROUP BY owner"
                )
                shares = sorted(r["n"] for r in rows)
                if len(shares) == relays and sum(shares) == 64 and shares[-1] - shares[0] <= 1:
                    return
                await asyncio.sleep(0.1)
    finally:
        await conn.close()


async def _wait_connected(url: str, processes: int) -> None:
    """Until `processes` other sessions are connected to the database (naive relays)."""
    conn = await asyncpg.connect(asyncpg_dsn(url))

    async def connected() -> bool:
        count: int = await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE datname = current_database() AND pid <> pg_backend_pid()"
        )
        return count >= processes

    try:
        await poll(connected, 0.05, 30)
    finally:
        await conn.close()
    await asyncio.sleep(0.2)  # the Redis client connects lazily, on its first batch


async def _scale(ctx: Context, n: int, *, naive: bool) -> Result:
    events = ctx.config.scale_events
    async with ctx.dbs.fresh() as url:
        topic = ctx.topic(f"scale{n}")
        await ctx.ops.prepare("redis", topic)
        procs: list[Proc] = []
        try:
            if naive:
                for i in range(n):
                    argv = module_argv(
                        "bench.naive_relay",
                        "--database-url",
                        url,
                        "--broker",
                        "redis",
                        "--redis-url",
                        ctx.services.redis_url,
                    )
                    procs.append(Proc(argv, ctx.tmp / f"naive-{topic}-{i}.log"))
                await _wait_connected(url, n)
            else:
                # Short leases: rebalancing (every lease/3 s) settles in seconds, not 15+.
                for i in range(n):
                    relay_id = f"r{i + 1}-{uuid.uuid4().hex[:4]}"
                    short_leases = ("--lease-seconds", "3")
                    procs.append(await start_relay(ctx, url, "redis", relay_id, *short_leases))
                await _wait_balanced(url, n)
            result = await _seed_and_drain(ctx, url, topic, events, procs)
            result["peak_rss_mb"] = round(max(p.peak_rss_mb() for p in procs), 1)
            order = await ctx.ops.check_stream_order(topic)
            result.update(order.summary())
        finally:
            await asyncio.gather(*(p.stop() for p in procs))
            await ctx.ops.cleanup("redis", topic)
    return result


# -- profile -----------------------------------------------------------------------------------

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")
_IDLE = ("select (selectors.py)", "poll (selectors.py)", "epoll")


async def profile(ctx: Context) -> list[Result]:
    results = []
    for broker in ctx.config.brokers:
        base = {"system": "outbox", "broker": broker, "events": ctx.config.profile_events}
        results.append(
            await guarded(
                ctx, f"profile a {broker} drain", functools.partial(_profile, ctx, broker), base
            )
        )
    return results


async def _profile(ctx: Context, broker: Broker) -> Result:
    py_spy = VENV_BIN / "py-spy"
    if not py_spy.exists():
        return {"error": "py-spy is not installed (pip install py-spy)"}
    raw = ctx.tmp / f"profile-{uuid.uuid4().hex[:6]}.txt"
    async with ctx.dbs.fresh() as url:
        topic = ctx.topic(f"profile-{broker}")
        await ctx.ops.prepare(broker, topic)
        # On asyncio's loop: py-spy sees Python frames only, and uvloop's run, callbacks and
        # idle waits are C (all of it showed as one "event loop" frame, idle not told apart).
        relay = await start_relay(
            ctx, url, broker, f"prof-{uuid.uuid4().hex[:6]}", "--event-loop", "asyncio"
        )
        spy = await asyncio.create_subprocess_exec(
            *[str(py_spy), "record", "--pid", str(relay.pid), "--idle", "--nonblocking"],
            *["--rate", "250", "--format", "raw", "--output", str(raw)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        try:
            await asyncio.sleep(1.0)  # py-spy attaches
            result = await _seed_and_drain(ctx, url, topic, ctx.config.profile_events, [relay])
        finally:
            spy.send_signal(signal.SIGINT)
            await asyncio.wait_for(spy.wait(), 30)
            await relay.stop()
            await ctx.ops.cleanup(broker, topic)
    result.update(summarize_profile(raw))
    result["raw_profile"] = str(raw)
    return result


def _frame_name(frame: str) -> str:
    """`func (path/file.py:12)` -> `func (path/file.py)`: functions, not lines."""
    match = _FRAME.match(frame)
    return f"{match.group('func')} ({match.group('file')})" if match else frame


COMPONENTS = (
    ("relay/", "relay + outbox code"),
    ("outbox/", "relay + outbox code"),
    ("relay/publishers/redis.py", "relay + outbox code"),
    ("redis/", "redis-py client"),
    ("asyncpg/", "asyncpg driver"),
    ("aiokafka/", "aiokafka client"),
    ("asyncio/", "asyncio event loop"),
    ("selectors.py", "asyncio event loop"),
    ("json/", "json"),
    ("structlog/", "structlog"),
    ("<string>", "dataclass __init__"),
)


def _component(frame: str) -> str:
    for mark, name in COMPONENTS:
        if mark in frame:
            return name
    return "other"


def summarize_profile(raw: Path, top: int = 15) -> Result:
    """py-spy's collapsed stacks: idle share, then self time by component and function, and
    inclusive time of the relay's own functions, as % of busy (non-idle) samples."""
    self_time: collections.Counter[str] = collections.Counter()
    components: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    total = idle = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if "(" in f]
        if not frames:
            continue
        total += count
        if any(mark in frames[-1] for mark in _IDLE):
            idle += count
            continue
        self_time[frames[-1]] += count
        components[_component(frames[-1])] += count
        for name in set(frames):
            if ("relay/" in name or "outbox/" in name) and "cli.py" not in name:
                inclusive[name] += count
    busy = total - idle

    def share(counter: collections.Counter[str], n: int = top) -> list[list[Any]]:
        return [[name, round(c / max(1, busy) * 100, 1)] for name, c in counter.most_common(n)]

    return {
        "samples": total,
        "idle_pct_of_window": round(idle / max(1, total) * 100, 1),
        "self_by_component_pct_of_busy": share(components, len(components)),
        "top_self_pct_of_busy": share(self_time),
        "relay_inclusive_pct_of_busy": share(inclusive),
    }
