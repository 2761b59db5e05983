"""The wake-up's cost to writers: many raw asyncpg writers, one event per transaction, with the
insert trigger's NOTIFY on (the default, at most two notifying transactions at a time) and off
(`outbox.notify = off`), in A B B A order."""

from __future__ import annotations

import asyncio
import functools
import time
import uuid
from typing import Any

import asyncpg

from bench.workloads import Context, Result, abba, guarded, percentile
from outbox.urls import asyncpg_dsn

INSERT = (
    "INSERT INTO outbox_events (id, topic, key, payload) VALUES ($1, 'notify-bench', $2, "
    "'{\"order_id\": 1}')"
)


async def notify_cost(ctx: Context) -> list[Result]:
    cfg = ctx.config
    runs: dict[str, list[Result]] = {"off": [], "on": []}
    for mode in abba(("off", "on"), cfg.notify_rounds):
        base = {"system": f"writers, notify {mode}", "writers": cfg.notify_writers}
        run = functools.partial(_write, ctx, mode)
        label = f"{cfg.notify_writers} writers, notify {mode}"
        runs[mode].append(await guarded(ctx, label, run, base))
    out = []
    for mode, results in runs.items():
        ok = [r for r in results if "error" not in r]
        if not ok:
            out.append(results[-1])
            continue
        out.append(
            {
                "system": f"writers, notify {mode}",
                "writers": cfg.notify_writers,
                "tx_per_s": round(sum(r["tx_per_s"] for r in ok) / len(ok)),
                "p50_ms": round(sum(r["p50_ms"] for r in ok) / len(ok), 2),
                "p99_ms": round(sum(r["p99_ms"] for r in ok) / len(ok), 2),
                "runs_tx_per_s": [r["tx_per_s"] for r in ok],
            }
        )
    return out


async def _write(ctx: Context, mode: str) -> Result:
    cfg = ctx.config
    async with ctx.dbs.fresh() as url:
        setting = {"outbox.notify": "off" if mode == "off" else "on"}
        conns = [
            await asyncpg.connect(asyncpg_dsn(url), server_settings=setting)
            for _ in range(cfg.notify_writers)
        ]
        listener = await asyncpg.connect(asyncpg_dsn(url))  # as a relay would: LISTENing
        await listener.add_listener("outbox_events", _ignore)
        stop = asyncio.Event()
        durations: list[float] = []

        async def writer(conn: asyncpg.Connection) -> None:
            while not stop.is_set():
                started = time.perf_counter()
                async with conn.transaction():
                    await conn.execute(INSERT, uuid.uuid4(), uuid.uuid4().hex)
                durations.append(time.perf_counter() - started)

        try:
            tasks = [asyncio.create_task(writer(c)) for c in conns]
            await asyncio.sleep(cfg.notify_seconds)
            stop.set()
            await asyncio.gather(*tasks)
        finally:
            for conn in [*conns, listener]:
                await conn.close()
    durations.sort()
    return {
        "tx_per_s": round(len(durations) / cfg.notify_seconds),
        "p50_ms": round(percentile(durations, 50) * 1000, 2),
        "p99_ms": round(percentile(durations, 99) * 1000, 2),
    }


def _ignore(*_: Any) -> None:
    return None
