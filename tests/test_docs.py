"""Docs that are generated from code must match it."""

from __future__ import annotations

import asyncio
import json
import re
import shlex
import subprocess
import sys
import uuid
from pathlib import Path

import asyncpg
import pytest

from outbox.relay.sql import QUERIES
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parent.parent

pytestmark = pytest.mark.unit


def test_settings_table_in_operations_doc_is_current() -> None:
    table = subprocess.run(
        [sys.executable, str(ROOT / "scripts" / "settings_table.py")],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    doc = (ROOT / "docs" / "operations.md").read_text()
    start = doc.index("\n", doc.index("<!-- settings:start")) + 1
    assert doc[start : doc.index("<!-- settings:end")].strip() == table, (
        "docs/operations.md is stale: run scripts/settings_table.py and paste its output"
    )


def test_the_log_events_table_names_every_event_the_code_logs() -> None:
    """docs/operations.md "Log events" says it lists every event the relay emits, for alerts:
    four were missing from it (`pruned`, `prune_failed`, and this session's `schema_*`)."""
    emitted = {
        m.group(1)
        for path in (ROOT / "relay").rglob("*.py")
        for m in re.finditer(
            r'\blog\.(?:debug|info|warning|error|exception)\(\s*"(\w+)"', path.read_text()
        )
    }
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc[doc.index("\n## Log events\n") : doc.index("\n## Schema\n")]
    listed = set(re.findall(r"^\| `(\w+)` \|", section, re.MULTILINE))
    assert len(emitted) > 30  # the pattern still finds the relay's log calls
    assert (sorted(emitted - listed), sorted(listed - emitted)) == ([], [])


# -- `outbox-relay status` in README.md and docs/operations.md ------------------------------------


def status_commands() -> list[list[str]]:
    """Every `outbox-relay status ...` the docs show: in bash blocks, and the probe's exec."""
    commands: list[list[str]] = []
    for doc in (ROOT / "README.md", ROOT / "docs" / "operations.md"):
        for block in re.findall(r"```(?:bash|yaml)\n(.*?)```", doc.read_text(), re.DOTALL):
            for line in block.splitlines():
                if line.startswith("outbox-relay status"):
                    commands.append(shlex.split(line, comments=True))
                elif "command: [" in line and '"status"' in line:
                    commands.append(json.loads(line.split("command:", 1)[1]))
    return commands


def status_section() -> str:
    doc = (ROOT / "docs" / "operations.md").read_text()
    return doc[doc.index("\n## Status\n") : doc.index("\n## Replay\n")]


def test_docs_show_status_commands() -> None:
    assert len(status_commands()) >= 7  # README 2, operations.md 5 and the probe


@pytest.mark.postgres
async def test_every_status_command_in_the_docs_runs(database_url: str) -> None:
    for argv in status_commands():
        assert argv[:2] == ["outbox-relay", "status"]
        done = await asyncio.to_thread(cli, *argv[1:], OUTBOX_DATABASE_URL=database_url)
        assert (done.returncode, done.stderr) == (0, ""), argv
        assert done.stdout


def json_paths(value: object, prefix: str = "") -> set[str]:
    """Leaf paths of a JSON document: `a.b`, and `a[].b` inside lists of objects."""
    if isinstance(value, dict):
        return set().union(
            *(json_paths(v, f"{prefix}.{k}" if prefix else k) for k, v in value.items())
        )
    if isinstance(value, list) and value and isinstance(value[0], dict):
        return json_paths(value[0], f"{prefix}[]")
    return {prefix}


@pytest.mark.postgres
async def test_the_json_fields_table_matches_the_document(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """Each field of a full `status --json` document is in the table, and each row names a
    real field (a row may name an object and list its fields in backticks)."""
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, payload, available_at) VALUES "
        "(gen_random_uuid(), 't', 'a', '{}', now()), "
        "(gen_random_uuid(), 't', 'b', '{}', now() + interval '1 hour')"
    )
    await pg.execute(
        "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, "
        "created_at, attempts, first_failed_at, last_failed_at, error_class, error_message, "
        "relay_id) VALUES (gen_random_uuid(), 1, 't', 'c', '{}', '{}', now(), 1, now(), now(), "
        "'E', 'm', 'r')"
    )
    await pg.execute(QUERIES["heartbeat"], "relay-1", "host", 1)  # as the store registers
    await pg.execute(QUERIES["acquire_buckets"], "relay-1", 64, 15.0)
    done = await asyncio.to_thread(cli, "status", "--json", OUTBOX_DATABASE_URL=database_url)
    assert done.returncode == 0, done.stderr
    real = json_paths(json.loads(done.stdout))

    table = status_section().split("### `--json` fields", 1)[1]
    rows = [line.split(" | ") for line in table.splitlines() if line.startswith("| `")]
    documented: set[str] = set()
    for cells in rows:
        names = re.findall(r"`([^`]+)`", cells[0])
        fields = re.findall(r"`([a-z_]+)`", " ".join(cells[1:]))
        for name in names:
            assert any(p == name or p.startswith((f"{name}.", f"{name}[")) for p in real), name
            documented.add(name)
            documented |= {f"{name}.{f}" for f in fields}
    assert real - documented == set()


def test_the_sample_report_has_the_renderers_lines() -> None:
    """The sample in operations.md shows the lines `status` prints, in its order."""
    from datetime import UTC, datetime, timedelta

    from outbox.relay import status as s

    now = datetime.now(UTC)
    event = s.EventInfo(1, uuid.uuid4(), "orders", "k", now, now, 0, 2.0, 2.0)
    report = s.render_text(
        s.Status(
            now=now,
            lease_seconds=15.0,
            pending=s.Count(3, True),
            oldest_pending=event,
            oldest_due=event,
            waiting=s.Waiting(s.Count(2, True), 1, 1, 1, now, now + timedelta(days=2)),
            dead_letters=s.Count(1, True),
            dead_letter_groups=[s.DeadLetterGroup("orders", "E", 1, now)],
            quarantined_keys=s.Count(1, True),
            relays=[s.RelayInfo("r", "host", 1, now, 1.0, True, 62)],
            orphan_buckets=[62, 63],
            tables={"outbox_events": s.TableHealth(3, 0, None, None, None, None, 8192)},
            oldest_transaction=s.OldestTransaction(7, "psql", "idle in transaction", False, 9.0),
        ),
        [],
    )
    sample = status_section().split("```text\n", 1)[1].split("```", 1)[0]

    def labels(text: str) -> list[str]:
        return [line[:18].strip() for line in text.splitlines()[1:] if line[:1] != " "]

    assert labels(sample) == labels(report)


@pytest.mark.postgres
async def test_created_at_is_the_transaction_start_as_the_schema_section_says(
    pg: asyncpg.Connection,
) -> None:
    """docs/operations.md: events of one transaction share `created_at`, the transaction's
    start, and a long transaction backdates them."""
    insert = (
        "INSERT INTO outbox_events (id, topic, key, payload) "
        "VALUES (gen_random_uuid(), 't', $1, '{}') RETURNING created_at"
    )
    async with pg.transaction():
        started = await pg.fetchval("SELECT now()")
        await pg.execute("SELECT pg_sleep(0.2)")  # the transaction's earlier work
        first = await pg.fetchval(insert, "a")
        second = await pg.fetchval(insert, "b")
        inserted_by = await pg.fetchval("SELECT clock_timestamp()")
    assert first == second == started
    assert (inserted_by - first).total_seconds() >= 0.2
