"""Least-privilege database roles, from the SQL in docs/operations.md ("Database roles"), and
what the relay's connections show in pg_stat_activity.

The test runs the documented SQL itself (extracted from the doc, so the doc cannot drift),
with one change: a suffix on the role names, because roles belong to the whole cluster and
other test sessions run beside this one. It needs a superuser connection (scripts/services.sh
makes `outbox` one) to create the roles.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import uuid
from collections.abc import AsyncIterator, Sequence
from datetime import timedelta
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
from sqlalchemy import text
from sqlalchemy.exc import ProgrammingError
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import OutboxEvent, enqueue, inbox
from outbox.envelope import Envelope
from outbox.relay.seams import Failure, PublishResult, Verdict
from outbox.urls import asyncpg_dsn, sqlalchemy_async_url
from tests.conftest import fresh_database
from tests.fakes import RecordingPublisher
from tests.helpers import ROOT, eventually, pg_relay, relay_process
from tests.test_schema import outbox_cli
from tests.test_sqlite_store import ScriptedPublisher

pytestmark = pytest.mark.postgres

ROLES = ("outbox_owner", "outbox_relay", "app_writer")
ROLE_NAMES = re.compile(r"\b(" + "|".join(ROLES) + r")\b")  # not outbox_relays, the table
PASSWORD = "change-me"  # the doc's


def roles_section() -> str:
    doc = (ROOT / "docs" / "operations.md").read_text()
    start = doc.index("\n## Database roles\n")
    return doc[start : doc.index("\n## ", start + 1)]


def fenced(text: str, lang: str) -> list[str]:
    return re.findall(rf"^```{lang}\n(.*?)^```$", text, re.MULTILINE | re.DOTALL)


def as_role(url: str, role: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{role}:{PASSWORD}@{parts.hostname}:{parts.port}"))


@pytest.fixture
async def roles(server_url: str) -> AsyncIterator[tuple[str, dict[str, str]]]:
    """An empty database, and the doc's role names with a suffix of this test's; the roles
    are dropped after the database (the owner owns its tables)."""
    suffix = uuid.uuid4().hex[:8]
    names = {role: f"{role}_{suffix}" for role in ROLES}
    try:
        async with fresh_database(server_url, None) as url:
            yield url, names
    finally:
        admin = await asyncpg.connect(asyncpg_dsn(server_url))
        try:
            for name in names.values():
                await admin.execute(f"DROP ROLE IF EXISTS {name}")
        finally:
            await admin.close()


async def refused(url: str, *statements: str) -> list[str]:
    """Each statement run on its own connection as the URL's role: the refusal's message
    (a statement that went through fails the test)."""
    out = []
    for statement in statements:
        conn = await asyncpg.connect(asyncpg_dsn(url))
        try:
            with pytest.raises(asyncpg.InsufficientPrivilegeError) as caught:
                await conn.execute(statement)
            out.append(str(caught.value))
        finally:
            await conn.close()
    return out


def poison_key(event: Envelope) -> PublishResult:
    """The broker refuses the events of key `poison` for good: dead-lettered, key quarantined."""
    if event.key == "poison":
        return Failure("Rejected", "refused for good (test)", Verdict.POISON)
    return None


async def cli(url: str, *args: str) -> tuple[int, str, str]:
    env = os.environ | {"OUTBOX_DATABASE_URL": url}
    done = await asyncio.to_thread(outbox_cli, *args, env=env)
    return done.returncode, done.stdout, done.stderr


async def test_least_privilege_roles_from_the_docs(
    roles: tuple[str, dict[str, str]], tmp_path: Path
) -> None:
    url, names = roles
    section = roles_section()
    setup, grants = fenced(section, "sql")
    (migrate_command,) = fenced(section, "bash")

    def ours(sql: str) -> str:
        return ROLE_NAMES.sub(lambda m: names[m[1]], sql)

    owner_url, relay_url, writer_url = (as_role(url, names[role]) for role in ROLES)

    # 1. The roles, as a superuser; then the documented `migrate`, as the owner.
    admin = await asyncpg.connect(asyncpg_dsn(url))
    try:
        await admin.execute(ours(setup))
    finally:
        await admin.close()
    assert migrate_command.split()[1:] == ["outbox-relay", "migrate"]
    assert migrate_command.startswith("OUTBOX_DATABASE_URL=postgresql://outbox_owner:")
    code, _, err = await cli(owner_url, "migrate")
    assert code == 0, err

    async def grant(sql: str) -> None:
        owner = await asyncpg.connect(asyncpg_dsn(owner_url))
        try:
            await owner.execute(ours(sql))
        finally:
            await owner.close()

    # 2. The writer. With the grants but the ORM's, `enqueue` works on both of its paths: as
    # the transaction's first statement (SQLAlchemy's Core INSERT) and once the transaction
    # has begun (asyncpg's prepared INSERT); `session.add` does not (INSERT ... RETURNING seq).
    (orm_grant,) = [line for line in grants.splitlines() if "session.add(" in line]
    await grant(grants.replace(orm_grant, ""))
    engine = create_async_engine(sqlalchemy_async_url(writer_url))
    added = [
        OutboxEvent(topic="t", key="poison", payload={"n": 3}),
        OutboxEvent(topic="t", key="b", payload={"n": 4}),
        OutboxEvent(topic="t", key="poison", payload={"n": 5}),
    ]
    ids = [e.id for e in added]  # the writer may not read the rows back after commit
    try:
        async with AsyncSession(engine) as session, session.begin():
            first = await enqueue(session, topic="t", key="a", payload={"n": 1})
        async with AsyncSession(engine) as session, session.begin():
            await session.execute(text("SELECT 1"))  # BEGIN is sent: the asyncpg path
            second = await enqueue(session, topic="t", key="a", payload={"n": 2})
        with pytest.raises(ProgrammingError, match="permission denied for table outbox_events"):
            async with AsyncSession(engine) as session, session.begin():
                session.add(OutboxEvent(topic="t", payload={"never": "written"}))

        # With the ORM's column grant, session.add works, beside enqueue after a flush.
        await grant(grants)
        async with AsyncSession(engine) as session, session.begin():
            session.add_all(added[:2])
        async with AsyncSession(engine) as session, session.begin():
            session.add(added[2])
            await session.flush()
            last = await enqueue(session, topic="t", key="c", payload={"n": 6})
    finally:
        await engine.dispose()
    assert len({first, second, *ids, last}) == 6
    writer_refusals = await refused(
        writer_url,
        "SELECT payload FROM outbox_events",
        "DELETE FROM outbox_events",
        "UPDATE outbox_events SET attempts = 1",
        "SELECT * FROM outbox_dead_letters",
        "SELECT nextval('outbox_events_seq_seq')",
    )
    assert all("permission denied" in message for message in writer_refusals)

    # 2b. The same role as a consumer: the inbox records an event once, and prunes; `once`
    # needs INSERT alone.
    engine = create_async_engine(sqlalchemy_async_url(writer_url))
    event_id = uuid.uuid4()
    try:
        async with AsyncSession(engine) as session, session.begin():
            assert await inbox.record(session, event_id, consumer="billing")
            assert await inbox.prune(session, older_than=timedelta(days=7)) == 0
        await grant(f"REVOKE SELECT, DELETE ON outbox_inbox FROM {names['app_writer']}")
        async with AsyncSession(engine) as session:
            async with inbox.once(session, event_id, consumer="billing") as fresh:
                assert not fresh
            async with inbox.once(session, uuid.uuid4(), consumer="billing") as fresh:
                assert fresh
    finally:
        await engine.dispose()

    # 3. The relay role: no DDL, no TRUNCATE, no migration; `migrate --check` reads.
    relay_refusals = await refused(
        relay_url,
        "CREATE TABLE outbox_extra (n int)",
        "ALTER TABLE outbox_events ADD COLUMN extra int",
        "DROP TABLE outbox_relays",
        "CREATE INDEX ix_extra ON outbox_events (topic)",
        "TRUNCATE outbox_events",
        "DROP TRIGGER outbox_events_notify ON outbox_events",
        "ALTER FUNCTION outbox_notify() OWNER TO CURRENT_USER",
    )
    assert all(
        "permission denied" in message or "must be owner" in message for message in relay_refusals
    ), relay_refusals
    code, _, err = await cli(relay_url, "migrate", "--downgrade", "base")
    assert code == 1
    assert len(err.strip().splitlines()) == 1
    assert "must be owner" in err or "permission denied" in err, err
    code, out, err = await cli(relay_url, "migrate", "--check")
    assert code == 0, err

    # 4. The relay role delivers, dead-letters a poison event and parks the next event of its
    # key behind it (a FOR SHARE lock on the dead letters); `dlq` and `status` work.
    publisher = ScriptedPublisher(poison_key)
    stats = await pg_relay(relay_url, publisher).drain()
    assert (stats.delivered, stats.dead_lettered, stats.parked) == (4, 2, 1)
    code, out, err = await cli(relay_url, "dlq", "list", "--key", "poison")
    assert code == 0, err
    header, *lines = out.splitlines()  # `dlq list` prints the field names first
    assert header.startswith("event_id\t")
    assert [line.split("\t")[0] for line in lines] == [str(ids[0]), str(ids[2])]
    code, out, err = await cli(relay_url, "dlq", "replay", "--key", "poison")
    assert code == 0, err
    assert out.startswith("replayed 2 dead letter(s)"), out
    code, out, err = await cli(relay_url, "status")
    assert code == 0, err

    # 5. The real `outbox-relay run` as the relay role publishes the replayed chain; its
    # connections, the LISTEN one included, name the relay in pg_stat_activity.
    jsonl = tmp_path / "events.jsonl"
    relay_id = f"roles-{uuid.uuid4().hex[:6]}"
    proc = relay_process(
        relay_url, "--broker", "stdout", "--jsonl-path", str(jsonl), "--relay-id", relay_id
    )
    watcher = await asyncpg.connect(asyncpg_dsn(url))
    try:

        async def published() -> bool:
            assert proc.poll() is None, proc.communicate()[1].decode()[-2000:]
            return jsonl.exists() and len(jsonl.read_text().splitlines()) == 2

        await eventually(published, timeout=30)

        async def listening() -> bool:
            rows = await watcher.fetch(
                "SELECT usename, application_name FROM pg_stat_activity"
                " WHERE datname = current_database() AND application_name LIKE 'outbox-relay %'"
            )
            names_seen = {(r["usename"], r["application_name"]) for r in rows}
            return (names[ROLES[1]], f"outbox-relay listen {relay_id}") in names_seen

        await eventually(listening, timeout=30)
        assert await watcher.fetchval("SELECT count(*) FROM outbox_events") == 0
        assert await watcher.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    finally:
        await watcher.close()
        proc.send_signal(signal.SIGTERM)
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=30)
    assert proc.returncode == 0, stderr.decode()[-2000:]
    replayed = [uuid.UUID(json.loads(line)["id"]) for line in jsonl.read_text().splitlines()]
    assert replayed == [ids[0], ids[2]]


async def test_every_relay_connection_names_the_relay(database_url: str) -> None:
    """The pool's connections say `outbox-relay <relay_id>`, the LISTEN connection
    `outbox-relay listen <relay_id>`: an operator can tell them apart and from the rest."""
    relay = pg_relay(database_url, RecordingPublisher(), relay_id="names-1")
    task = asyncio.create_task(relay.run())
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    seen: Sequence[asyncpg.Record] = []
    try:

        async def both() -> bool:
            nonlocal seen
            seen = await conn.fetch(
                "SELECT application_name, query FROM pg_stat_activity"
                " WHERE datname = current_database() AND pid <> pg_backend_pid()"
            )
            return {r["application_name"] for r in seen} >= {
                "outbox-relay names-1",
                "outbox-relay listen names-1",
            }

        await eventually(both, timeout=30)
    finally:
        relay.request_stop()
        await task
        await conn.close()
    listeners = [r for r in seen if r["application_name"] == "outbox-relay listen names-1"]
    assert len(listeners) == 1
    assert listeners[0]["query"].startswith(("LISTEN", "SELECT 1"))
    assert {r["application_name"] for r in seen} == {
        "outbox-relay names-1",
        "outbox-relay listen names-1",
    }
