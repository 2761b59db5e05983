"""`outbox-relay`: a thin click shell over `Relay`, `migrate` and the dead-letter queries.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import difflib
import gc
import json
import math
import os
import re
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from datetime import UTC, datetime, timedelta
from typing import TYPE_CHECKING, Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from outbox.envelope import MODES
from outbox.relay.logs import configure_logging
from outbox.relay.settings import RelaySettings
from outbox.urls import redact_text, register_password, register_secret

if TYPE_CHECKING:
    import asyncpg

    from outbox.relay.admin import Filters

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """`ErrorClass: first line of the message`, with passwords in URLs redacted."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {redact_text(text)}"


#: How Postgres and SQLite name a table that is not there.
_NO_TABLE = re.compile(r'relation "(outbox_\w+)" does not exist|no such table: (outbox_\w+)')


def missing_table(exc: BaseException) -> str | None:
    """The outbox table that `exc` (or what caused it) says is missing: the database was not
    migrated, or not to head."""
    while exc is not None:
        if found := _NO_TABLE.search(str(exc)):
            return found.group(1) or found.group(2)
        exc = exc.__cause__  # type: ignore[assignment]
    return None


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"outbox-relay: error: {redact_text(message)}", err=True)
    sys.exit(code)


def describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    message = first["msg"].removeprefix("Value error, ")
    field = ".".join(str(p) for p in first["loc"])
    if not field and not message.split(" ", 1)[0].endswith(":"):
        field = "settings"  # a check across fields names its fields itself, as `name: ...`
    return (f"{field}: {message}" if field else message) + (
        f" (and {exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
    )


#: OUTBOX_* variables that are not relay settings: read by the writers, or by the tests.
OTHER_VARIABLES = frozenset({"OUTBOX_MAX_PAYLOAD_BYTES", "OUTBOX_REQUIRE_SERVICES"})


def warn_unknown_variables() -> None:
    """A misspelt OUTBOX_* variable would be ignored silently: name it, with its close match."""
    known = {f"OUTBOX_{name.upper()}" for name in RelaySettings.model_fields} | OTHER_VARIABLES
    for name in sorted(os.environ):
        if name.startswith("OUTBOX_") and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            click.echo(f"outbox-relay: warning: {name} is not a setting{hint}", err=True)


def load_settings(**given: Any) -> RelaySettings:
    warn_unknown_variables()
    try:
        return RelaySettings(**{k: v for k, v in given.items() if v is not None})
    except ValidationError as exc:
        fail(describe(exc))


def loop_factory(choice: str) -> Callable[[], asyncio.AbstractEventLoop] | None:
    """The `event_loop` setting's loop maker (None: asyncio's own). uvloop runs the relay's
    Python faster: TLS to Postgres, sockets and callbacks are in C (docs/benchmarks.md,
    "uvloop")."""
    if choice == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        if choice == "auto":
            return None
        fail("event_loop: uvloop is not installed (pip install uvloop), or use asyncio", 2)
    return uvloop.new_event_loop


def run_async(coro: Coroutine[Any, Any, T], event_loop: str = "asyncio") -> T:
    from outbox.relay.seams import ConfigurationError

    try:
        with asyncio.Runner(loop_factory=loop_factory(event_loop)) as runner:
            return runner.run(coro)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except ConfigurationError as exc:
        fail(redact_text(str(exc)), 2)
    except ModuleNotFoundError:
        raise  # a missing extra: outbox-relay's main names it (relay/__main__.py)
    except Exception as exc:  # noqa: BLE001 - one line on stderr, never a traceback
        if table := missing_table(exc):
            fail(f"{table} does not exist in this database: run `outbox-relay migrate`", 1)
        fail(one_line(exc), 1)


def remember_secret(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    register_secret(value)
    return value


def remember_password(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    register_password(value)
    return value


def setting_option(name: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flag backed by the RelaySettings field of the same name and its OUTBOX_* variable."""
    field = RelaySettings.model_fields[name]
    if name.endswith("_url"):  # its password is masked wherever it shows up
        kw["callback"] = remember_secret
    elif name.endswith("_password"):
        kw["callback"] = remember_password
    return click.option(
        f"--{name.replace('_', '-')}",
        name,
        envvar=f"OUTBOX_{name.upper()}",
        show_envvar=True,
        help=field.description,
        default=None,
        **kw,
    )


def database_option(f: Callable[..., Any]) -> Callable[..., Any]:
    return setting_option("database_url")(f)


def broker_connection_options(f: Callable[..., Any]) -> Callable[..., Any]:
    """How to reach Kafka or Redis: the same flags for `run` and `tail`."""
    options = [
        setting_option("kafka_bootstrap"),
        setting_option(
            "kafka_security_protocol",
            type=click.Choice(
                ["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"], case_sensitive=False
            ),
        ),
        setting_option(
            "kafka_sasl_mechanism",
            type=click.Choice(["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"], case_sensitive=False),
        ),
        setting_option("kafka_sasl_username"),
        setting_option("kafka_sasl_password"),
        setting_option("kafka_ssl_ca_file"),
        setting_option("kafka_ssl_cert_file"),
        setting_option("kafka_ssl_key_file"),
        setting_option("kafka_ssl_key_password"),
        setting_option("redis_url"),
        setting_option("redis_mode", type=click.Choice(["streams", "pubsub"])),
    ]
    for option in reversed(options):  # decorators apply bottom-up: keep the listed order
        f = option(f)
    return f


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
def cli() -> None:
    """Transactional outbox relay: publishes committed outbox rows to Kafka or Redis."""


def main() -> None:
    """The `outbox-relay` command. Usage errors are one line too (click prints four)."""
    try:
        cli(standalone_mode=False)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except click.exceptions.Abort:
        fail("interrupted", 130)
    except click.exceptions.NoArgsIsHelpError as exc:  # `outbox-relay` alone: its help
        click.echo(exc.format_message(), err=True)
        sys.exit(exc.exit_code)
    except click.ClickException as exc:
        fail(exc.format_message().replace("\n", " "), exc.exit_code)


@cli.command()
@database_option
@setting_option("broker", type=click.Choice(["kafka", "redis", "stdout"]))
@broker_connection_options
@setting_option("redis_maxlen", type=int)
@setting_option("topic_prefix")
@setting_option("envelope", type=click.Choice(MODES))
@setting_option("envelope_topics", metavar="TOPIC=MODE,...")
@setting_option("source")
@setting_option("jsonl_path")
@setting_option("batch_size", type=int)
@setting_option("max_batch_bytes", type=int)
@setting_option("poll_interval", type=float)
@setting_option("lease_seconds", type=float)
@setting_option("database_timeout", type=float)
@setting_option("max_attempts", type=int)
@setting_option("poison_policy", type=click.Choice(["quarantine", "skip"]))
@setting_option("backoff_base", type=float)
@setting_option("backoff_factor", type=float)
@setting_option("backoff_max", type=float)
@setting_option("shutdown_timeout", type=float)
@setting_option("relay_id")
@setting_option("log_format", type=click.Choice(["auto", "json", "console"]))
@setting_option("log_level", type=click.Choice(["debug", "info", "warning", "error"]))
@setting_option("event_loop", type=click.Choice(["auto", "uvloop", "asyncio"]))
@setting_option("metrics_port", type=int)
@setting_option("metrics_host")
@setting_option("history", type=click.Choice(["off", "on"]))
@setting_option("history_retention", metavar="DURATION")
@setting_option("dead_letter_retention", metavar="DURATION")
def run(**given: Any) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    settings = load_settings(**given)
    configure_logging(settings.log_format, settings.log_level)
    from outbox.relay.factory import build_relay

    async def _main() -> None:
        relay = build_relay(settings)
        collect_less()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.request_stop)
        stop_metrics = None
        if settings.metrics_port is not None:
            from outbox.relay.metrics import serve_metrics
            from outbox.relay.seams import ConfigurationError

            try:
                stop_metrics = serve_metrics(relay, settings.metrics_port, settings.metrics_host)
            except OSError as exc:
                where = f"{settings.metrics_host}:{settings.metrics_port}"
                raise ConfigurationError(
                    f"metrics_port: cannot serve /metrics on {where}: {exc.strerror or exc}"
                ) from exc
        try:
            await relay.run()
        finally:
            if stop_metrics is not None:
                stop_metrics()

    run_async(_main(), settings.event_loop)


#: The cyclic garbage collector's thresholds in an `outbox-relay run` process (Python's are
#: 700, 10, 10). A claim allocates tens of thousands of objects that live until it is settled:
#: at 700 the collector ran hundreds of times a second and took 10-25 % of a drain's CPU
#: (docs/benchmarks.md, "Garbage collection").
GC_THRESHOLDS = (50_000, 20, 100)


def collect_less() -> None:
    """Tune the collector for the relay's own process (never an application's: the embedded
    relay leaves it alone). What is loaded at start lives for good: frozen, it is not scanned
    again."""
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)


@cli.command()
@database_option
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it (for DBAs).")
@click.option("--downgrade", "downgrade_to", metavar="REV", help="Downgrade to REV (or 'base').")
@click.option("--check", is_flag=True, help="Exit 1 unless the database is at the head revision.")
def migrate(database_url: str | None, sql: bool, downgrade_to: str | None, check: bool) -> None:
    """Create or upgrade the outbox tables (their own Alembic history)."""
    from outbox.relay import migrate as m
    from outbox.urls import is_sqlite

    url = database_url or ("postgresql://" if sql else None)
    if url is None:
        fail("database_url: missing; pass --database-url or set OUTBOX_DATABASE_URL")
    if sql and is_sqlite(url):  # batch mode copies SQLite tables: it needs the live file
        fail("--sql: prints PostgreSQL's script only; migrate a SQLite file without --sql")
    if check:
        current = run_async(m.current_revision(url))
        head = m.head_revision()
        if current != head:
            fail(f"database is at {current or 'no revision'}, head is {head}", 1)
        click.echo(f"at head ({head})")
        return
    try:
        if downgrade_to:
            m.downgrade(url, downgrade_to, sql=sql)
        else:
            m.upgrade(url, sql=sql)
    except Exception as exc:  # noqa: BLE001 - one line on stderr, never a traceback
        fail(one_line(exc), 1)
    if not sql:  # with --sql, stdout is the script alone
        now_at = run_async(m.current_revision(url))
        head = m.head_revision()
        where = f"{now_at} (head)" if now_at == head else (now_at or "base (no outbox tables)")
        click.echo(f"{'downgraded' if downgrade_to else 'migrated'} to {where}")


@cli.group()
def dlq() -> None:
    """Inspect, replay and purge dead letters (also plain SQL: SELECT * FROM outbox_dead_letters).

    Every command takes the same filters (all of them must match) and --json."""


def text_filter(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    if not value:
        raise click.BadParameter("empty")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise click.BadParameter("not valid UTF-8") from None
    return value


def to_uuid(text: str) -> uuid.UUID:
    try:
        return uuid.UUID(text)
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a UUID") from None


def id_filter(
    _: click.Context, __: click.Parameter, values: tuple[str, ...]
) -> tuple[uuid.UUID, ...]:
    return tuple(to_uuid(v) for v in values)


def id_argument(_: click.Context, __: click.Parameter, value: str) -> uuid.UUID:
    return to_uuid(value)


AGE = re.compile(r"(\d{1,9})([smhdw])")
AGE_UNITS = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def parse_time(text: str, now: datetime) -> datetime:
    """An ISO-8601 time (UTC unless it has an offset), or an age before `now`: 15m, 2h, 7d."""
    text = text.strip()
    age = AGE.fullmatch(text)
    try:
        if age:
            return now - timedelta(**{AGE_UNITS[age[2]]: int(age[1])})
        moment = datetime.fromisoformat(text)
    except (ValueError, OverflowError):
        raise ValueError(
            f"{text!r} is not an ISO-8601 time (2026-11-30T12:00:00Z) or an age (15m, 2h, 7d)"
        ) from None
    return moment if moment.tzinfo else moment.replace(tzinfo=UTC)


def time_filter(_: click.Context, __: click.Parameter, value: str | None) -> datetime | None:
    if value is None:
        return None
    try:
        return parse_time(value, datetime.now(UTC))
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


#: The options every `dlq` command takes; `selection()` reads them back.
DLQ_OPTIONS = (
    database_option,
    click.option(
        "--id",
        "event_ids",
        multiple=True,
        callback=id_filter,
        metavar="EVENT_ID",
        help="This event id (repeatable: any of them).",
    ),
    click.option("--topic", callback=text_filter, help="Only this topic."),
    click.option(
        "--key", callback=text_filter, help="Only this key (its quarantine chain, in order)."
    ),
    click.option("--type", "event_type", callback=text_filter, help="Only this event type."),
    click.option(
        "--error-class",
        callback=text_filter,
        help="Only this error class (Quarantined: events parked behind a poison event).",
    ),
    click.option(
        "--since",
        callback=time_filter,
        metavar="TIME",
        help="Dead-lettered at or after TIME: ISO-8601 (UTC unless it has an offset), "
        "or an age: 30s, 15m, 2h, 7d, 1w.",
    ),
    click.option(
        "--until", callback=time_filter, metavar="TIME", help="Dead-lettered before TIME."
    ),
    click.option("--json", "as_json", is_flag=True, help="JSON output (see docs/operations.md)."),
)


def dlq_options(f: Callable[..., Any]) -> Callable[..., Any]:
    for option in reversed(DLQ_OPTIONS):
        f = option(f)
    return f


def selection(given: dict[str, Any]) -> tuple[str, Filters]:
    """The database URL and the filters of a `dlq` command's options."""
    from outbox.relay.admin import Filters

    since, until = given["since"], given["until"]
    if since is not None and until is not None and since >= until:
        fail(f"--since: {since.isoformat()} is not before --until {until.isoformat()}")
    filters = Filters(
        given["event_ids"],
        given["topic"],
        given["key"],
        given["event_type"],
        since,
        until,
        error_class=given["error_class"],
    )
    return load_settings(database_url=given["database_url"]).database_url, filters


def on_dead_letters(url: str, action: Callable[[asyncpg.Connection], Awaitable[T]]) -> T:
    """Run one admin action on its own connection (relay.admin.connect). A refused replay
    (ChainError) is one line and exit 1."""
    from outbox.relay.admin import ChainError, connect

    async def _run() -> T | ChainError:
        async with connect(url) as conn:
            try:
                return await action(conn)
            except ChainError as exc:
                return exc

    result = run_async(_run())
    if isinstance(result, ChainError):
        fail(str(result), 1)
    return result


def echo_json(document: object) -> None:
    click.echo(json.dumps(document, ensure_ascii=False))


#: `dlq list` without --json: these fields, tab-separated.
TSV_FIELDS = (
    "event_id",
    "original_seq",
    "topic",
    "key",
    "event_type",
    "attempts",
    "last_failed_at",
    "error_class",
    "error_message",
    "holds_key",
    "held_behind",
)


@dlq.command("list")
@dlq_options
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
def dlq_list(limit: int, as_json: bool, **given: Any) -> None:
    """Dead letters, one per line: newest first, or with --key that key's chain in order.

    Tab-separated under a header line of the field names (a tab, newline or backslash inside a
    field escaped as \\t, \\n, \\\\), or with --json one JSON document per line (JSON lines)."""
    from outbox.relay.admin import document, list_dead_letters

    url, filters = selection(given)
    rows = on_dead_letters(url, lambda conn: list_dead_letters(conn, filters, limit))
    if rows and not as_json:
        click.echo("\t".join(TSV_FIELDS))  # the header line
    for row in rows:
        if as_json:
            echo_json(document(row))
        else:
            click.echo("\t".join(tsv_cell(row[name]) for name in TSV_FIELDS))


TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_cell(value: object) -> str:
    """One field of a tab-separated line: a tab or newline inside it is escaped, as `\\t`."""
    if value is None:
        return ""
    text = str(value)
    if "\t" in text or "\n" in text or "\r" in text or "\\" in text:
        text = text.translate(TSV_ESCAPES)
    return text


@dlq.command("show")
@click.argument("event_id", callback=id_argument)
@dlq_options
@click.option("--limit", type=click.IntRange(min=1), help="At most N (an id is rarely twice).")
def dlq_show(event_id: uuid.UUID, limit: int | None, as_json: bool, **given: Any) -> None:
    """One dead letter in full, with its headers and payload (every dead letter of that id)."""
    from outbox.relay.admin import document, show_dead_letters

    given["event_ids"] = (event_id, *given["event_ids"])
    url, filters = selection(given)
    rows = on_dead_letters(url, lambda conn: show_dead_letters(conn, filters, limit))
    if not rows:
        fail(f"no dead letter of event {event_id} matches", 1)
    for n, row in enumerate(rows):
        doc = document(row)
        if as_json:
            echo_json(doc)
            continue
        if n:
            click.echo()
        for name, value in doc.items():
            if name in {"headers", "payload"}:
                text = json.dumps(
                    value, ensure_ascii=False, indent=2 if name == "payload" else None
                )
            else:
                text = tsv_cell(value)
            click.echo(f"{name}: {text}")


@dlq.command("count")
@dlq_options
@click.option("--limit", type=click.IntRange(min=1), help="Stop counting at N.")
def dlq_count(limit: int | None, as_json: bool, **given: Any) -> None:
    """How many dead letters the filters choose."""
    from outbox.relay.admin import summarize

    url, filters = selection(given)
    total = sum(g.count for g in on_dead_letters(url, lambda c: summarize(c, filters, limit)))
    if as_json:
        echo_json({"count": total})
    else:
        click.echo(total)


def batch_options(f: Callable[..., Any]) -> Callable[..., Any]:
    f = click.option(
        "--batch-size",
        type=click.IntRange(1, 100_000),
        default=1000,
        show_default=True,
        help="Dead letters per transaction (a quarantine chain is never split).",
    )(f)
    return click.option(
        "--limit", type=click.IntRange(min=1), help="At most N of them, oldest first."
    )(f)


def anything_chosen(given: dict[str, Any]) -> bool:
    names = ("event_ids", "topic", "key", "event_type", "error_class", "since", "until")
    return any(given[name] for name in names)


@dlq.command("replay")
@dlq_options
@click.option(
    "--all", "replay_all", is_flag=True, help="Every dead letter (that the filters choose)."
)
@batch_options
def dlq_replay(
    replay_all: bool, limit: int | None, batch_size: int, as_json: bool, **given: Any
) -> None:
    """Move dead letters back into the outbox with their original id and seq, attempts reset.

    A quarantine chain goes back whole, in order and in one transaction, and its key is
    released with it: a selection that holds part of a chain without its head (the poison
    event) is refused, with the command that replays the chain."""
    from outbox.relay.admin import Filters, Replayed, replay_dead_letters, show_dead_letters

    if not (anything_chosen(given) or replay_all):
        fail(
            "choose what to replay: --id, --key, --topic, --type, --error-class, --since, "
            "--until, or --all"
        )
    url, filters = selection(given)

    async def replay(conn: asyncpg.Connection) -> Replayed | list[uuid.UUID]:
        if filters.event_ids:  # an id that is no dead letter is a mistake: replay nothing
            known = {
                r["event_id"] for r in await show_dead_letters(conn, Filters(filters.event_ids))
            }
            missing = [i for i in dict.fromkeys(filters.event_ids) if i not in known]
            if missing:
                return missing
        return await replay_dead_letters(conn, filters, limit=limit, batch_size=batch_size)

    done = on_dead_letters(url, replay)
    if isinstance(done, list):
        ids = ", ".join(str(i) for i in done)
        fail(f"--id: no dead letter has the id(s) {ids}; nothing replayed", 1)
    if as_json:
        echo_json(
            {
                "replayed": done.replayed,
                "transactions": done.transactions,
                "released_keys": done.released_keys,
            }
        )
        return
    released = f"; {done.released_keys} quarantined key(s) released" if done.released_keys else ""
    click.echo(
        f"replayed {done.replayed} dead letter(s) in {done.transactions} transaction(s)" + released
    )


@dlq.command("purge")
@dlq_options
@click.option(
    "--all", "purge_all", is_flag=True, help="Every dead letter (that the filters choose)."
)
@batch_options
@click.option("--yes", is_flag=True, help="Delete them for good; without it, only show them.")
def dlq_purge(
    purge_all: bool, limit: int | None, batch_size: int, yes: bool, as_json: bool, **given: Any
) -> None:
    """Delete dead letters for good: shows what the filters choose, and deletes it with --yes.

    Purging a key's chain lifts its quarantine; purging its head (the poison event) leaves the
    rest of the chain holding the key, for `dlq replay --key`."""
    if not (anything_chosen(given) or purge_all):
        fail(
            "choose what to purge: --id, --key, --topic, --type, --error-class, --since, "
            "--until, or --all"
        )
    url, filters = selection(given)
    run_purge(url, filters, limit=limit, batch_size=batch_size, yes=yes, as_json=as_json)


def run_purge(
    url: str, filters: Filters, *, limit: int | None, batch_size: int, yes: bool, as_json: bool
) -> None:
    from outbox.relay.admin import Group, Purged, purge_dead_letters, summarize

    async def purge(conn: asyncpg.Connection) -> tuple[list[Group], Purged]:
        groups = await summarize(conn, filters, limit)
        if not yes:
            return groups, Purged(0, 0)
        return groups, await purge_dead_letters(conn, filters, limit=limit, batch_size=batch_size)

    groups, done = on_dead_letters(url, purge)
    matched = sum(g.count for g in groups)
    if as_json:
        echo_json(
            {
                "dry_run": not yes,
                "matched": matched,
                "purged": done.purged,
                "transactions": done.transactions,
                "summary": [g.document() for g in groups],
            }
        )
        return
    if groups:
        click.echo("topic\terror_class\tcount\tholding_key\toldest\tnewest")
    for g in groups:
        cells = (g.topic, g.error_class, g.count, g.holding_key, g.oldest, g.newest)
        click.echo("\t".join(tsv_cell(c) for c in cells))
    if yes:
        click.echo(f"purged {done.purged} dead letter(s) in {done.transactions} transaction(s)")
    else:
        click.echo(f"would purge {matched} dead letter(s); nothing deleted: add --yes to delete")


@dlq.command("discard", hidden=True)
@database_option
@click.option("--id", "event_ids", multiple=True, callback=id_filter)
@click.option("--key", callback=text_filter)
@click.option("--yes", is_flag=True)
def dlq_discard(
    database_url: str | None, event_ids: tuple[uuid.UUID, ...], key: str | None, yes: bool
) -> None:
    """The old name of `purge --id/--key --yes`, for scripts: wants --yes, prints `discarded N`."""
    from outbox.relay.admin import Filters, purge_dead_letters

    if not (event_ids or key):
        fail("choose what to discard: --id ID (repeatable) or --key KEY")
    if not yes:
        fail("discarding deletes dead letters for good: add --yes")
    url = load_settings(database_url=database_url).database_url
    if event_ids and key:  # the old command dropped either: --id ... or --key ...
        by_id = on_dead_letters(url, lambda c: purge_dead_letters(c, Filters(event_ids)))
        by_key = on_dead_letters(url, lambda c: purge_dead_letters(c, Filters(key=key)))
        count = by_id.purged + by_key.purged
    else:
        filters = Filters(event_ids, key=key)
        count = on_dead_letters(url, lambda c: purge_dead_letters(c, filters)).purged
    click.echo(f"discarded {count} dead letter(s)")


@cli.command()
@database_option
@click.option(
    "--id",
    "event_ids",
    multiple=True,
    callback=id_filter,
    metavar="EVENT_ID",
    help="This event id (repeatable: any of them).",
)
@click.option("--topic", callback=text_filter, help="Only this topic.")
@click.option("--key", callback=text_filter, help="Only this key.")
@click.option("--type", "event_type", callback=text_filter, help="Only this event type.")
@click.option(
    "--since",
    callback=time_filter,
    metavar="TIME",
    help="Delivered at or after TIME: ISO-8601 (UTC unless it has an offset), "
    "or an age: 30s, 15m, 2h, 7d, 1w.",
)
@click.option("--until", callback=time_filter, metavar="TIME", help="Delivered before TIME.")
@click.option("--all", "everything", is_flag=True, help="Every delivered event in the history.")
@click.option("--dry-run", is_flag=True, help="Show what would be republished; change nothing.")
@click.option(
    "--batch-size",
    type=click.IntRange(1, 100_000),
    default=1000,
    show_default=True,
    help="Events per transaction.",
)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
def republish(
    everything: bool, dry_run: bool, batch_size: int, as_json: bool, **given: Any
) -> None:
    """Put delivered events (history = on) back into the outbox, for a consumer that lost its
    data: original id, seq and created_at, so they keep their relative order, and the header
    outbox-republished-at. Events still in the outbox are skipped."""
    from outbox.relay.admin import (
        HistoryFilters,
        HistoryGroup,
        Republished,
        connect,
        republish,
        summarize_history,
    )

    names = ("event_ids", "topic", "key", "event_type", "since", "until")
    if not (everything or any(given[name] for name in names)):
        fail("choose what to republish: --id, --key, --topic, --type, --since, --until, or --all")
    since, until = given["since"], given["until"]
    if since is not None and until is not None and since >= until:
        fail(f"--since: {since.isoformat()} is not before --until {until.isoformat()}")
    filters = HistoryFilters(*(given[name] for name in names))
    url = load_settings(database_url=given["database_url"]).database_url

    async def _run() -> tuple[list[HistoryGroup], Republished]:
        async with connect(url) as conn:
            groups = await summarize_history(conn, filters)
            if dry_run or not groups:
                return groups, Republished(0, 0, 0)
            at = datetime.now(UTC)
            return groups, await republish(conn, filters, at=at, batch_size=batch_size)

    groups, done = run_async(_run())
    matched = sum(g.count for g in groups)
    if as_json:
        echo_json(
            {
                "dry_run": dry_run,
                "matched": matched,
                "republished": done.republished,
                "skipped": done.skipped,
                "transactions": done.transactions,
                "summary": [g.document() for g in groups],
            }
        )
        return
    if groups:
        click.echo("topic\tcount\toldest\tnewest")
    for g in groups:
        click.echo("\t".join(tsv_cell(c) for c in (g.topic, g.count, g.oldest, g.newest)))
    if dry_run:
        click.echo(f"would republish {matched} event(s); nothing changed: drop --dry-run")
        return
    skipped = f"; {done.skipped} still in the outbox, skipped" if done.skipped else ""
    count = f"republished {done.republished} event(s) in {done.transactions} transaction(s)"
    click.echo(count + skipped)


def finite(_: click.Context, __: click.Parameter, value: float) -> float:
    if not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number of seconds")
    return value


@cli.command()
@database_option
@setting_option("lease_seconds", type=float)
@click.option("--json", "as_json", is_flag=True, help="One JSON document on stdout.")
@click.option("--check", is_flag=True, help="A probe: one line, exit 1 when unhealthy.")
@click.option(
    "--max-pending-age",
    type=click.FloatRange(min=0),
    callback=finite,
    default=60.0,
    show_default=True,
    help="Unhealthy when the oldest due event has waited longer for a relay.",
)
@click.option(
    "--fail-on-dead-letters", is_flag=True, help="Unhealthy while any dead letter exists."
)
@click.option("--exact", is_flag=True, help="Count every row (counts stop at 10,000 otherwise).")
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    callback=finite,
    default=10.0,
    show_default=True,
    help="Give up (exit 1) when the database has not answered by then.",
)
def status(
    database_url: str | None,
    lease_seconds: float | None,
    as_json: bool,
    check: bool,
    max_pending_age: float,
    fail_on_dead_letters: bool,
    exact: bool,
    timeout: float,
) -> None:
    """Pending events, retries, dead letters, relays and their buckets, table health.

    With --check, prints `ok: ...` or `unhealthy: ...` (exit 1); exit 1 too when the
    database cannot be read."""
    import json

    from outbox.relay import status as s
    from outbox.urls import is_sqlite

    settings = load_settings(database_url=database_url, lease_seconds=lease_seconds)
    if is_sqlite(settings.database_url):
        fail(
            "database_url: status needs a postgresql:// URL (on SQLite, one relay: "
            "`outbox-relay dlq count` and `outbox-relay migrate --check`)"
        )

    async def _read() -> s.Status | str:
        try:
            return await s.read_status(
                settings.database_url,
                lease_seconds=settings.lease_seconds,
                exact=exact,
                timeout=timeout,
            )
        except s.StatusError as exc:  # unreachable, or not migrated: exit 1, as unhealthy
            return str(exc)

    found = run_async(_read())
    if isinstance(found, str):
        fail(found, 1)
    verdict = s.problems(
        found, max_pending_age=max_pending_age, fail_on_dead_letters=fail_on_dead_letters
    )
    if as_json:
        document = s.to_json(
            found,
            verdict,
            max_pending_age=max_pending_age,
            fail_on_dead_letters=fail_on_dead_letters,
        )
        click.echo(json.dumps(document))  # one line, for jq and log scrapers
    elif check:
        click.echo(f"unhealthy: {'; '.join(verdict)}" if verdict else f"ok: {s.summary(found)}")
    else:
        click.echo(s.render_text(found, verdict))
    if check and verdict:
        sys.exit(1)


@cli.command()
@click.argument("topic", callback=text_filter)
@setting_option("broker", type=click.Choice(["kafka", "redis"]))
@broker_connection_options
@setting_option("topic_prefix")
@click.option(
    "--from-beginning", is_flag=True, help="Every event still on the topic, then new ones."
)
@click.option("--max", "max_events", type=click.IntRange(min=1), help="Stop after N events.")
@click.option("--json", "as_json", is_flag=True, help="One JSON document per event (JSON lines).")
def tail(
    topic: str, from_beginning: bool, max_events: int | None, as_json: bool, **given: Any
) -> None:
    """Print the events the relay publishes to TOPIC, one line each: id, seq, key, type,
    payload. Reads Kafka or Redis with the settings of `run` (any envelope mode), from now
    or --from-beginning, until SIGINT/SIGTERM or --max N events."""
    from outbox.relay import tail as t

    if not os.environ.get("OUTBOX_DATABASE_URL"):  # tail reads no database; settings want one
        given["database_url"] = "sqlite:///tail-reads-no-database.db"
    settings = load_settings(**given)
    if settings.broker == "stdout":
        fail("broker: tail reads kafka or redis: pass --broker kafka or --broker redis")

    async def _main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)

        def ready(where: str) -> None:
            start = "the beginning" if from_beginning else "now"
            click.echo(f"outbox-relay: tail: reading {where} from {start}", err=True)

        await t.tail(
            settings,
            topic,
            from_beginning=from_beginning,
            max_events=max_events,
            as_json=as_json,
            stop=stop,
            emit=lambda line: click.echo(line),
            ready=ready,
            warn=lambda line: click.echo(f"outbox-relay: warning: {line}", err=True),
        )

    run_async(_main())


@cli.command()
@click.option("--keep", is_flag=True, help="Keep the temporary directory and print its path.")
@click.option(
    "--jsonl",
    "jsonl_path",
    metavar="PATH",
    type=click.Path(dir_okay=False),
    help="Append the published events as JSON lines to PATH.",
)
def demo(keep: bool, jsonl_path: str | None) -> None:
    """Run the outbox end to end on a throwaway SQLite database (no servers needed)."""
    configure_logging("console", "error")  # the demo fails events on purpose; keep it quiet
    from outbox.relay.demo import run_demo

    run_async(run_demo(keep=keep, jsonl_path=jsonl_path))


if __name__ == "__main__":  # pragma: no cover
    main()
