"""`outbox-relay dlq`: list, show, count, replay and purge, their filters, on real Postgres.

What is proved here: each filter binds its value (hostile strings change exactly the rows
that hold them), a big replay goes in batches that each keep quarantine chains whole, the chain
rule under filters, bad input as one line that changes nothing, the JSON documents, the
indexes the filters use, and every `outbox-relay dlq` command the docs show.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import random
import re
import shlex
import subprocess
import uuid
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from click.testing import CliRunner
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from outbox.relay.admin import (
    DOCUMENT_FIELDS,
    FILTERED,
    ChainError,
    Filters,
    connect,
    purge_dead_letters,
    replay_dead_letters,
)
from outbox.relay.cli import cli, parse_time
from outbox.relay.sql import QUERIES
from tests.test_schema import outbox_cli

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
_seqs = itertools.count(1)


@dataclass
class Dead:
    """One dead letter to seed; `age`: seconds since it was dead-lettered."""

    topic: str = "orders"
    key: str | None = None
    event_type: str | None = "OrderPlaced"
    error_class: str = "ResponseError"
    age: float = 60.0
    holds_key: bool = False
    held_behind: uuid.UUID | None = None
    seq: int = field(default_factory=lambda: next(_seqs))
    event_id: uuid.UUID = field(default_factory=uuid.uuid4)
    payload: dict[str, Any] = field(default_factory=lambda: {"n": next(_seqs)})
    headers: dict[str, str] = field(default_factory=lambda: {"source": "test"})


INSERT = (
    "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, headers, "
    "event_type, created_at, attempts, first_failed_at, last_failed_at, error_class, "
    "error_message, relay_id, holds_key, held_behind) VALUES ($1, $2, $3, $4, $5, $6, $7, "
    "now() - interval '1 day', 1, now() - make_interval(secs => $8), "
    "now() - make_interval(secs => $8), $9, 'it failed', 'r1', $10, $11)"
)


async def seed(pg: asyncpg.Connection, rows: list[Dead]) -> None:
    """Replace the dead letters (and the queue) with `rows`, inserted in this order."""
    await pg.execute("DELETE FROM outbox_dead_letters")
    await pg.execute("DELETE FROM outbox_events")
    await pg.executemany(
        INSERT,
        [
            (
                r.event_id,
                r.seq,
                r.topic,
                r.key,
                json.dumps(r.payload),
                json.dumps(r.headers),
                r.event_type,
                r.age,
                r.error_class,
                r.holds_key,
                r.held_behind,
            )
            for r in rows
        ],
    )


def chain(key: str, length: int, *, topic: str = "orders", age: float = 600.0) -> list[Dead]:
    """A quarantine chain: the poison event, then `length - 1` events parked behind it."""
    head = Dead(topic, key, error_class="MessageSizeTooLargeError", age=age, holds_key=True)
    return [head] + [
        Dead(
            topic,
            key,
            error_class="Quarantined",
            age=age - n,
            holds_key=True,
            held_behind=head.event_id,
        )
        for n in range(1, length)
    ]


async def dead_ids(pg: asyncpg.Connection) -> set[uuid.UUID]:
    return {r[0] for r in await pg.fetch("SELECT event_id FROM outbox_dead_letters")}


async def queued_ids(pg: asyncpg.Connection) -> set[uuid.UUID]:
    return {r[0] for r in await pg.fetch("SELECT id FROM outbox_events")}


async def snapshot(pg: asyncpg.Connection) -> list[Any]:
    """Everything a dlq command could change."""
    dead = await pg.fetch("SELECT * FROM outbox_dead_letters ORDER BY dead_letter_id")
    queued = await pg.fetch("SELECT * FROM outbox_events ORDER BY seq")
    return [tuple(r) for r in dead] + [tuple(r) for r in queued]


def dlq(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    """`outbox-relay dlq ARGS` in a child process, on this database."""
    return outbox_cli("dlq", *args, env=os.environ | {"OUTBOX_DATABASE_URL": database_url})


# -- every filter is a bound parameter ------------------------------------------------------

HOSTILE = st.one_of(
    st.sampled_from(
        [
            "'",
            "''",
            "\\",
            "%",
            "_",
            "*",
            "' OR '1'='1",
            "x' OR true --",
            "'); DELETE FROM outbox_dead_letters; --",
            "$1",
            "NULL",
            "orders%",
            "ord_rs",
            " orders",
            "ORDERS",
            "E'\\x41'",
            "\u200borders",
            "line\nbreak",
            "{}",
            "ANY('{}')",
        ]
    ),
    st.text(
        st.characters(exclude_categories=["Cs"], exclude_characters="\x00"),
        min_size=1,
        max_size=24,
    ),
)
FIELDS = {"topic": "topic", "key": "key", "type": "event_type", "error-class": "error_class"}


def around(value: str, name: str) -> list[Dead]:
    """Dead letters whose `name` is `value`, or close to it, or an ordinary one."""
    near = {value, value.upper(), value.lower(), value + " ", value + "%", "x" + value, "orders"}
    rows = [Dead(key="order-1") for _ in range(2 * len(near))]
    for row, v in zip(rows, sorted(near) * 2, strict=True):
        setattr(row, name, v)
    return [*rows, Dead(), Dead(key="order-2", event_type=None)]


@settings(
    max_examples=60,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    value=HOSTILE, flag=st.sampled_from(sorted(FIELDS)), action=st.sampled_from(["purge", "replay"])
)
async def test_a_hostile_filter_changes_exactly_its_rows(
    database_url: str, value: str, flag: str, action: str
) -> None:
    name = FIELDS[flag]
    rows = around(value, name)
    async with connect(database_url) as pg:
        await seed(pg, rows)
        filters = Filters(**dict[str, Any]({name: value}))
        if action == "purge":
            done = (await purge_dead_letters(pg, filters, batch_size=3)).purged
        else:
            done = (await replay_dead_letters(pg, filters, batch_size=3)).replayed
        hit = {r.event_id for r in rows if getattr(r, name) == value}
        assert done == len(hit)
        assert await dead_ids(pg) == {r.event_id for r in rows} - hit
        assert await queued_ids(pg) == (hit if action == "replay" else set())


def test_hostile_values_through_the_cli(database_url: str) -> None:
    """The same through the real command line: quotes and comments are values, not SQL."""

    async def scene() -> list[Dead]:
        rows = [Dead(topic="' OR '1'='1"), Dead(key="k'; DROP TABLE outbox_events; --"), Dead()]
        async with connect(database_url) as pg:
            await seed(pg, rows)
        return rows

    rows = asyncio.run(scene())
    done = dlq(database_url, "purge", "--topic", "' OR '1'='1", "--yes")
    assert done.returncode == 0, done.stderr
    assert "purged 1 " in done.stdout
    done = dlq(database_url, "replay", "--key", "k'; DROP TABLE outbox_events; --")
    assert "replayed 1 " in done.stdout, done.stderr

    async def after() -> tuple[set[uuid.UUID], set[uuid.UUID]]:
        async with connect(database_url) as pg:
            return await dead_ids(pg), await queued_ids(pg)

    assert asyncio.run(after()) == ({rows[2].event_id}, {rows[1].event_id})


# -- replay in batches ----------------------------------------------------------------------


def dead_letters_with_chains(
    total: int, chains: int, length: int, rng: random.Random
) -> list[Dead]:
    """`total` dead letters in a shuffled dead-letter order: `chains` quarantine chains of
    `length` (each head before its tails), keyed ones that hold nothing, keyless ones."""
    groups = [chain(f"chain-{c}", length) for c in range(chains)]
    singles: list[list[Dead]] = [[Dead(key=f"k{i % 50}")] for i in range(total // 5)]
    rest = total - chains * length - len(singles)
    singles += [[Dead()] for _ in range(rest)]
    slots = list(range(total))
    rng.shuffle(slots)
    placed: list[Dead | None] = [None] * total
    at = 0
    for group in [*groups, *singles]:
        for row, slot in zip(group, sorted(slots[at : at + len(group)]), strict=True):
            placed[slot] = row
        at += len(group)
    seqs = rng.sample(range(1, 10 * total), total)
    rows = [r for r in placed if r is not None]
    for row, seq in zip(rows, seqs, strict=True):
        row.seq = seq
    for group in groups:  # a chain is in seq order, its head first
        for row, seq in zip(group, sorted(r.seq for r in group), strict=True):
            row.seq = seq
    return rows


def expected_batches(rows: list[Dead], size: int, limit: int | None = None) -> list[set[uuid.UUID]]:
    """What each transaction of a replay should move: the next `size` in dead-letter order,
    with the whole chain of every held key among them."""
    batches: list[set[uuid.UUID]] = []
    left = list(rows)
    picked_total = 0
    while left and (limit is None or picked_total < limit):
        n = size if limit is None else min(size, limit - picked_total)
        picked, left = left[:n], left[n:]
        keys = {r.key for r in picked if r.holds_key}
        batch = {r.event_id for r in picked} | {
            r.event_id for r in left if r.holds_key and r.key in keys
        }
        left = [r for r in left if r.event_id not in batch]
        picked_total += len(picked)
        batches.append(batch)
    return batches


@pytest.mark.parametrize("limit", [None, 700])
async def test_replay_all_goes_in_batches_that_keep_chains_whole(
    database_url: str, pg: asyncpg.Connection, limit: int | None
) -> None:
    rows = dead_letters_with_chains(5000, chains=60, length=9, rng=random.Random(7))
    await seed(pg, rows)
    async with connect(database_url) as conn:
        done = await replay_dead_letters(conn, Filters(), limit=limit, batch_size=64)
    batches = expected_batches(rows, 64, limit)
    moved = set().union(*batches)
    assert done.replayed == len(moved) == await pg.fetchval("SELECT count(*) FROM outbox_events")
    assert done.transactions == len(batches)
    assert await dead_ids(pg) == {r.event_id for r in rows} - moved
    # One transaction per batch (rows inserted together share their xmin), in this order.
    by_tx: dict[int, set[uuid.UUID]] = {}
    for r in await pg.fetch("SELECT xmin::text::bigint AS tx, id FROM outbox_events"):
        by_tx.setdefault(r["tx"], set()).add(r["id"])
    assert [by_tx[tx] for tx in sorted(by_tx)] == batches
    # Each event is back as it was: original id, seq, topic, key, payload, headers; and in the
    # bucket Postgres computes for its key (or id).
    back = {
        r["id"]: r
        for r in await pg.fetch(
            "SELECT id, seq, topic, key, bucket, payload::text, headers::text, event_type, "
            "attempts, hashtext(coalesce(key, id::text)) & 63 AS hashed FROM outbox_events"
        )
    }
    for row in (r for r in rows if r.event_id in moved):
        got = back[row.event_id]
        assert (got["seq"], got["topic"], got["key"], got["event_type"], got["attempts"]) == (
            row.seq,
            row.topic,
            row.key,
            row.event_type,
            0,
        )
        assert json.loads(got["payload"]) == row.payload
        assert json.loads(got["headers"]) == row.headers
        assert got["bucket"] == got["hashed"]
    if limit is None:
        assert done.released_keys == 60
    # A chain that went back left nothing behind that holds its key.
    assert not await pg.fetchval(
        "SELECT count(*) FROM outbox_dead_letters "
        "WHERE holds_key AND key IN (SELECT key FROM outbox_events)"
    )


# -- the chain rule under filters -------------------------------------------------------------


def chain_scene() -> tuple[list[Dead], dict[str, Dead]]:
    """Key K: the poison event H (topic big, 3 hours ago), then T1 and T2 parked behind it
    (topic orders, 2 hours and 10 minutes ago); and a keyless X (5 minutes ago)."""
    h = Dead("big", "K", error_class="MessageSizeTooLargeError", age=3 * 3600, holds_key=True)
    t1 = Dead(
        "orders",
        "K",
        error_class="Quarantined",
        age=2 * 3600,
        holds_key=True,
        held_behind=h.event_id,
    )
    t2 = Dead(
        "orders", "K", error_class="Quarantined", age=600, holds_key=True, held_behind=h.event_id
    )
    x = Dead("orders", None, error_class="ResponseError", age=300)
    return [h, t1, t2, x], {"H": h, "T1": t1, "T2": t2, "X": x}


def chosen(named: dict[str, Dead], spec: dict[str, Any]) -> Filters:
    ids = tuple(named[n].event_id for n in spec.get("ids", ()))
    now = datetime.now(UTC)
    since = now - timedelta(seconds=spec["since"]) if "since" in spec else None
    return Filters(ids, spec.get("topic"), since=since, error_class=spec.get("error_class"))


@pytest.mark.parametrize(
    ("spec", "moves"),
    [
        ({"error_class": "Quarantined"}, None),  # the parked events without their poison event
        ({"since": 3600}, None),  # T2 and X, not H
        ({"topic": "orders"}, None),  # T1, T2 and X, not H
        ({"ids": ["T1"]}, None),  # the middle of the chain
        ({"ids": ["T1", "H"]}, {"H", "T1", "T2"}),  # with its head: the whole chain
        ({"error_class": "MessageSizeTooLargeError"}, {"H", "T1", "T2"}),  # what waited, too
        ({"since": 4 * 3600}, {"H", "T1", "T2", "X"}),
        ({"topic": "orders", "error_class": "ResponseError"}, {"X"}),  # no chain at all
    ],
)
async def test_a_filter_that_cuts_a_chain_is_refused_one_with_its_head_takes_it_whole(
    database_url: str, pg: asyncpg.Connection, spec: dict[str, Any], moves: set[str] | None
) -> None:
    rows, named = chain_scene()
    await seed(pg, rows)
    before = await snapshot(pg)
    async with connect(database_url) as conn:
        if moves is None:
            with pytest.raises(ChainError, match=r"`outbox-relay dlq replay --key K`$"):
                await replay_dead_letters(conn, chosen(named, spec))
            assert await snapshot(pg) == before
            return
        done = await replay_dead_letters(conn, chosen(named, spec))
    assert await queued_ids(pg) == {named[n].event_id for n in moves}
    assert done.replayed == len(moves)
    assert done.released_keys == (1 if "H" in moves else 0)


async def test_purge_takes_exactly_what_is_chosen_and_the_rest_of_a_chain_holds_the_key(
    database_url: str, pg: asyncpg.Connection
) -> None:
    rows, named = chain_scene()
    await seed(pg, rows)
    async with connect(database_url) as conn:
        purged = await purge_dead_letters(conn, Filters(error_class="MessageSizeTooLargeError"))
        assert purged.purged == 1
        assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters WHERE holds_key") == 2
        # T1 is the head now: the parked events alone are a whole chain.
        done = await replay_dead_letters(conn, Filters(error_class="Quarantined"))
    assert done.replayed == 2
    assert await queued_ids(pg) == {named["T1"].event_id, named["T2"].event_id}
    assert await dead_ids(pg) == {named["X"].event_id}


# -- the command line -----------------------------------------------------------------------

POISON = uuid.UUID("01a21433-f6e4-744a-a01f-c65e10c798ba")
UNKNOWN = uuid.UUID("01a21433-0000-7000-8000-000000000000")  # no dead letter has it


async def cli_scene(pg: asyncpg.Connection) -> dict[str, Dead]:
    """Key order-42 (topic orders): its poison event POISON, 30 minutes ago, and two events
    parked behind it; a keyless event of orders; an event of payments, 10 days ago."""
    rows = chain("order-42", 3, age=1800)
    rows[0].event_id = POISON
    for parked, age in zip(rows[1:], (1200, 600), strict=True):
        parked.held_behind, parked.age = POISON, age
    rows[0].payload = {"order_id": 42, "blob": "x" * 10}
    rows[0].headers = {"trace": "abc\tdef"}
    keyless = Dead("orders", error_class="ResponseError", age=120)
    old = Dead("payments", "pay-7", event_type="PaymentTaken", age=10 * 86400)
    await seed(pg, [*rows, keyless, old])
    return {"poison": rows[0], "t1": rows[1], "t2": rows[2], "keyless": keyless, "old": old}


def one_line_error(done: subprocess.CompletedProcess[str]) -> str:
    assert done.returncode != 0, done.stdout
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("outbox-relay: error: "), done.stderr
    assert "Traceback" not in done.stderr
    return done.stderr


BAD_INPUT = [
    (("list", "--since", "yesterday"), "--since"),
    (("list", "--limit", "0"), "--limit"),
    (("show", "not-a-uuid"), "EVENT_ID"),
    (("show",), "EVENT_ID"),
    (("show", "0193a1b2-0000-7000-8000-000000000000"), "no dead letter"),
    (("count", "--until", "2026-13-45"), "--until"),
    (("count", "--since", "1h", "--until", "2h"), "--since"),
    (("count", "--since", "999999999w"), "--since"),
    (("replay",), "choose what to replay"),
    (("replay", "--id", "nope"), "--id"),
    (("replay", "--id", str(POISON), "--id", str(UNKNOWN)), f"the id(s) {UNKNOWN}; nothing"),
    (("count", "--error-class", ""), "--error-class"),
    (("replay", "--all", "--batch-size", "0"), "--batch-size"),
    (("replay", "--error-class", "Quarantined"), "dlq replay --key order-42"),
    (("replay", "--since", "25m"), "dlq replay --key order-42"),
    (("purge",), "choose what to purge"),
    (("purge", "--all", "--limit", "-1"), "--limit"),
    (("purge", "--key", "k\udcff", "--yes"), "--key"),
    (("purge", "--type", "OrderPlaced", "--nope"), "--nope"),
]


def test_bad_input_is_one_line_and_changes_nothing(database_url: str) -> None:
    async def state(fresh: bool) -> list[Any]:
        async with connect(database_url) as pg:
            if fresh:
                await cli_scene(pg)
            return await snapshot(pg)

    before = asyncio.run(state(True))
    with ThreadPoolExecutor(4) as pool:
        runs = list(pool.map(lambda case: dlq(database_url, *case[0]), BAD_INPUT))
    for (args, named), done in zip(BAD_INPUT, runs, strict=True):
        assert named in one_line_error(done), (args, done.stderr)
    assert asyncio.run(state(False)) == before


def test_json_documents_and_the_purge_preview(database_url: str) -> None:
    async def fresh() -> dict[str, Dead]:
        async with connect(database_url) as pg:
            return await cli_scene(pg)

    named = asyncio.run(fresh())
    reads = {  # none of these changes anything: run side by side
        "list": ("list", "--json"),
        "chain": ("list", "--key", "order-42", "--json"),
        "show": ("show", str(POISON), "--json"),
        "count": ("count", "--topic", "orders", "--since", "1h", "--json"),
        "old": ("count", "--until", "7d"),
        "type": ("count", "--type", "PaymentTaken"),
        "preview": ("purge", "--key", "order-42", "--json"),
        "preview_text": ("purge", "--key", "order-42"),
        "help": ("--help",),
    }
    with ThreadPoolExecutor(4) as pool:
        out = dict(
            zip(reads, pool.map(lambda a: dlq(database_url, *a), reads.values()), strict=True)
        )
    for name, done in out.items():
        assert done.returncode == 0, (name, done.stderr)

    docs = [json.loads(line) for line in out["list"].stdout.splitlines()]
    assert [list(d) for d in docs] == [list(DOCUMENT_FIELDS)] * 5  # JSON lines, fixed fields
    assert docs[-1]["event_id"] == str(named["old"].event_id)  # newest first
    chain_docs = [json.loads(line) for line in out["chain"].stdout.splitlines()]
    assert [d["event_id"] for d in chain_docs] == [
        str(named[n].event_id) for n in ("poison", "t1", "t2")
    ]
    assert [d["held_behind"] for d in chain_docs] == [None, str(POISON), str(POISON)]
    assert chain_docs[0]["holds_key"] is True

    (doc,) = [json.loads(line) for line in out["show"].stdout.splitlines()]
    assert list(doc) == [*DOCUMENT_FIELDS, "headers", "payload"]
    assert (doc["payload"], doc["headers"]) == (named["poison"].payload, {"trace": "abc\tdef"})
    assert doc["error_class"] == "MessageSizeTooLargeError"
    assert datetime.fromisoformat(doc["last_failed_at"]).tzinfo is not None

    assert json.loads(out["count"].stdout) == {"count": 4}
    assert out["old"].stdout == "1\n"
    assert out["type"].stdout == "1\n"

    summary = json.loads(out["preview"].stdout)
    assert (summary["dry_run"], summary["matched"], summary["purged"]) == (True, 3, 0)
    assert [(g["error_class"], g["count"], g["holding_key"]) for g in summary["summary"]] == [
        ("Quarantined", 2, 2),
        ("MessageSizeTooLargeError", 1, 1),
    ]
    last = out["preview_text"].stdout.splitlines()[-1]
    assert last.startswith("would purge 3 dead letter(s); nothing deleted")
    assert "purge" in out["help"].stdout
    assert "discard" not in out["help"].stdout  # the old name still works, unlisted

    purged = dlq(database_url, "purge", "--key", "order-42", "--yes", "--batch-size", "2")
    assert purged.stdout.splitlines()[-1] == "purged 3 dead letter(s) in 2 transaction(s)"
    replayed = dlq(database_url, "replay", "--all", "--json")
    assert json.loads(replayed.stdout) == {"replayed": 2, "transactions": 1, "released_keys": 0}


# -- every dead-letter command in the docs runs ------------------------------------------------


def documented_commands() -> Iterator[tuple[str, list[str]]]:
    """Each `outbox-relay dlq ...` line of a shell block in the README and the docs."""
    for doc in ("README.md", "docs/operations.md", "docs/state_machine.md"):
        text = (ROOT / doc).read_text()
        for block in re.findall(r"```(?:bash|sh|shell)\n(.*?)```", text, re.DOTALL):
            for line in block.splitlines():
                if line.startswith("outbox-relay dlq "):
                    yield doc, shlex.split(line, comments=True)


def test_every_dlq_command_in_the_docs_runs(database_url: str) -> None:
    """In this process, through the same click commands (an interpreter per command would
    cost a second each; the tests above run the real process)."""
    commands = list(documented_commands())
    assert len(commands) >= 15  # the parser still finds them
    assert {args[2] for _, args in commands} >= {"list", "show", "count", "replay", "purge"}

    async def fresh() -> None:
        async with connect(database_url) as pg:
            await cli_scene(pg)

    runner = CliRunner()
    for doc, args in commands:
        asyncio.run(fresh())  # each command on the scene the docs describe
        done = runner.invoke(cli, args[1:], env={"OUTBOX_DATABASE_URL": database_url})
        assert (done.exit_code, done.exception) == (0, None), (
            f"{doc}: {shlex.join(args)}: {done.output}"
        )
        assert done.stdout, f"{doc}: {shlex.join(args)} printed nothing"


# -- the indexes ------------------------------------------------------------------------------


async def bulk_seed(pg: asyncpg.Connection) -> None:
    """50,000 dead letters: 50 topics, 5,000 keys of which 100 are quarantined (chains of 10),
    7 event types, mostly Quarantined, one a second over the last 14 hours; then ANALYZE."""
    await pg.execute(
        "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload, "
        "headers, event_type, created_at, attempts, first_failed_at, last_failed_at, "
        "error_class, error_message, relay_id, holds_key) "
        "SELECT gen_random_uuid(), g, 't' || (g % 50), 'k' || (g % 5000), '{}', '{}', "
        "'T' || (g % 7), now(), 1, now() - g * interval '1 second', "
        "now() - g * interval '1 second', CASE WHEN g % 10 = 0 THEN 'E' || (g % 3) "
        "ELSE 'Quarantined' END, 'm', 'r', g % 5000 < 100 "
        "FROM generate_series(1, 50000) AS g"
    )
    await pg.execute("ANALYZE outbox_dead_letters")


@pytest.mark.parametrize(
    "query", ["dlq_list", "dlq_summary", "dlq_orphans", "dlq_pick", "dlq_purge"]
)
async def test_filters_walk_an_index(database_url: str, query: str) -> None:
    """50,000 dead letters: a filter with an index reads that index, and a batch of replay or
    purge with any filter walks an index (never the whole table once per batch)."""
    async with connect(database_url) as pg:
        await bulk_seed(pg)
        one = await pg.fetchval("SELECT event_id FROM outbox_dead_letters LIMIT 1")
        recent = datetime.now(UTC) - timedelta(minutes=10)
        indexed = {
            "id": (Filters((one,)), "ix_outbox_dead_letters_event_id"),
            "topic": (Filters(topic="t7"), "ix_outbox_dead_letters_topic_last_failed_at"),
            "key": (Filters(key="k42"), "ix_outbox_dead_letters_key"),
            "since": (Filters(since=recent), "ix_outbox_dead_letters_last_failed_at"),
        }
        batch = query in {"dlq_pick", "dlq_purge"}
        extra: tuple[Any, ...] = (0, 1000) if batch else (50 if query == "dlq_list" else None,)
        plans: dict[str, str] = {}
        cases = {
            **indexed,
            "type": (Filters(event_type="T3"), ""),
            "class": (Filters(error_class="E1"), ""),
        }
        for name, (filters, _) in cases.items():
            rows = await pg.fetch("EXPLAIN " + FILTERED[query], *filters.params(), *extra)
            plans[name] = "\n".join(r[0] for r in rows)
    for name, (_, index) in indexed.items():
        assert index in plans[name], plans[name]
        assert "Seq Scan on outbox_dead_letters" not in plans[name], plans[name]
    if batch:  # no index for these two: the batch walks the primary key from where it stopped
        for name in ("type", "class"):
            assert "pk_outbox_dead_letters" in plans[name], plans[name]
            assert "Seq Scan" not in plans[name], plans[name]
    if query == "dlq_orphans":  # the head of each chosen key: one probe of the held rows
        assert "ix_outbox_dead_letters_quarantine" in plans["topic"], plans["topic"]


async def test_a_replay_batch_takes_its_chains_through_the_indexes(database_url: str) -> None:
    async with connect(database_url) as conn:
        await bulk_seed(conn)
        picked = await conn.fetch(FILTERED["dlq_pick"], *Filters().params(), 0, 1000)
        plan = "\n".join(
            r[0]
            for r in await conn.fetch(
                "EXPLAIN " + QUERIES["dlq_requeue"],
                [r["dead_letter_id"] for r in picked],
                list({r["key"] for r in picked if r["holds_key"]}),
            )
        )
    assert "Bitmap Index Scan on pk_outbox_dead_letters" in plan, plan
    assert "Bitmap Index Scan on ix_outbox_dead_letters_quarantine" in plan, plan
    assert "Seq Scan" not in plan, plan


# -- --since and --until ----------------------------------------------------------------------


def test_times_are_iso_or_ages() -> None:
    now = datetime(2026, 11, 30, 12, 0, tzinfo=UTC)
    assert parse_time("15m", now) == now - timedelta(minutes=15)
    assert parse_time("2h", now) == now - timedelta(hours=2)
    assert parse_time("7d", now) == now - timedelta(days=7)
    assert parse_time("1w", now) == now - timedelta(weeks=1)
    assert parse_time("30s", now) == now - timedelta(seconds=30)
    assert parse_time("2026-11-30T10:00:00Z", now) == datetime(2026, 11, 30, 10, tzinfo=UTC)
    assert parse_time("2026-11-30T10:00:00+02:00", now) == datetime(2026, 11, 30, 8, tzinfo=UTC)
    assert parse_time("2026-11-30 10:00", now) == datetime(2026, 11, 30, 10, tzinfo=UTC)  # UTC
    assert parse_time("2026-11-30", now) == datetime(2026, 11, 30, tzinfo=UTC)
    for bad in ("", "15", "m", "15 minutes", "-5m", "2h30m", "tomorrow", "2026-02-30", "1e3s"):
        with pytest.raises(ValueError, match="not an ISO-8601 time"):
            parse_time(bad, now)
