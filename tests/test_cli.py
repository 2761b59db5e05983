"""The CLI's own errors: one line on stderr and a non-zero exit, never a traceback."""

from __future__ import annotations

import asyncio
import gc
import os
import subprocess
import sys

import asyncpg
import pytest

from outbox.relay.cli import loop_factory
from tests.test_schema import outbox_cli

pytestmark = pytest.mark.unit


def cli(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`outbox-relay ARGS` with no OUTBOX_* variable of ours but `env`."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")} | env
    return outbox_cli(*args, env=environ)


@pytest.mark.parametrize(
    "flag", ["--backoff-max", "--shutdown-timeout", "--poll-interval", "--database-timeout"]
)
@pytest.mark.parametrize("value", ["inf", "nan"])
def test_infinite_or_nan_durations_are_refused(flag: str, value: str) -> None:
    run = cli("run", "--database-url", "sqlite:///x.db", flag, value)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert flag.removeprefix("--").replace("-", "_") in run.stderr
    assert "finite" in run.stderr


@pytest.mark.parametrize(
    "args",
    [("run", "--batch-size", "many"), ("run", "--no-such-flag"), ("dlq", "nope"), ("nope",)],
)
def test_usage_errors_are_one_line(args: tuple[str, ...]) -> None:
    run = cli(*args)
    assert run.returncode == 2
    assert run.stderr.count("\n") == 1, run.stderr
    assert run.stderr.startswith("outbox-relay: error: ")


def test_an_unknown_outbox_variable_is_named_with_its_close_match() -> None:
    run = cli(
        "run",
        "--database-url",
        "sqlite:///nowhere/x.db",
        OUTBOX_BATCH_SZIE="10",
        OUTBOX_MAX_PAYLOAD_BYTES="1000",  # the writers' setting: known, no warning
    )
    warnings = [line for line in run.stderr.splitlines() if "warning" in line]
    assert warnings == [
        "outbox-relay: warning: OUTBOX_BATCH_SZIE is not a setting "
        "(did you mean OUTBOX_BATCH_SIZE?)"
    ]


def test_run_picks_uvloop_unless_told_otherwise() -> None:
    import uvloop

    assert loop_factory("auto") is uvloop.new_event_loop
    assert loop_factory("uvloop") is uvloop.new_event_loop
    assert loop_factory("asyncio") is None


def test_without_uvloop_auto_is_asyncio_and_uvloop_is_a_one_line_error(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setitem(sys.modules, "uvloop", None)  # `import uvloop` raises ImportError
    assert loop_factory("auto") is None
    with pytest.raises(SystemExit) as exited:
        loop_factory("uvloop")
    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("outbox-relay: error: event_loop: uvloop is not installed")


@pytest.mark.postgres
async def test_dlq_list_escapes_tabs_and_newlines(
    database_url: str, pg: asyncpg.Connection
) -> None:
    await pg.execute(
        "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, "
        "created_at, attempts, first_failed_at, last_failed_at, error_class, error_message, "
        "relay_id) VALUES (gen_random_uuid(), 1, 't', 'a\tkey', '{}', '{}', now(), 1, now(), "
        "now(), 'E', $1, 'r')",
        "line one\nline\ttwo \\ done",
    )
    listed = await asyncio.to_thread(cli, "dlq", "list", "--database-url", database_url)
    assert listed.returncode == 0, listed.stderr
    header, line = listed.stdout.splitlines()
    assert header.split("\t")[:4] == ["event_id", "original_seq", "topic", "key"]
    fields = line.split("\t")
    assert len(fields) == len(header.split("\t")) == 11
    assert fields[3] == "a\\tkey"
    assert fields[8] == "line one\\nline\\ttwo \\\\ done"


@pytest.mark.postgres
async def test_migrate_says_which_revision_it_is_at(empty_database_url: str) -> None:
    from outbox.relay.migrate import head_revision

    up = await asyncio.to_thread(cli, "migrate", OUTBOX_DATABASE_URL=empty_database_url)
    assert (up.returncode, up.stderr) == (0, "")
    assert up.stdout == f"migrated to {head_revision()} (head)\n"
    again = await asyncio.to_thread(cli, "migrate", OUTBOX_DATABASE_URL=empty_database_url)
    assert again.stdout == up.stdout
    down = await asyncio.to_thread(
        cli, "migrate", "--downgrade", "base", OUTBOX_DATABASE_URL=empty_database_url
    )
    assert (down.returncode, down.stdout) == (0, "downgraded to base (no outbox tables)\n")


@pytest.mark.postgres
async def test_a_newcomer_who_forgot_to_migrate_reads_the_hint_in_full(
    empty_database_url: str,
) -> None:
    """Tried as a new user would, on the URL of scripts/services.sh and docker-compose.yml:
    their password was `outbox`, and the relay masks its passwords wherever they show up, so
    every `outbox` of this hint was masked (`no *** tables ...: run `***-relay migrate``)."""
    done = await asyncio.to_thread(cli, "status", OUTBOX_DATABASE_URL=empty_database_url)
    assert done.returncode != 0
    assert done.stderr == (
        "outbox-relay: error: no outbox tables in this database: run `outbox-relay migrate`\n"
    )


@pytest.mark.postgres
@pytest.mark.parametrize(
    ("command", "table"),
    [
        (("run", "--broker", "stdout"), "outbox_events"),
        (("dlq", "list"), "outbox_dead_letters"),
        (("dlq", "replay", "--all"), "outbox_dead_letters"),
        (("republish", "--all"), "outbox_delivered"),
    ],
    ids=["run", "dlq-list", "dlq-replay", "republish"],
)
async def test_every_command_on_a_database_not_migrated_says_to_migrate(
    empty_database_url: str, command: tuple[str, ...], table: str
) -> None:
    """Tried as a new user would: `run` and `dlq` on a database that was never migrated
    printed Postgres's `UndefinedTableError: relation "outbox_events" does not exist`, with no
    word of what to do, where `status` and `republish` said to migrate."""
    done = await asyncio.to_thread(cli, *command, OUTBOX_DATABASE_URL=empty_database_url)
    assert (done.returncode, done.stdout) == (1, "")
    assert done.stderr == (
        f"outbox-relay: error: {table} does not exist in this database:"
        " run `outbox-relay migrate`\n"
    )


@pytest.mark.postgres
async def test_dlq_list_without_dead_letters_prints_nothing(database_url: str) -> None:
    listed = await asyncio.to_thread(cli, "dlq", "list", OUTBOX_DATABASE_URL=database_url)
    assert (listed.returncode, listed.stdout, listed.stderr) == (0, "", "")


@pytest.mark.unit
def test_the_relay_process_collects_garbage_less_often() -> None:
    """`outbox-relay run` raises the collector's thresholds and freezes what it loaded at start
    (docs/benchmarks.md, "Garbage collection"); the test's own collector is restored."""
    from outbox.relay.cli import GC_THRESHOLDS, collect_less

    before = gc.get_threshold()
    try:
        collect_less()
        assert gc.get_threshold() == GC_THRESHOLDS
        assert GC_THRESHOLDS[0] > before[0]
        assert gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)
