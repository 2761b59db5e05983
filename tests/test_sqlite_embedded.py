"""SQLite as the embedded mode: the migrations make its schema, its named queries mirror
Postgres's, and `outbox-relay migrate`, `run` and `dlq` work on a SQLite file, as the
section "Embedded mode (SQLite)" of docs/operations.md shows."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import signal
import sqlite3
import subprocess
import sys
import uuid
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy import create_engine
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import OutboxEvent, enqueue, metadata
from outbox.relay import migrate
from outbox.relay.admin import SQLITE_FILTERED
from outbox.relay.seams import Dead
from outbox.relay.sql import QUERIES, SQLITE_QUERIES
from outbox.relay.stores.sqlite import STATEMENT_END, SqliteStore
from tests.test_schema import check_constraints

#: Upper bound for a subprocess's answer; it normally comes within a second.
TIMEOUT = 60.0


def outbox_relay(*args: str, cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """`outbox-relay ARGS` in `cwd`, with no OUTBOX_* variable but `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")} | env
    return subprocess.run(
        [sys.executable, "-m", "outbox.relay.cli", *args],
        capture_output=True,
        text=True,
        timeout=TIMEOUT,
        env=environ,
        cwd=cwd,
        check=False,
    )


@pytest.fixture
def migrated(tmp_path: Path) -> str:
    """A SQLite file migrated to head by the migrations themselves; its URL."""
    url = f"sqlite:///{tmp_path / 'outbox.db'}"
    migrate.upgrade(url)
    return url


# -- the queries ---------------------------------------------------------------------------------


@pytest.mark.unit
def test_sqlite_queries_have_postgres_names() -> None:
    """A statement both databases run has one name; SQLite's own are `sqlite_*`."""
    shared = {name for name in SQLITE_QUERIES if not name.startswith("sqlite_")}
    assert shared <= set(QUERIES), shared - set(QUERIES)
    store = {"claim_batch", "delete_delivered", "schedule_retries", "move_to_dead_letters"}
    dlq = {name for name in QUERIES if name.startswith("dlq_")}
    assert store | {"backlog"} | dlq <= shared


def placeholders(statement: str) -> list[Any] | dict[str, Any]:
    """NULL for every parameter of `statement` (`?N` or `:name`)."""
    numbered = [int(n) for n in re.findall(r"\?(\d+)", statement)]
    if numbered:
        return [None] * max(numbered)
    return dict.fromkeys(re.findall(r"(?<!:):(\w+)", statement))


@pytest.mark.unit
def test_every_sqlite_query_prepares_on_a_migrated_file(migrated: str) -> None:
    """Each statement (and each of the dlq_* as they run, with the chosen dead letters) is
    compiled by SQLite against the migrated schema: EXPLAIN prepares it, runs nothing."""
    path = migrated.removeprefix("sqlite:///")
    statements = [
        *((name, sql) for name, sql in SQLITE_QUERIES.items() if name not in SQLITE_FILTERED),
        *SQLITE_FILTERED.items(),
    ]
    with closing(sqlite3.connect(path)) as conn:
        for name, sql in statements:
            for statement in STATEMENT_END.split(sql):
                try:
                    conn.execute(f"EXPLAIN {statement}", placeholders(statement)).fetchall()
                except sqlite3.Error as exc:
                    pytest.fail(f"{name}: {exc}")


# -- the schema ----------------------------------------------------------------------------------


def schema_sql(path: Path, kind: str) -> dict[str, str]:
    """name -> the CREATE statement of every `kind` (index, trigger) SQLite keeps, whitespace
    folded."""
    with closing(sqlite3.connect(path)) as conn:
        rows = conn.execute(
            "SELECT name, sql FROM sqlite_master WHERE type = ? AND sql IS NOT NULL", (kind,)
        ).fetchall()
    return {name: " ".join(sql.split()) for name, sql in rows}


@pytest.mark.unit
def test_migrations_up_down_up_and_match_the_models(tmp_path: Path) -> None:
    """On SQLite too, `upgrade head` gives what the models declare: columns, types, indexes
    (compare_metadata), the CHECK constraints and the partial indexes' WHERE (which it does
    not compare), and downgrade to base removes every outbox table."""
    path = tmp_path / "migrated.db"
    url = f"sqlite:///{path}"
    migrate.upgrade(url)
    migrate.downgrade(url, "base")
    assert set(schema_sql(path, "table")) - {"sqlite_sequence"} == {"outbox_alembic_version"}
    migrate.upgrade(url)

    engine = create_engine(url)
    with engine.connect() as conn:
        context = MigrationContext.configure(conn, opts={"compare_type": True})
        differences = [
            d
            for d in compare_metadata(context, metadata)
            if not (d[0] == "remove_table" and d[1].name == "outbox_alembic_version")
        ]
        migrated_checks = check_constraints(conn)
    engine.dispose()
    assert differences == []

    declared = tmp_path / "declared.db"
    engine = create_engine(f"sqlite:///{declared}")
    metadata.create_all(engine)
    with engine.connect() as conn:
        declared_checks = check_constraints(conn)
    engine.dispose()
    assert migrated_checks == declared_checks
    assert ("outbox_events", "ck_outbox_events_headers_object") in migrated_checks
    assert ("outbox_events", "ck_outbox_events_payload_json") in migrated_checks
    assert schema_sql(path, "index") == schema_sql(declared, "index")


@pytest.mark.unit
async def test_every_row_of_a_key_gets_one_bucket(migrated: str) -> None:
    """The bucket trigger (migration 0004) on SQLite: rows of one key share a bucket whoever
    writes them (OutboxEvent, enqueue, raw SQL, a replay's explicit seq), keys spread over
    buckets, and changing a row's key moves it."""
    engine = create_async_engine(migrated.replace("sqlite://", "sqlite+aiosqlite://"))
    keys = [f"order-{n}" for n in range(40)]
    async with AsyncSession(engine) as session, session.begin():
        for key in keys:
            session.add(OutboxEvent(topic="orders", key=key, payload={"n": 1}))
            await enqueue(session, topic="orders", key=key, payload={"n": 2})
    await engine.dispose()
    path = migrated.removeprefix("sqlite:///")
    with closing(sqlite3.connect(path)) as conn, conn:
        for key in keys:
            conn.execute(
                "INSERT INTO outbox_events (id, topic, key, payload, bucket) "
                "VALUES (?, 'orders', ?, '{}', 63)",
                (uuid.uuid4().hex, key),
            )
        conn.execute(
            "INSERT INTO outbox_events (seq, id, topic, key, payload) "
            "VALUES (100000, ?, 'orders', 'order-0', '{}')",
            (uuid.uuid4().hex,),
        )
        rows = conn.execute("SELECT key, bucket FROM outbox_events").fetchall()
        buckets: dict[str, set[int]] = {}
        for key, bucket in rows:
            buckets.setdefault(key, set()).add(bucket)
        assert all(len(b) == 1 for b in buckets.values()), buckets
        assert len(rows) == 3 * len(keys) + 1
        assert len({b for (b,) in buckets.values()}) >= 8  # spread, not all in bucket 0
        # Two keys of different buckets: rows whose key changes move to the other's.
        one, other = next((a, b) for a in keys for b in keys if buckets[a] != buckets[b])
        conn.execute("UPDATE outbox_events SET key = ? WHERE key = ?", (other, one))
        moved = conn.execute(
            "SELECT DISTINCT bucket FROM outbox_events WHERE key = ?", (other,)
        ).fetchall()
        assert {b for (b,) in moved} == buckets[other]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("headers", "payload"),
    [("[]", "{}"), ("not json", "{}"), ('"text"', "{}"), ("{}", "not json"), ("{}", "{")],
)
def test_json_checks(migrated: str, headers: str, payload: str) -> None:
    """The JSON CHECKs in SQLite's spelling: `headers` is a JSON object (json_type, as
    jsonb_typeof on Postgres), and `payload` is JSON (json_valid; Postgres's jsonb is)."""
    path = migrated.removeprefix("sqlite:///")
    insert = "INSERT INTO outbox_events (id, topic, payload, headers) VALUES (?, 't', ?, ?)"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(insert, (uuid.uuid4().hex, '{"a": [1]}', "{}"))
        with pytest.raises(sqlite3.Error):
            conn.execute(insert, (uuid.uuid4().hex, payload, headers))


# -- the CLI on a SQLite file --------------------------------------------------------------------


@pytest.mark.unit
def test_migrate_cli(tmp_path: Path) -> None:
    url = "sqlite:///app.db"  # relative: in the working directory
    check = outbox_relay("migrate", "--check", "--database-url", url, cwd=tmp_path)
    assert (check.returncode, check.stderr) == (
        1,
        f"outbox-relay: error: database is at no revision, head is {migrate.head_revision()}\n",
    )
    assert not (tmp_path / "app.db").exists()  # a check creates nothing
    up = outbox_relay("migrate", "--database-url", url, cwd=tmp_path)
    assert (up.returncode, up.stderr) == (0, ""), up.stderr
    assert up.stdout == f"migrated to {migrate.head_revision()} (head)\n"
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        assert conn.execute("PRAGMA journal_mode").fetchone() == ("wal",)
    check = outbox_relay("migrate", "--check", cwd=tmp_path, OUTBOX_DATABASE_URL=url)
    assert (check.returncode, check.stdout) == (0, f"at head ({migrate.head_revision()})\n")
    again = outbox_relay("migrate", "--database-url", url, cwd=tmp_path)
    assert again.returncode == 0, again.stderr
    down = outbox_relay("migrate", "--downgrade", "base", "--database-url", url, cwd=tmp_path)
    assert (down.returncode, down.stdout) == (0, "downgraded to base (no outbox tables)\n")
    sql = outbox_relay("migrate", "--sql", "--database-url", url, cwd=tmp_path)
    assert sql.returncode == 2
    assert sql.stderr.count("\n") == 1
    assert sql.stderr.startswith("outbox-relay: error: --sql: ")


def dead_letters(url: str) -> list[uuid.UUID]:
    """Four events of which three are dead-lettered, as the relay does it: a poison event of
    key k1 with a later event of k1 parked behind it, and one of key k2. Their ids, by seq."""

    async def write() -> list[uuid.UUID]:
        engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://"))
        async with AsyncSession(engine) as session, session.begin():
            for n, key in enumerate(["k1", "k1", "k2", "k3"]):
                session.add(OutboxEvent(topic="orders", key=key, payload={"n": n}))
        await engine.dispose()
        store = SqliteStore(url)
        await store.start("relay-1")
        try:
            first = await store.claim(10)
            ids = [e.id for e in first.events]
            await store.move_to_dead_letters(
                [Dead(first.events[0].seq, "Poison", "bad payload", holds_key=True)]
            )
            await store.move_to_dead_letters([Dead(first.events[2].seq, "Refused", "no")])
            parked = await store.claim(10)
            assert [p.seq for p in parked.parked] == [first.events[1].seq]
            await store.move_to_dead_letters(
                [
                    Dead(p.seq, "Quarantined", "held", holds_key=True, held_behind=p.held_behind)
                    for p in parked.parked
                ]
            )
        finally:
            await store.stop()
        return ids

    return asyncio.run(write())


@pytest.mark.unit
def test_dlq_cli(tmp_path: Path) -> None:
    url = f"sqlite:///{tmp_path / 'app.db'}"
    migrate.upgrade(url)
    ids = dead_letters(url)
    db = {"OUTBOX_DATABASE_URL": url}

    listed = outbox_relay("dlq", "list", "--json", cwd=tmp_path, **db)
    assert listed.returncode == 0, listed.stderr
    docs = [json.loads(line) for line in listed.stdout.splitlines()]
    assert sorted(d["event_id"] for d in docs) == sorted(str(i) for i in ids[:3])
    assert {d["error_class"] for d in docs} == {"Poison", "Refused", "Quarantined"}
    tsv = outbox_relay("dlq", "list", "--key", "k1", cwd=tmp_path, **db)
    assert [line.split("\t")[0] for line in tsv.stdout.splitlines()] == [
        "event_id",
        str(ids[0]),
        str(ids[1]),
    ]

    shown = outbox_relay("dlq", "show", str(ids[0]), "--json", cwd=tmp_path, **db)
    assert shown.returncode == 0, shown.stderr
    doc = json.loads(shown.stdout)
    assert (doc["payload"], doc["headers"], doc["holds_key"]) == ({"n": 0}, {}, True)
    assert doc["created_at"].endswith("+00:00")

    count = outbox_relay("dlq", "count", "--topic", "orders", cwd=tmp_path, **db)
    assert (count.returncode, count.stdout) == (0, "3\n")

    # Part of k1's chain without its head is refused, with the command that replays it.
    part = outbox_relay("dlq", "replay", "--id", str(ids[1]), cwd=tmp_path, **db)
    assert part.returncode == 1
    assert "dlq replay --key k1" in part.stderr
    assert part.stderr.count("\n") == 1
    replay = outbox_relay("dlq", "replay", "--key", "k1", "--json", cwd=tmp_path, **db)
    assert replay.returncode == 0, replay.stderr
    assert json.loads(replay.stdout) == {"replayed": 2, "transactions": 1, "released_keys": 1}
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        back = conn.execute("SELECT seq, key FROM outbox_events ORDER BY seq").fetchall()
    assert back == [(1, "k1"), (2, "k1"), (4, "k3")]  # original seqs, the chain in order

    dry = outbox_relay("dlq", "purge", "--all", cwd=tmp_path, **db)
    assert dry.returncode == 0, dry.stderr
    assert "would purge 1 dead letter(s)" in dry.stdout
    purge = outbox_relay("dlq", "purge", "--all", "--yes", "--json", cwd=tmp_path, **db)
    assert json.loads(purge.stdout)["purged"] == 1
    assert outbox_relay("dlq", "count", cwd=tmp_path, **db).stdout == "0\n"


@pytest.mark.unit
def test_dlq_on_a_file_that_is_not_there_is_one_line(tmp_path: Path) -> None:
    done = outbox_relay("dlq", "count", "--database-url", "sqlite:///none.db", cwd=tmp_path)
    assert done.returncode == 1
    assert done.stderr.count("\n") == 1
    assert "outbox-relay migrate --database-url sqlite:///none.db" in done.stderr
    assert not (tmp_path / "none.db").exists()


@pytest.mark.unit
async def test_run_cli_publishes_and_stops_on_sigterm(tmp_path: Path) -> None:
    """The relay on a SQLite file, as a process: it publishes what the application wrote
    (OutboxEvent and enqueue, aiosqlite) in per-key order, and exits 0 on SIGTERM."""
    url = f"sqlite:///{tmp_path / 'app.db'}"
    await asyncio.to_thread(migrate.upgrade, url)
    engine = create_async_engine(url.replace("sqlite://", "sqlite+aiosqlite://"))
    async with AsyncSession(engine) as session, session.begin():
        for n in range(3):
            session.add(OutboxEvent(topic="orders", key="order-1", payload={"n": n}))
            await enqueue(session, topic="orders", key="order-2", payload={"n": n})
    await engine.dispose()

    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    relay = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "outbox.relay.cli",
        "run",
        "--database-url",
        url,
        "--broker",
        "stdout",
        "--poll-interval",
        "0.05",
        "--log-format",
        "json",
        "--event-loop",
        "asyncio",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=environ,
        cwd=tmp_path,
    )
    assert relay.stdout is not None
    published = []
    try:
        for _ in range(6):
            line = await asyncio.wait_for(relay.stdout.readline(), TIMEOUT)
            published.append(json.loads(line))
    finally:
        relay.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.wait_for(relay.communicate(), TIMEOUT)
    assert relay.returncode == 0, stderr.decode()
    for key in ("order-1", "order-2"):
        assert [e["payload"]["n"] for e in published if e["key"] == key] == [0, 1, 2]
    records = [json.loads(line) for line in stderr.decode().splitlines()]
    assert records[0]["event"] == "relay_started"
    assert records[0]["event_loop"] == "asyncio"  # as asked
    assert records[-1]["event"] == "relay_stopped"
    with closing(sqlite3.connect(tmp_path / "app.db")) as conn:
        assert conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,)


async def wait_for_empty_outbox(path: Path, relay: asyncio.subprocess.Process) -> None:
    """Until the relay has published every pending event (it deletes what the broker acked);
    the relay has no signal to wait on from outside but the table."""
    async with asyncio.timeout(TIMEOUT):
        while True:
            with closing(sqlite3.connect(path)) as conn:
                if conn.execute("SELECT count(*) FROM outbox_events").fetchone() == (0,):
                    return
            assert relay.returncode is None, "the relay exited"
            await asyncio.sleep(0.05)


def embedded_mode_commands() -> list[list[str]]:
    """The lines of the bash block of docs/operations.md's "Embedded mode (SQLite)"."""
    doc = (Path(__file__).resolve().parent.parent / "docs" / "operations.md").read_text()
    section = doc[doc.index("\n## Embedded mode (SQLite)\n") :]
    block = section.split("```bash\n", 1)[1].split("```", 1)[0]
    return [shlex.split(line, comments=True) for line in block.splitlines()]


@pytest.mark.kafka
async def test_the_embedded_mode_commands_in_the_docs_run(
    tmp_path: Path, kafka_bootstrap: str
) -> None:
    """Every command of the section, as written, in order, in a fresh directory: the relay
    (`run`, stopped by SIGTERM once it has published the pending event to Kafka), then `dlq`
    on the dead letters it left alone."""
    commands = embedded_mode_commands()
    export = commands[0]
    assert export[0] == "export"
    name, url = export[1].split("=", 1)
    env = {
        name: url,
        "OUTBOX_KAFKA_BOOTSTRAP": kafka_bootstrap,
        "OUTBOX_TOPIC_PREFIX": f"docs-{uuid.uuid4().hex[:8]}-",  # topics of this test alone
    }
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")} | env
    assert url == "sqlite:///app.db"
    ran = []
    for argv in commands[1:]:
        assert argv[0] == "outbox-relay", argv
        ran.append(argv[1:3])
        if argv[1] != "run":
            done = await asyncio.to_thread(outbox_relay, *argv[1:], cwd=tmp_path, **env)
            assert (done.returncode, done.stderr) == (0, ""), argv
            if argv[1:] == ["migrate", "--check"]:
                await asyncio.to_thread(dead_letters, f"sqlite:///{tmp_path / 'app.db'}")
            continue
        relay = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "outbox.relay.cli", *argv[1:], env=environ, cwd=tmp_path
        )
        try:
            await wait_for_empty_outbox(tmp_path / "app.db", relay)
        finally:
            relay.send_signal(signal.SIGTERM)
            await asyncio.wait_for(relay.wait(), TIMEOUT)
        assert relay.returncode == 0
    assert ["run"] in [r[:1] for r in ran]
    assert ["dlq", "replay"] in ran
