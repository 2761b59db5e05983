"""`outbox-relay status`: what the outbox holds and who relays it, cheap enough for a probe.

Every query is a `status_*` block of queries.sql. A count stops at `COUNT_CAP` rows unless it
is asked to be exact; above the cap the pending and dead-letter counts are Postgres's running
estimate (pg_stat's n_live_tup), and the result says so (`Count.exact`).
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import asyncpg

from outbox.relay.sql import QUERIES
from outbox.relay.stores.postgres import CONNECTION_ERRORS, PLANNER_SETTINGS
from outbox.urls import asyncpg_dsn
from outbox.validation import BUCKETS

#: Rows a count reads at most, unless exact.
COUNT_CAP = 10_000
#: Events due further away than this are reported apart (the writer allows up to a year).
FAR_FUTURE_SECONDS = 86_400.0
#: Version of the `--json` document; bumped only when a field changes meaning or goes away.
JSON_VERSION = 1


class StatusError(Exception):
    """The status could not be read; the message is one line for the operator."""


@dataclass(frozen=True, slots=True)
class Count:
    count: int
    #: False when the count stopped at COUNT_CAP: `count` is then pg_stat's estimate, or, with
    #: `more`, the cap itself (there are more).
    exact: bool
    more: bool = False


@dataclass(frozen=True, slots=True)
class EventInfo:
    seq: int
    id: uuid.UUID
    topic: str
    key: str | None
    created_at: datetime
    available_at: datetime
    attempts: int
    #: Seconds since it was written.
    age: float
    #: Seconds since it became due (created_at, or available_at if later); < 0: not due yet.
    waiting: float


@dataclass(frozen=True, slots=True)
class Waiting:
    """Events not due yet: delayed, or waiting for a retry."""

    #: Retrying, far_future, soonest and latest are over these rows (the first COUNT_CAP + 1
    #: found, unless `count.exact`).
    count: Count
    retrying: int
    delayed: int
    far_future: int
    soonest: datetime | None
    latest: datetime | None


@dataclass(frozen=True, slots=True)
class DeadLetterGroup:
    topic: str
    error_class: str
    count: int
    last_failed_at: datetime


@dataclass(frozen=True, slots=True)
class RelayInfo:
    relay_id: str
    hostname: str
    pid: int
    started_at: datetime
    heartbeat_age: float
    live: bool
    buckets: int


@dataclass(frozen=True, slots=True)
class TableHealth:
    live_tuples: int
    dead_tuples: int
    last_vacuum: datetime | None
    last_autovacuum: datetime | None
    last_analyze: datetime | None
    last_autoanalyze: datetime | None
    size_bytes: int


@dataclass(frozen=True, slots=True)
class OldestTransaction:
    """The oldest open transaction holding back the cleanup of deleted rows."""

    pid: int | None  # None for a prepared transaction
    application_name: str  # the gid of a prepared transaction
    state: str
    prepared: bool
    age: float


@dataclass(frozen=True, slots=True)
class History:
    """The delivered history (outbox_delivered, `history = on`)."""

    count: Count
    #: When the oldest row was delivered; None when the table is empty.
    oldest: datetime | None


@dataclass(frozen=True, slots=True)
class Status:
    now: datetime
    lease_seconds: float
    pending: Count
    oldest_pending: EventInfo | None
    oldest_due: EventInfo | None
    waiting: Waiting
    dead_letters: Count
    #: Over the newest COUNT_CAP dead letters unless `dead_letters.exact`.
    dead_letter_groups: list[DeadLetterGroup]
    quarantined_keys: Count
    relays: list[RelayInfo]
    orphan_buckets: list[int]
    tables: dict[str, TableHealth] = field(default_factory=dict)
    oldest_transaction: OldestTransaction | None = None
    #: None before migration 0008.
    history: History | None = None

    @property
    def live_relays(self) -> int:
        return sum(r.live for r in self.relays)


def problems(status: Status, *, max_pending_age: float, fail_on_dead_letters: bool) -> list[str]:
    """Why the outbox is unhealthy, one phrase per rule; empty when it is healthy."""
    found = []
    due = status.oldest_due
    if due is not None and due.waiting > max_pending_age:
        found.append(
            f"the oldest due event (seq {due.seq}) has waited {duration(due.waiting)}, "
            f"over --max-pending-age {duration(max_pending_age)}"
        )
    if fail_on_dead_letters and status.dead_letters.count:
        found.append(f"{counted(status.dead_letters)} dead letter(s) (--fail-on-dead-letters)")
    if status.pending.count and not status.live_relays:
        found.append(f"{counted(status.pending)} pending event(s) and no live relay")
    return found


def summary(status: Status) -> str:
    """The `ok` line of `--check`."""
    due = status.oldest_due
    oldest = f"oldest due waited {duration(due.waiting)}" if due else "none due"
    return (
        f"{counted(status.pending)} pending, {oldest}, {status.live_relays} live relay(s), "
        f"{counted(status.dead_letters)} dead letter(s)"
    )


# -- reading ------------------------------------------------------------------------------------


def _estimated(counted: int, estimate: int | None, exact: bool) -> Count:
    """A count that stopped above the cap becomes the table's running estimate."""
    if exact or counted <= COUNT_CAP:
        return Count(counted, True)
    return Count(max(COUNT_CAP, estimate or 0), False)


def _capped(counted: int, exact: bool) -> Count:
    """A count that stopped above the cap says only "more than the cap"."""
    if exact or counted <= COUNT_CAP:
        return Count(counted, True)
    return Count(COUNT_CAP, False, more=True)


def _event(row: asyncpg.Record | None, now: datetime) -> EventInfo | None:
    if row is None:
        return None
    due_since = max(row["created_at"], row["available_at"])
    return EventInfo(
        seq=row["seq"],
        id=row["id"],
        topic=row["topic"],
        key=row["key"],
        created_at=row["created_at"],
        available_at=row["available_at"],
        attempts=row["attempts"],
        age=(now - row["created_at"]).total_seconds(),
        waiting=(now - due_since).total_seconds(),
    )


@asynccontextmanager
async def connect(database_url: str) -> AsyncIterator[asyncpg.Connection]:
    """A connection with the relay's planner settings: every status query walks an index."""
    conn = await asyncpg.connect(
        asyncpg_dsn(database_url),
        server_settings={"application_name": "outbox-relay status", **PLANNER_SETTINGS},
    )
    try:
        yield conn
    finally:
        with contextlib.suppress(Exception):  # the server may be gone, or hung
            await conn.close(timeout=2)


async def read_status(
    database_url: str, *, lease_seconds: float, exact: bool = False, timeout: float = 10.0
) -> Status:
    """One consistent snapshot of the outbox (a read-only REPEATABLE READ transaction).
    StatusError when the database cannot be reached within `timeout` seconds, or has no
    outbox tables."""
    try:
        async with (
            asyncio.timeout(timeout),
            connect(database_url) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            return await _read(conn, lease_seconds, exact)
    except TimeoutError as exc:
        raise StatusError(f"database unreachable: no answer within {duration(timeout)}") from exc
    except CONNECTION_ERRORS as exc:
        text = str(exc).splitlines()[0] if str(exc) else ""
        raise StatusError(f"database unreachable: {type(exc).__name__}: {text}") from exc


async def _read(conn: asyncpg.Connection, lease_seconds: float, exact: bool) -> Status:
    head = await conn.fetchrow(QUERIES["status_now"])
    assert head is not None
    if not head["migrated"]:
        raise StatusError("no outbox tables in this database: run `outbox-relay migrate`")
    now: datetime = head["now"]
    limit = None if exact else COUNT_CAP + 1
    tables = {
        r["name"]: TableHealth(
            live_tuples=r["n_live_tup"],
            dead_tuples=r["n_dead_tup"],
            last_vacuum=r["last_vacuum"],
            last_autovacuum=r["last_autovacuum"],
            last_analyze=r["last_analyze"],
            last_autoanalyze=r["last_autoanalyze"],
            size_bytes=r["size_bytes"],
        )
        for r in await conn.fetch(QUERIES["status_tables"])
    }

    def estimate(table: str) -> int | None:
        return tables[table].live_tuples if table in tables else None

    counts = await conn.fetchrow(QUERIES["status_counts"], limit)
    assert counts is not None
    dead = _estimated(counts["dead_letters"], estimate("outbox_dead_letters"), exact)
    waiting = await conn.fetchrow(QUERIES["status_waiting"], limit, FAR_FUTURE_SECONDS)
    assert waiting is not None
    quarantined = await conn.fetchval(QUERIES["status_quarantined_keys"], limit)
    history = None
    if head["has_history"]:
        kept = await conn.fetchrow(QUERIES["status_history"], limit)
        assert kept is not None
        history = History(
            _estimated(kept["counted"], estimate("outbox_delivered"), exact), kept["oldest"]
        )
    return Status(
        now=now,
        lease_seconds=lease_seconds,
        pending=_estimated(counts["events"], estimate("outbox_events"), exact),
        oldest_pending=_event(await conn.fetchrow(QUERIES["status_oldest_pending"]), now),
        oldest_due=_event(await conn.fetchrow(QUERIES["status_oldest_due"]), now),
        waiting=Waiting(
            count=_capped(waiting["counted"], exact),
            retrying=waiting["retrying"],
            delayed=waiting["counted"] - waiting["retrying"],
            far_future=waiting["far"],
            soonest=waiting["soonest"],
            latest=waiting["latest"],
        ),
        dead_letters=dead,
        dead_letter_groups=[
            DeadLetterGroup(r["topic"], r["error_class"], r["dead"], r["last_failed_at"])
            for r in await conn.fetch(
                QUERIES["status_dead_letters"], None if dead.exact else COUNT_CAP
            )
        ],
        quarantined_keys=_capped(quarantined, exact),
        relays=[
            RelayInfo(
                relay_id=r["relay_id"],
                hostname=r["hostname"],
                pid=r["pid"],
                started_at=r["started_at"],
                heartbeat_age=r["heartbeat_age"],
                live=r["live"],
                buckets=r["buckets"],
            )
            for r in await conn.fetch(QUERIES["status_relays"], lease_seconds)
        ],
        orphan_buckets=[
            r["bucket"] for r in await conn.fetch(QUERIES["status_orphan_buckets"], lease_seconds)
        ],
        tables=tables,
        oldest_transaction=_oldest_transaction(
            await conn.fetchrow(QUERIES["status_oldest_transaction"])
        ),
        history=history,
    )


def _oldest_transaction(row: asyncpg.Record | None) -> OldestTransaction | None:
    if row is None:
        return None
    return OldestTransaction(
        pid=row["pid"],
        application_name=row["application_name"] or "",
        state=row["state"] or "",
        prepared=row["prepared"],
        age=row["age"],
    )


# -- rendering ----------------------------------------------------------------------------------


def duration(seconds: float) -> str:
    """0.4 s, 12.3 s, 4 min 5 s, 2 h, 3 d 4 h."""
    sign, s = ("-" if seconds < 0 else ""), abs(seconds)
    if s < 60:
        return f"{sign}{s:.1f} s"
    whole = round(s)
    for unit, size, sub, sub_size in (("d", 86_400, "h", 3_600), ("h", 3_600, "min", 60)):
        if whole >= size:
            rest = whole % size // sub_size
            return f"{sign}{whole // size} {unit}" + (f" {rest} {sub}" if rest else "")
    rest = whole % 60
    return f"{sign}{whole // 60} min" + (f" {rest} s" if rest else "")


def counted(count: Count) -> str:
    if count.exact:
        return f"{count.count:,}"
    return f"more than {count.count:,}" if count.more else f"~{count.count:,}"


def _when(moment: datetime | None) -> str:
    return moment.isoformat(sep=" ", timespec="seconds") if moment else "never"


def _size(size: int) -> str:
    value = float(size)
    for unit in ("B", "kB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{size} B"  # pragma: no cover


def _event_line(event: EventInfo) -> str:
    where = f"seq {event.seq}, topic {event.topic}" + (
        f", key {event.key}" if event.key is not None else ""
    )
    text = f"{where}, written {duration(event.age)} ago"
    if event.waiting < 0:
        return f"{text}, due in {duration(-event.waiting)}"
    if event.available_at > event.created_at:
        text += f", due {duration(event.waiting)} ago"
    return text + (f", {event.attempts} failed attempt(s)" if event.attempts else "")


def _table(rows: list[list[str]], right: int = 0) -> list[str]:
    """Rows as aligned columns, indented; the first `right` columns right-aligned."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))] if rows else []
    return [
        "  "
        + "  ".join(
            cell.rjust(widths[i]) if i < right else cell.ljust(widths[i])
            for i, cell in enumerate(row)
        ).rstrip()
        for row in rows
    ]


def render_text(status: Status, verdict: list[str]) -> str:
    """The human report: one fact a line; `~N` is an estimate, `more than N` a capped count."""
    lines = [f"outbox status at {_when(status.now)} (database time)"]

    def fact(label: str, text: str) -> None:
        lines.append(f"{label:<18}{text}")

    pending = counted(status.pending)
    if not status.pending.exact:
        pending += " (estimate: pg_stat n_live_tup; --exact counts)"
    fact("pending", pending)
    if status.oldest_pending is not None:
        fact("oldest pending", _event_line(status.oldest_pending))
    if status.oldest_due is not None:
        due = status.oldest_due
        fact("oldest due", f"seq {due.seq}, waiting for a relay for {duration(due.waiting)}")
    w = status.waiting
    waiting = counted(w.count)
    if w.count.count:
        of = "" if w.count.exact else f" of the first {w.retrying + w.delayed:,} read"
        waiting += (
            f": {w.retrying:,} retrying, {w.delayed:,} delayed{of}; "
            f"due from {_when(w.soonest)} to {_when(w.latest)}"
        )
    fact("not due yet", waiting)
    if w.far_future:
        fact("due after a day", f"{w.far_future:,} (each holds back the later events of its key)")
    dead = counted(status.dead_letters)
    if not status.dead_letters.exact:
        dead += f" (estimate; by topic and error: the newest {COUNT_CAP:,})"
    fact("dead letters", dead)
    lines += _table(
        [
            [f"{g.count:,}", g.topic, g.error_class, f"last {_when(g.last_failed_at)}"]
            for g in status.dead_letter_groups
        ],
        right=1,
    )
    fact("quarantined keys", counted(status.quarantined_keys))
    if (h := status.history) is not None:
        kept = counted(h.count) + ("" if h.count.exact else " (estimate)")
        fact("history", kept + (f", oldest delivered {_when(h.oldest)}" if h.oldest else ""))
    fact("relays", f"{status.live_relays} live of {len(status.relays)}")
    lines += _table(
        [
            [
                r.relay_id,
                "live" if r.live else "stale",
                f"heartbeat {duration(r.heartbeat_age)} ago",
                f"{r.buckets} bucket(s)",
                f"{r.hostname} pid {r.pid}",
            ]
            for r in status.relays
        ]
    )
    orphans = status.orphan_buckets
    fact(
        "buckets",
        f"{BUCKETS - len(orphans)} of {BUCKETS} held by a live relay"
        + (f"; no live owner: {_ranges(orphans)}" if orphans else ""),
    )
    fact("tables", "(pg_stat estimates)")
    lines += _table(
        [
            [
                name,
                f"{t.live_tuples:,} live",
                f"{t.dead_tuples:,} dead tuples",
                _size(t.size_bytes),
                f"autovacuum {_when(t.last_autovacuum)}",
                f"autoanalyze {_when(t.last_autoanalyze)}",
            ]
            for name, t in sorted(status.tables.items(), key=lambda kv: kv[0] != "outbox_events")
        ]
    )
    if (t := status.oldest_transaction) is not None:
        who = (
            f"prepared transaction {t.application_name!r}"
            if t.prepared
            else f"pid {t.pid} ({t.application_name or 'no application_name'}, {t.state})"
        )
        fact(
            "oldest snapshot",
            f"{duration(t.age)}, {who}: deleted rows stay in the relays' path while it lives",
        )
    fact("health", "unhealthy: " + "; ".join(verdict) if verdict else "ok")
    return "\n".join(lines)


def _ranges(buckets: list[int]) -> str:
    """0-3, 7, 9-10."""
    out: list[str] = []
    for b in buckets:
        if out and out[-1].split("-")[-1] == str(b - 1):
            out[-1] = f"{out[-1].split('-')[0]}-{b}"
        else:
            out.append(str(b))
    return ", ".join(out)


def _iso(moment: datetime | None) -> str | None:
    return moment.isoformat() if moment else None


def _event_json(event: EventInfo | None) -> dict[str, Any] | None:
    if event is None:
        return None
    return {
        "seq": event.seq,
        "id": str(event.id),
        "topic": event.topic,
        "key": event.key,
        "created_at": _iso(event.created_at),
        "available_at": _iso(event.available_at),
        "attempts": event.attempts,
        "age_seconds": round(event.age, 3),
        "waiting_seconds": round(event.waiting, 3),
    }


def to_json(
    status: Status, verdict: list[str], *, max_pending_age: float, fail_on_dead_letters: bool
) -> dict[str, Any]:
    """The `--json` document (its fields are documented in docs/operations.md#status)."""
    w = status.waiting
    return {
        "version": JSON_VERSION,
        "database_time": _iso(status.now),
        "pending": {"count": status.pending.count, "exact": status.pending.exact},
        "oldest_pending": _event_json(status.oldest_pending),
        "oldest_due": _event_json(status.oldest_due),
        "not_due": {
            "count": w.count.count,
            "exact": w.count.exact,
            "retrying": w.retrying,
            "delayed": w.delayed,
            "due_after_a_day": w.far_future,
            "soonest_available_at": _iso(w.soonest),
            "latest_available_at": _iso(w.latest),
        },
        "dead_letters": {
            "count": status.dead_letters.count,
            "exact": status.dead_letters.exact,
            "by_topic_and_error": [
                {
                    "topic": g.topic,
                    "error_class": g.error_class,
                    "count": g.count,
                    "last_failed_at": _iso(g.last_failed_at),
                }
                for g in status.dead_letter_groups
            ],
        },
        "quarantined_keys": {
            "count": status.quarantined_keys.count,
            "exact": status.quarantined_keys.exact,
        },
        "history": None
        if (h := status.history) is None
        else {
            "count": h.count.count,
            "exact": h.count.exact,
            "oldest_delivered_at": _iso(h.oldest),
        },
        "lease_seconds": status.lease_seconds,
        "live_relays": status.live_relays,
        "relays": [
            {
                "relay_id": r.relay_id,
                "hostname": r.hostname,
                "pid": r.pid,
                "started_at": _iso(r.started_at),
                "heartbeat_age_seconds": round(r.heartbeat_age, 3),
                "live": r.live,
                "buckets": r.buckets,
            }
            for r in status.relays
        ],
        "buckets": {"total": BUCKETS, "without_live_owner": status.orphan_buckets},
        "oldest_transaction": None
        if (t := status.oldest_transaction) is None
        else {
            "pid": t.pid,
            "application_name": t.application_name,
            "state": t.state,
            "prepared": t.prepared,
            "age_seconds": round(t.age, 3),
        },
        "tables": {
            name: {
                "live_tuples": t.live_tuples,
                "dead_tuples": t.dead_tuples,
                "size_bytes": t.size_bytes,
                "last_vacuum": _iso(t.last_vacuum),
                "last_autovacuum": _iso(t.last_autovacuum),
                "last_analyze": _iso(t.last_analyze),
                "last_autoanalyze": _iso(t.last_autoanalyze),
            }
            for name, t in sorted(status.tables.items())
        },
        "health": {
            "ok": not verdict,
            "problems": verdict,
            "max_pending_age_seconds": max_pending_age,
            "fail_on_dead_letters": fail_on_dead_letters,
        },
    }
