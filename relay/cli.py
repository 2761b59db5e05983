"""`outbox-relay`: a thin click shell over `Relay`, `migrate` and the dead-letter queries.

Errors are one line on stderr and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import asyncio
import difflib
import os
import signal
import sys
import uuid
from collections.abc import Callable, Coroutine
from typing import Any, NoReturn, TypeVar

import click
from pydantic import ValidationError

from outbox.urls import redact_text, register_secret
from relay.logs import configure_logging
from relay.settings import RelaySettings

T = TypeVar("T")


def one_line(exc: BaseException) -> str:
    """`ErrorClass: first line of the message`, with passwords in URLs redacted."""
    text = str(exc).splitlines()[0] if str(exc) else ""
    return f"{type(exc).__name__}: {redact_text(text)}"


def fail(message: str, code: int = 2) -> NoReturn:
    click.echo(f"outbox-relay: error: {redact_text(message)}", err=True)
    sys.exit(code)


def describe(exc: ValidationError) -> str:
    first = exc.errors()[0]
    field = ".".join(str(p) for p in first["loc"]) or "settings"
    return f"{field}: {first['msg']}" + (
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


def run_async(coro: Coroutine[Any, Any, T]) -> T:
    from relay.seams import ConfigurationError

    try:
        return asyncio.run(coro)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except ConfigurationError as exc:
        fail(redact_text(str(exc)), 2)
    except Exception as exc:  # noqa: BLE001 - one line on stderr, never a traceback
        fail(one_line(exc), 1)


def remember_secret(_: click.Context, __: click.Parameter, value: str | None) -> str | None:
    register_secret(value)
    return value


def setting_option(name: str, **kw: Any) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """A flag backed by the RelaySettings field of the same name and its OUTBOX_* variable."""
    field = RelaySettings.model_fields[name]
    if name.endswith("_url"):  # its password is masked wherever it shows up
        kw["callback"] = remember_secret
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
@setting_option("kafka_bootstrap")
@setting_option("redis_url")
@setting_option("redis_mode", type=click.Choice(["streams", "pubsub"]))
@setting_option("redis_maxlen", type=int)
@setting_option("topic_prefix")
@setting_option("jsonl_path")
@setting_option("batch_size", type=int)
@setting_option("max_batch_bytes", type=int)
@setting_option("poll_interval", type=float)
@setting_option("lease_seconds", type=float)
@setting_option("max_attempts", type=int)
@setting_option("poison_policy", type=click.Choice(["quarantine", "skip"]))
@setting_option("backoff_base", type=float)
@setting_option("backoff_factor", type=float)
@setting_option("backoff_max", type=float)
@setting_option("shutdown_timeout", type=float)
@setting_option("relay_id")
@setting_option("log_format", type=click.Choice(["auto", "json", "console"]))
@setting_option("log_level", type=click.Choice(["debug", "info", "warning", "error"]))
@setting_option("metrics_port", type=int)
@setting_option("metrics_host")
def run(**given: Any) -> None:
    """Run the relay until SIGTERM or SIGINT."""
    settings = load_settings(**given)
    configure_logging(settings.log_format, settings.log_level)
    from relay.factory import build_relay

    async def _main() -> None:
        relay = build_relay(settings)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, relay.request_stop)
        stop_metrics = None
        if settings.metrics_port is not None:
            from relay.metrics import serve_metrics
            from relay.seams import ConfigurationError

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

    run_async(_main())


@cli.command()
@database_option
@click.option("--sql", is_flag=True, help="Print the SQL instead of running it (for DBAs).")
@click.option("--downgrade", "downgrade_to", metavar="REV", help="Downgrade to REV (or 'base').")
@click.option("--check", is_flag=True, help="Exit 1 unless the database is at the head revision.")
def migrate(database_url: str | None, sql: bool, downgrade_to: str | None, check: bool) -> None:
    """Create or upgrade the outbox tables (their own Alembic history)."""
    from relay import migrate as m

    url = database_url or ("postgresql://" if sql else None)
    if url is None:
        fail("database_url: missing; pass --database-url or set OUTBOX_DATABASE_URL")
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


@cli.group()
def dlq() -> None:
    """Inspect and replay dead letters (also plain SQL: SELECT * FROM outbox_dead_letters)."""


@dlq.command("list")
@database_option
@click.option("--topic", help="Only this topic.")
@click.option("--key", help="Only this key, in original order (a quarantine chain).")
@click.option("--limit", type=click.IntRange(1, 10_000), default=50, show_default=True)
def dlq_list(database_url: str | None, topic: str | None, key: str | None, limit: int) -> None:
    """Show dead letters, one per line (newest first, or a key's chain in order)."""
    from relay.admin import list_dead_letters

    settings = load_settings(database_url=database_url)
    for row in run_async(list_dead_letters(settings.database_url, topic, limit, key)):
        click.echo("\t".join(tsv_cell(v) for v in row.values()))


TSV_ESCAPES = str.maketrans({"\\": "\\\\", "\t": "\\t", "\n": "\\n", "\r": "\\r"})


def tsv_cell(value: object) -> str:
    """One field of a tab-separated line: a tab or newline inside it is escaped, as `\\t`."""
    if value is None:
        return ""
    text = str(value)
    if "\t" in text or "\n" in text or "\r" in text or "\\" in text:
        text = text.translate(TSV_ESCAPES)
    return text


def parse_ids(event_ids: tuple[str, ...]) -> list[uuid.UUID] | None:
    try:
        return [uuid.UUID(i) for i in event_ids] or None
    except ValueError:
        fail(f"--id: {', '.join(event_ids)} is not a valid UUID")


@dlq.command("replay")
@database_option
@click.option("--id", "event_ids", multiple=True, help="Event id to replay (repeatable).")
@click.option("--key", help="Replay the key's dead letters (its quarantine chain), in order.")
@click.option("--topic", help="Replay every dead letter of this topic.")
@click.option("--all", "replay_all", is_flag=True, help="Replay every dead letter.")
def dlq_replay(
    database_url: str | None,
    event_ids: tuple[str, ...],
    key: str | None,
    topic: str | None,
    replay_all: bool,
) -> None:
    """Move dead letters back into the outbox with their original id and seq, attempts reset.

    A quarantine chain goes back whole, in order, and its key is released at once."""
    from relay.admin import ChainError, replay_dead_letters

    if not (event_ids or key or topic or replay_all):
        fail("choose what to replay: --id ID (repeatable), --key KEY, --topic NAME or --all")
    ids = parse_ids(event_ids)
    settings = load_settings(database_url=database_url)
    try:
        count = run_async(replay_dead_letters(settings.database_url, ids, topic, key))
    except ChainError as exc:
        fail(str(exc), 1)
    click.echo(f"replayed {count} dead letter(s)")


@dlq.command("discard")
@database_option
@click.option("--id", "event_ids", multiple=True, help="Event id to drop (repeatable).")
@click.option("--key", help="Drop every dead letter of this key (its chain).")
@click.option("--yes", is_flag=True, help="Really delete them (there is no undo).")
def dlq_discard(
    database_url: str | None, event_ids: tuple[str, ...], key: str | None, yes: bool
) -> None:
    """Delete dead letters for good; dropping a key's chain lifts its quarantine."""
    from relay.admin import discard_dead_letters

    if not (event_ids or key):
        fail("choose what to discard: --id ID (repeatable) or --key KEY")
    ids = parse_ids(event_ids)
    if not yes:
        fail("discarding deletes dead letters for good: add --yes")
    settings = load_settings(database_url=database_url)
    count = run_async(discard_dead_letters(settings.database_url, ids, key))
    click.echo(f"discarded {count} dead letter(s)")


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
    from relay.demo import run_demo

    run_async(run_demo(keep=keep, jsonl_path=jsonl_path))


if __name__ == "__main__":  # pragma: no cover
    main()
