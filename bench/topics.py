"""The many-topics cliff: the same events over one topic and over a thousand pre-created
topics, each drained by a fresh `outbox-relay run` process, so the cold start (a producer
that knows no topic yet) is in every figure."""

from __future__ import annotations

import functools
import time
import uuid

import asyncpg

from bench.brokers import Broker
from bench.infra import is_empty, poll
from bench.procs import Proc, relay_argv
from bench.seed import seed_outbox
from bench.workloads import Context, Result, abba, guarded, median_run, rate
from outbox.urls import asyncpg_dsn


async def many_topics(ctx: Context) -> list[Result]:
    """Per broker: the topics are created (a record written to each partition), then on
    Kafka `topics_events` events are drained over the many topics once (the first drain after
    creating them), the broker is made to write the first index entries of the many topics'
    partitions, then the events are drained over 1 topic and over the many topics, A B B A;
    the median run of each is reported, and the first drain on its own row.

    The first drain is kept apart, and the first index entries are written before the runs
    compared, because both measure Kafka more than the relay: a produce request that crossed
    the first index entries of a thousand new topics' partitions took 5-14 s at the broker
    (`BrokerOps.write_first_index_entries`; docs/benchmarks.md, "Many topics"). Existing
    topics in production are past that."""
    cfg = ctx.config
    out: list[Result] = []
    for broker in cfg.brokers:
        many = ctx.topic(f"topics-{broker}")
        label_many = str(cfg.topics_count)
        sets = {
            "1": [ctx.topic(f"topics1-{broker}")],
            label_many: [f"{many}-{i}" for i in range(cfg.topics_count)],
        }
        try:
            started = time.perf_counter()
            for topics in sets.values():
                await ctx.ops.prepare_many(broker, topics)
            ctx.log(f"topics {broker}: created and ready in {time.perf_counter() - started:.1f}s")
            # Redis streams are created by their first entry: no first drain to set apart.
            order = [("new", label_many)] if broker == "kafka" else []
            order += [("existing", label) for label in abba(tuple(sets), cfg.topics_rounds)]
            runs: dict[tuple[str, str], list[Result]] = {}
            warmed: float | None = None
            for age, label in order:
                topics = sets[label]
                if broker == "kafka" and age == "existing" and warmed is None:
                    warmed = await ctx.ops.write_first_index_entries(sets[label_many])
                    ctx.log(f"topics {broker}: first index entries written in {warmed:.1f}s")
                system = f"outbox, {label} topic" if len(topics) == 1 else f"outbox, {label} topics"
                base = {
                    "system": system
                    + (", first drain after creating them" if age == "new" else ""),
                    "broker": broker,
                    "events": cfg.topics_events,
                    "topics": len(topics),
                    "first_drain": age == "new",
                    "index_warmup_s": None if warmed is None else round(warmed, 1),
                }
                run = functools.partial(_drain_topics, ctx, broker, cfg.topics_events, topics)
                runs.setdefault((age, label), []).append(
                    await guarded(ctx, f"drain {base['system']} {broker}", run, base)
                )
            out += [median_run(r) for r in runs.values()]
        finally:
            for topics in sets.values():
                await ctx.ops.cleanup_many(broker, topics)
    return out


async def _drain_topics(ctx: Context, broker: Broker, size: int, topics: list[str]) -> Result:
    """Seed, start `outbox-relay run`, wait until the outbox is empty, stop it. The rate is
    from the relay's registration (before its publisher starts) to the empty outbox."""
    async with ctx.dbs.fresh() as url:
        await seed_outbox(url, size, topics[0], ctx.config.keys, topics=topics)
        before = await ctx.ops.delivered_many(broker, topics)
        relay_id = f"topics-{uuid.uuid4().hex[:6]}"
        conn = await asyncpg.connect(asyncpg_dsn(url))
        spawned = time.perf_counter()
        proc = Proc(relay_argv(url, broker, ctx.services, relay_id), ctx.tmp / f"{relay_id}.log")
        try:

            async def registered() -> bool:
                if not proc.alive():
                    raise RuntimeError(f"relay exited: {proc.tail()}")
                found = await conn.fetchval(
                    "SELECT count(*) FROM outbox_relays WHERE relay_id = $1", relay_id
                )
                return bool(found)

            async def empty() -> bool:
                if not proc.alive():
                    raise RuntimeError(f"relay exited: {proc.tail()}")
                return await is_empty(conn, "outbox_events", "id")

            await poll(registered, 0.01, 30)
            up = time.perf_counter()
            await poll(empty, 0.01, ctx.config.drain_timeout)
            done = time.perf_counter()
        finally:
            await conn.close()
            await proc.stop()
        delivered = await ctx.ops.delivered_many(broker, topics) - before
    return {
        "seconds": round(done - up, 3),
        "events_per_s": rate(size, done - up),
        "startup_s": round(up - spawned, 2),
        "delivered": delivered,
    }
