"""`python -m bench`: run the benchmarks, write latest.{md,json,png}.

Exits 1 if an experiment failed to run (so CI notices a rotting harness); missed targets are
reported, never a failure.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path

from bench import fleet, notify_cost, report, topics, workloads
from bench.brokers import BROKERS, Broker, BrokerOps
from bench.config import WORKLOADS, BenchConfig, full, quick, with_overrides
from bench.infra import REPO, Databases, Services, machine_facts, other_activity
from outbox.relay.cli import collect_less, loop_factory
from outbox.relay.logs import configure_logging
from outbox.relay.relay import event_loop_name

RESULTS = REPO / "bench" / "results"
Runner = Callable[[workloads.Context], Awaitable[list[workloads.Result]]]
RUNNERS: dict[str, Runner] = {
    "drain": workloads.drain,
    "overhead": workloads.overhead,
    "latency": workloads.latency,
    "cost": fleet.cost,
    "scaleout": fleet.scaleout,
    "profile": fleet.profile,
    "metrics": workloads.metrics_cost,
    "longtx": workloads.long_transaction,
    "notify": notify_cost.notify_cost,
    "envelope": workloads.envelope_cost,
    "history": workloads.history_cost,
    "prune": workloads.prune_cost,
    "topics": topics.many_topics,
}


def _size(text: str) -> int:
    text = text.strip().lower().replace("_", "")
    for suffix, factor in (("k", 1_000), ("m", 1_000_000)):
        if text.endswith(suffix):
            return int(float(text[:-1]) * factor)
    return int(text)


def _choices(text: str, allowed: tuple[str, ...], what: str) -> tuple[str, ...]:
    chosen = tuple(c.strip() for c in text.split(",") if c.strip())
    unknown = [c for c in chosen if c not in allowed]
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown {what}: {', '.join(unknown)}")
    return chosen


def parse_args(argv: list[str] | None = None) -> BenchConfig:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    parser.add_argument("--quick", action="store_true", help="toy sizes, < 60 s (CI)")
    parser.add_argument(
        "--only",
        type=lambda t: _choices(t, WORKLOADS, "workload"),
        help=f"comma-separated subset of: {','.join(WORKLOADS)}",
    )
    parser.add_argument(
        "--sizes",
        type=lambda t: tuple(_size(s) for s in t.split(",") if s.strip()),
        help="drain sizes, e.g. 10k,100k,1M",
    )
    parser.add_argument(
        "--brokers",
        type=lambda t: _choices(t, BROKERS, "broker"),
        help="comma-separated subset of: kafka,redis",
    )
    parser.add_argument("--out", type=Path, help="output directory")
    parser.add_argument(
        "--event-loop",
        choices=("auto", "uvloop", "asyncio"),
        default="auto",
        help="this process's event loop (auto: as `outbox-relay run` picks it)",
    )
    args = parser.parse_args(argv)
    out = args.out or (RESULTS / "quick" if args.quick else RESULTS)
    config = quick(out) if args.quick else full(out)
    brokers: tuple[Broker, ...] | None = args.brokers
    return with_overrides(
        config, workloads=args.only, brokers=brokers, sizes=args.sizes, event_loop=args.event_loop
    )


def _not_run(config: BenchConfig) -> dict[str, str]:
    notes = {"Debezium (embedded)": report.DEBEZIUM}
    for name in WORKLOADS:
        if name not in config.workloads:
            notes[name] = "not selected" + (" (skipped by --quick)" if config.quick else "")
    return notes


async def run(config: BenchConfig) -> dict[str, object]:
    services = Services.from_env()
    run_id = uuid.uuid4().hex[:6]
    tmp = RESULTS / "tmp" / run_id
    tmp.mkdir(parents=True, exist_ok=True)
    dbs = Databases(services.database_url, run_id)
    ctx = workloads.Context(services, dbs, BrokerOps(services), config, run_id, tmp)
    started = time.perf_counter()
    results: dict[str, object] = {
        "mode": "quick" if config.quick else "full",
        "config": {k: str(v) for k, v in vars(config).items()},
        "machine": await machine_facts(services),
        "other_activity": await other_activity(services.database_url, f"bench_{run_id}"),
        "load_average": os.getloadavg(),
        "event_loop": event_loop_name(),
    }
    ctx.log(f"run {run_id}: {', '.join(config.workloads)} -> {config.out}")
    try:
        await dbs.create_template()
        for name in WORKLOADS:
            if name in config.workloads:
                results[name] = await RUNNERS[name](ctx)
    finally:
        with contextlib.suppress(Exception):
            await dbs.drop_all()
    results["wall_seconds"] = round(time.perf_counter() - started, 1)
    results["not_run"] = _not_run(config)
    return results


def main(argv: list[str] | None = None) -> int:
    config = parse_args(argv)
    configure_logging("json", "warning")
    # The drains run in this process: with the collector and the event loop of `outbox-relay
    # run`, for every system measured here alike (docs/benchmarks.md, "Garbage collection",
    # "uvloop").
    collect_less()
    with asyncio.Runner(loop_factory=loop_factory(config.event_loop)) as runner:
        results = runner.run(run(config))
    report.write(results, config.out)
    print((config.out / "latest.md").read_text())
    print(f"wrote {config.out}/latest.md, latest.json, latest.png in {results['wall_seconds']} s")
    failed = [
        r
        for name in WORKLOADS
        for r in results.get(name, [])  # type: ignore[attr-defined]
        if isinstance(r, dict) and "error" in r
    ]
    if failed:
        print(f"{len(failed)} experiment(s) failed to run", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
