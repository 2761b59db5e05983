"""`outbox-relay status`: the real CLI process against real Postgres, and its query plans."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from outbox.relay import status
from outbox.relay.publishers.stdout import JsonLinesPublisher
from outbox.relay.sql import QUERIES
from tests.helpers import pg_relay
from tests.test_cli import cli

pytestmark = pytest.mark.postgres


async def run_status(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return await asyncio.to_thread(cli, "status", "--database-url", database_url, *args)


async def status_json(database_url: str, *args: str) -> dict[str, Any]:
    done = await run_status(database_url, "--json", *args)
    assert done.returncode == 0, done.stderr
    assert done.stdout.count("\n") == 1, "one line of JSON"
    document: dict[str, Any] = json.loads(done.stdout)
    return document


async def add_event(pg: asyncpg.Connection, *, age: float = 0, delay: float = 0, **kw: Any) -> int:
    """One event written `age` seconds ago, due `delay` seconds after it was written."""
    seq: int = await pg.fetchval(
        "INSERT INTO outbox_events (id, topic, key, payload, created_at, available_at, "
        "attempts) VALUES ($1, $2, $3, '{}', now() - make_interval(secs => $4), "
        "now() - make_interval(secs => $4) + make_interval(secs => $5), $6) RETURNING seq",
        uuid.uuid4(),
        kw.get("topic", "orders"),
        kw.get("key", "k"),
        float(age),
        float(delay),
        kw.get("attempts", 0),
    )
    return seq


async def add_dead_letters(pg: asyncpg.Connection, topic: str, error: str, keys: list[str]) -> None:
    for n, key in enumerate(keys):
        await pg.execute(
            "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, "
            "headers, created_at, attempts, first_failed_at, last_failed_at, error_class, "
            "error_message, relay_id, holds_key) VALUES ($1, $2, $3, $4, '{}', '{}', now(), 1, "
            "now(), now(), $5, 'refused', 'r', true)",
            uuid.uuid4(),
            n + 1,
            topic,
            key,
            error,
        )


async def test_an_empty_outbox_is_ok(database_url: str) -> None:
    human = await run_status(database_url)
    assert human.returncode == 0, human.stderr
    assert "pending           0\n" in human.stdout
    assert human.stdout.rstrip().endswith("health            ok")

    check = await run_status(database_url, "--check")
    assert (check.returncode, check.stderr) == (0, "")
    assert check.stdout == "ok: 0 pending, none due, 0 live relay(s), 0 dead letter(s)\n"

    document = await status_json(database_url, "--check")
    assert document["version"] == status.JSON_VERSION
    assert document["pending"] == {"count": 0, "exact": True}
    assert document["oldest_pending"] is None
    assert document["health"]["ok"] is True
    assert document["buckets"]["without_live_owner"] == list(range(64))


async def test_an_old_event_and_no_relay_is_unhealthy(
    database_url: str, pg: asyncpg.Connection
) -> None:
    seq = await add_event(pg, age=7200)
    check = await run_status(database_url, "--check")
    assert check.returncode == 1
    assert check.stderr == ""
    assert check.stdout == (
        f"unhealthy: the oldest due event (seq {seq}) has waited 2 h, over "
        "--max-pending-age 1 min; 1 pending event(s) and no live relay\n"
    )
    lenient = await run_status(database_url, "--check", "--max-pending-age", "36000")
    assert lenient.returncode == 1
    assert lenient.stdout == "unhealthy: 1 pending event(s) and no live relay\n"

    done = await run_status(database_url, "--json", "--check")
    assert done.returncode == 1
    document = json.loads(done.stdout)
    assert document["health"]["ok"] is False
    assert len(document["health"]["problems"]) == 2
    assert document["oldest_due"]["seq"] == seq
    assert 7200 <= document["oldest_due"]["waiting_seconds"] < 7260

    human = await run_status(database_url)  # without --check: a report, exit 0
    assert human.returncode == 0
    assert "health            unhealthy: the oldest due event" in human.stdout


async def test_delayed_and_retrying_events_are_not_due(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """An event delayed for a day is old but not late: it trips no --max-pending-age."""
    delayed = await add_event(pg, key="later", age=600, delay=2 * 86_400)
    await add_event(pg, key="retried", age=300, delay=330, attempts=2)
    due = await add_event(pg, key="late", age=90, delay=30)  # due for 60 s

    document = await status_json(database_url, "--max-pending-age", "3600")
    assert document["oldest_pending"]["seq"] == delayed
    assert document["oldest_due"]["seq"] == due
    assert 60 <= document["oldest_due"]["waiting_seconds"] < 120
    not_due = document["not_due"]
    assert (not_due["count"], not_due["retrying"], not_due["delayed"]) == (2, 1, 1)
    assert not_due["due_after_a_day"] == 1
    assert not_due["soonest_available_at"] < not_due["latest_available_at"]
    assert document["health"]["problems"] == ["3 pending event(s) and no live relay"]

    await pg.execute("DELETE FROM outbox_events WHERE seq = $1", due)
    check = await run_status(database_url, "--check", "--max-pending-age", "1")
    assert check.stdout == "unhealthy: 2 pending event(s) and no live relay\n"


async def test_dead_letters_fail_the_check_only_when_asked(
    database_url: str, pg: asyncpg.Connection
) -> None:
    await add_dead_letters(pg, "orders", "MessageSizeTooLargeError", ["a", "a", "b"])
    await add_dead_letters(pg, "payments", "ResponseError", ["c"])

    ok = await run_status(database_url, "--check")
    assert (ok.returncode, ok.stdout) == (
        0,
        "ok: 0 pending, none due, 0 live relay(s), 4 dead letter(s)\n",
    )
    strict = await run_status(database_url, "--check", "--fail-on-dead-letters")
    assert strict.returncode == 1
    assert strict.stdout == "unhealthy: 4 dead letter(s) (--fail-on-dead-letters)\n"

    document = await status_json(database_url)
    assert document["dead_letters"]["count"] == 4
    assert document["dead_letters"]["by_topic_and_error"] == [
        {
            "topic": "orders",
            "error_class": "MessageSizeTooLargeError",
            "count": 3,
            "last_failed_at": document["dead_letters"]["by_topic_and_error"][0]["last_failed_at"],
        },
        {
            "topic": "payments",
            "error_class": "ResponseError",
            "count": 1,
            "last_failed_at": document["dead_letters"]["by_topic_and_error"][1]["last_failed_at"],
        },
    ]
    assert document["quarantined_keys"] == {"count": 3, "exact": True}


async def test_a_live_relay_and_its_buckets_show_up(
    database_url: str, pg: asyncpg.Connection, tmp_path: Path
) -> None:
    await pg.execute(  # a relay that died an hour ago, as the store registers one
        "INSERT INTO outbox_relays (relay_id, hostname, pid, heartbeat_at) "
        "VALUES ('gone-1', 'old-host', 1, now() - interval '1 hour')"
    )
    relay = pg_relay(database_url, JsonLinesPublisher(tmp_path / "out.jsonl"))
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.owned_buckets == 64, timeout=30)
        await add_event(pg, age=1)
        document = await status_json(database_url, "--lease-seconds", "3")
        check = await run_status(database_url, "--check", "--lease-seconds", "3")
    finally:
        relay.request_stop()
        await task
    assert check.returncode == 0, check.stdout
    assert ", 1 live relay(s), " in check.stdout
    assert document["live_relays"] == 1
    live, gone = sorted(document["relays"], key=lambda r: r["relay_id"] == "gone-1")
    assert live["relay_id"] == relay.relay_id
    assert (live["live"], live["buckets"]) == (True, 64)
    assert live["heartbeat_age_seconds"] < 3
    assert (gone["live"], gone["buckets"]) == (False, 0)
    assert gone["heartbeat_age_seconds"] >= 3600
    assert document["buckets"] == {"total": 64, "without_live_owner": []}

    after = await status_json(database_url, "--lease-seconds", "3")  # stopped: leases released
    assert after["live_relays"] == 0
    assert after["buckets"]["without_live_owner"] == list(range(64))


async def test_without_outbox_tables_it_says_to_migrate(empty_database_url: str) -> None:
    done = await run_status(empty_database_url, "--check")
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    # (the services' password is "outbox", and every given password is masked in errors)
    assert "tables in this database: run `" in done.stderr
    assert done.stderr.endswith("-relay migrate`\n")


async def test_a_locked_table_times_out_in_one_line(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """A migration holding a lock on the outbox: the probe answers within --timeout."""
    async with pg.transaction():
        await pg.execute("LOCK TABLE outbox_events IN ACCESS EXCLUSIVE MODE")
        done = await run_status(database_url, "--check", "--timeout", "1")
    assert done.returncode == 1
    assert done.stderr == "outbox-relay: error: database unreachable: no answer within 1.0 s\n"


# -- plans --------------------------------------------------------------------------------------

#: Arguments of every status query: capped as `status` runs them, and exact (`--exact`).
CAP = status.COUNT_CAP + 1
ARGS: dict[str, tuple[tuple[object, ...], tuple[object, ...]]] = {
    "status_now": ((), ()),
    "status_counts": ((CAP,), (None,)),
    "status_oldest_pending": ((), ()),
    "status_oldest_due": ((), ()),
    "status_waiting": ((CAP, status.FAR_FUTURE_SECONDS), (None, status.FAR_FUTURE_SECONDS)),
    "status_dead_letters": ((status.COUNT_CAP,), (None,)),
    "status_quarantined_keys": ((CAP,), (None,)),
    "status_relays": ((15.0,), (15.0,)),
    "status_orphan_buckets": ((15.0,), (15.0,)),
    "status_tables": ((), ()),
    "status_oldest_transaction": ((), ()),
    "status_history": ((CAP,), (None,)),
}
OUTBOX_TABLES = {"outbox_events", "outbox_dead_letters", "outbox_delivered"}


def plan_nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from plan_nodes(child)


async def test_status_queries_walk_indexes_and_stop_at_the_cap(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """Every status query, as `status` runs it (its connection, its arguments), on a table
    of more rows than the cap, after ANALYZE: no sequential scan of the outbox tables, and
    without --exact no scan of them returns more rows than the cap."""
    assert set(ARGS) == {name for name in QUERIES if name.startswith("status_")}
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, payload) "
        "SELECT gen_random_uuid(), 't', 'k-' || g % 500, '{}' "
        "FROM generate_series(1, $1) AS g",
        status.COUNT_CAP + 2_000,
    )
    for n in range(20):
        await add_event(pg, key=f"waiting-{n}", delay=3600, attempts=1)
    await add_dead_letters(pg, "t", "E", [f"q-{n % 5}" for n in range(30)])
    await pg.execute("ANALYZE")
    async with status.connect(database_url) as conn:
        for name, (capped, exact) in ARGS.items():
            for args, bounded in ((capped, True), (exact, False)):
                (row,) = await conn.fetch(f"EXPLAIN (ANALYZE, FORMAT JSON) {QUERIES[name]}", *args)
                plan = json.loads(row[0])[0]["Plan"]
                for node in plan_nodes(plan):
                    if node.get("Relation Name") not in OUTBOX_TABLES:
                        continue
                    where = f"{name}{' --exact' if not bounded else ''}: {node['Node Type']}"
                    assert node["Node Type"] != "Seq Scan", where
                    if bounded:
                        rows = node["Actual Rows"] * node["Actual Loops"]
                        assert rows <= CAP, f"{where} read {rows} rows"


async def test_exact_counts_past_the_cap(database_url: str, pg: asyncpg.Connection) -> None:
    rows = status.COUNT_CAP + 5
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, payload) "
        "SELECT gen_random_uuid(), 't', NULL, '{}' FROM generate_series(1, $1) AS g",
        rows,
    )
    capped = await status_json(database_url)
    assert capped["pending"]["exact"] is False
    exact = await status_json(database_url, "--exact")
    assert exact["pending"] == {"count": rows, "exact": True}
    human = await run_status(database_url)
    assert "(estimate: pg_stat n_live_tup; --exact counts)" in human.stdout


# -- errors: one line, no server needed -----------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "named"),
    [
        (("--max-pending-age", "nan"), "--max-pending-age"),
        (("--max-pending-age", "inf"), "--max-pending-age"),
        (("--max-pending-age", "-1"), "--max-pending-age"),
        (("--timeout", "0"), "--timeout"),
        (("--lease-seconds", "0.5"), "lease_seconds"),
        (("--no-such-flag",), "--no-such-flag"),
    ],
)
def test_bad_flags_are_one_line(args: tuple[str, ...], named: str) -> None:
    done = cli("status", "--database-url", "postgresql://u:p@127.0.0.1:1/db", *args)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("outbox-relay: error: ")
    assert named in done.stderr


@pytest.mark.unit
def test_sqlite_is_not_supported() -> None:
    done = cli("status", "--database-url", "sqlite:///demo.db")
    assert done.returncode == 2
    assert done.stderr == (
        "outbox-relay: error: database_url: status needs a postgresql:// URL (on SQLite, one "
        "relay: `outbox-relay dlq count` and `outbox-relay migrate --check`)\n"
    )


@pytest.mark.unit
def test_an_unreachable_database_fails_the_check_in_one_line() -> None:
    with socket.socket() as free:
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    done = cli("status", "--check", "--database-url", f"postgresql://u:s3cret@127.0.0.1:{port}/db")
    assert done.returncode == 1
    assert done.stdout == ""
    assert done.stderr.startswith("outbox-relay: error: database unreachable: ")
    assert done.stderr.count("\n") == 1
    assert "s3cret" not in done.stderr


@pytest.mark.unit
def test_a_database_that_never_answers_times_out() -> None:
    with socket.socket() as silent:  # accepts connections (the backlog) and says nothing
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        port = silent.getsockname()[1]
        url = f"postgresql://u:p@127.0.0.1:{port}/db"
        done = cli("status", "--check", "--timeout", "0.5", "--database-url", url)
    assert done.returncode == 1
    assert done.stderr == "outbox-relay: error: database unreachable: no answer within 0.5 s\n"


async def test_the_transaction_holding_cleanup_back_shows_up(
    database_url: str, pg: asyncpg.Connection
) -> None:
    await pg.execute("SET application_name = 'nightly-report'")
    await pg.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
    await pg.fetchval("SELECT count(*) FROM outbox_events")  # the snapshot is taken here
    try:
        document = await status_json(database_url)
        human = await run_status(database_url)
    finally:
        await pg.execute("ROLLBACK")
    held = document["oldest_transaction"]
    assert held["pid"] == pg.get_server_pid()
    assert held["application_name"] == "nightly-report"
    assert held["state"] == "idle in transaction"
    assert held["prepared"] is False
    assert held["age_seconds"] > 0
    assert f"pid {pg.get_server_pid()} (nightly-report, idle in transaction)" in human.stdout
    assert (await status_json(database_url))["oldest_transaction"] is None


def test_the_cli_starts_without_sqlalchemy() -> None:
    """`status --check` runs as a probe every few seconds: the CLI module must not pull in
    SQLAlchemy (half its start-up time), which only the writers' side and `migrate` need."""
    import sys

    probe = "import sys, relay.cli, relay.status; print('sqlalchemy' in sys.modules)"
    done = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=60
    )
    assert done.stdout.strip() == "False"
