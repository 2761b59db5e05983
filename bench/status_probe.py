"""`python -m bench.status_probe`: how long `outbox-relay status` takes on a big outbox.

Loads N pending events (default 1M, one INSERT ... SELECT generate_series) into a scratch
database, plus some events waiting for a retry and some dead letters, runs ANALYZE, then times
the real CLI process (`status`, `status --json`, `status --check`) a few times each, and the
queries alone in one process. Needs only OUTBOX_DATABASE_URL (loopback). Not part of
`python -m bench`: a check of one command, not a throughput figure.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import subprocess
import sys
import time
import uuid
from urllib.parse import urlsplit

import asyncpg

from bench.infra import Services, _check_loopback, with_database
from bench.procs import VENV_BIN
from outbox.relay import migrate
from outbox.relay.status import read_status
from outbox.urls import asyncpg_dsn

TARGET_SECONDS = 1.0

LOAD = """
INSERT INTO outbox_events (id, topic, key, payload)
SELECT gen_random_uuid(), 'orders', 'order-' || (g % 1000),
       jsonb_build_object('order_id', g, 'total', '19.99', 'currency', 'EUR')
FROM generate_series(1, $1) AS g
"""
LOAD_WAITING = """
INSERT INTO outbox_events (id, topic, key, payload, available_at, attempts)
SELECT gen_random_uuid(), 'orders', 'retrying-' || g, '{}',
       now() + make_interval(secs => g), 1
FROM generate_series(1, $1) AS g
"""
LOAD_DEAD = """
INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers,
                                 created_at, attempts, first_failed_at, last_failed_at,
                                 error_class, error_message, relay_id, holds_key)
SELECT gen_random_uuid(), g, 'orders', 'poison-' || (g % 50), '{}', '{}', now(), 10, now(),
       now(), 'MessageSizeTooLargeError', 'too large', 'bench', true
FROM generate_series(1, $1) AS g
"""


def cli_argv(url: str, *args: str) -> list[str]:
    script = VENV_BIN / "outbox-relay"
    head = [str(script)] if script.exists() else [sys.executable, "-m", "outbox.relay.cli"]
    return [*head, "status", "--database-url", url, *args]


def time_cli(url: str, args: tuple[str, ...], runs: int) -> list[float]:
    took = []
    for _ in range(runs):
        started = time.perf_counter()
        done = subprocess.run(
            cli_argv(url, *args), capture_output=True, text=True, timeout=60, check=False
        )
        took.append(time.perf_counter() - started)
        if done.returncode not in (0, 1) or not done.stdout:
            raise SystemExit(f"status {' '.join(args)} failed: {done.stderr.strip()}")
    return took


async def admin(server_url: str, sql: str) -> None:
    conn = await asyncpg.connect(asyncpg_dsn(server_url))
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def load(url: str, pending: int, waiting: int, dead: int) -> float:
    conn = await asyncpg.connect(asyncpg_dsn(url))
    try:
        started = time.perf_counter()
        await conn.execute(LOAD, pending)
        await conn.execute(LOAD_WAITING, waiting)
        await conn.execute(LOAD_DEAD, dead)
        await conn.execute("ANALYZE outbox_events")
        await conn.execute("ANALYZE outbox_dead_letters")
        return time.perf_counter() - started
    finally:
        await conn.close()


async def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status_probe", description=__doc__)
    parser.add_argument("--pending", type=int, default=1_000_000, help="plain pending events")
    parser.add_argument("--waiting", type=int, default=500, help="events waiting for a retry")
    parser.add_argument("--dead", type=int, default=200, help="dead letters (quarantined)")
    parser.add_argument("--runs", type=int, default=5, help="timed runs of each command")
    args = parser.parse_args(argv)
    server_url = Services.from_env().database_url
    _check_loopback("database", urlsplit(server_url).hostname)
    name = f"bench_status_{uuid.uuid4().hex[:8]}"
    await admin(server_url, f'CREATE DATABASE "{name}"')
    url = with_database(server_url, name)
    try:
        await asyncio.to_thread(migrate.upgrade, url)
        loaded = await load(url, args.pending, args.waiting, args.dead)
        print(
            f"loaded {args.pending:,} pending, {args.waiting:,} waiting, {args.dead:,} dead "
            f"letters + ANALYZE in {loaded:.1f} s"
        )
        queries = []
        for _ in range(args.runs):
            started = time.perf_counter()
            await read_status(url, lease_seconds=15.0)
            queries.append(time.perf_counter() - started)
        print(f"read_status() in-process (connect + queries): median {_ms(queries)}")
        worst = 0.0
        for flags in ((), ("--json",), ("--check",)):
            took = time_cli(url, flags, args.runs)
            worst = max(worst, statistics.median(took))
            label = " ".join(("status", *flags))
            print(f"{label:<16} (CLI process): median {_ms(took)}, max {max(took) * 1000:.0f} ms")
        took = time_cli(url, ("--exact",), 1)  # counts every row: no target
        print(f"{'status --exact':<16} (CLI process): {took[0] * 1000:.0f} ms")
        verdict = "met" if worst < TARGET_SECONDS else "MISSED"
        print(
            f"target: status answers in < {TARGET_SECONDS:.0f} s at {args.pending:,} pending: "
            f"{verdict} (worst median {worst * 1000:.0f} ms)"
        )
    finally:
        await admin(server_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    return 0


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:.0f} ms"


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
