"""Prometheus metrics and the one log stream: in-process on SQLite, then the real CLI relay
on Postgres and Kafka scraped over HTTP."""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import subprocess
import sys
import time

import asyncpg
import httpx
import pytest
import yaml
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import generate_latest
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import OutboxEvent
from outbox.relay.metrics import relay_registry
from outbox.relay.relay import Relay
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import Backlog
from outbox.relay.testing import FaultInjector
from outbox.urls import async_engine, asyncpg_dsn
from tests.fakes import OutboxDb, RecordingPublisher
from tests.helpers import ROOT, create_topic, eventually, free_port, relay_process


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, by name and sorted labels."""
    return {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


@pytest.mark.unit
async def test_metrics_count_what_the_loop_did(db: OutboxDb) -> None:
    poison = await db.add(topic="orders", key="k1")
    for i in range(5):
        await db.add(topic="orders", key=f"k{i}")  # k1's second event parks behind the poison
    for _ in range(3):
        await db.add(topic="users")
    flaky = await db.add(topic="users", key="f")
    publisher = FaultInjector.scripted(
        RecordingPublisher(), failures={flaky.id: 1}, poison={poison.id}
    )
    relay = Relay(
        db.store(),
        publisher,
        relay_id="m",
        batch_size=100,
        poll_interval=0.01,
        retry_policy=RetryPolicy(base_seconds=3600),
        rand=lambda: 0.0,
    )
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.delivered == 7 and s.dead_lettered == 2, timeout=10)

    async def sampled() -> bool:
        return relay.metrics.backlog is not None

    await eventually(sampled, timeout=10)
    relay.request_stop()
    await task

    got = samples(generate_latest(relay_registry(lambda: relay)).decode())
    broker = ("broker", "fault-injector")
    assert got["outbox_events_published_total", (broker, ("topic", "orders"))] == 4
    assert got["outbox_events_published_total", (broker, ("topic", "users"))] == 3
    failures = "outbox_publish_failures_total"
    assert got[failures, (("error_class", "MessageRejected"), ("retriable", "false"))] == 1
    assert got[failures, (("error_class", "InjectedError"), ("retriable", "true"))] == 1
    assert got["outbox_retries_scheduled_total", ()] == 1
    dead = "outbox_events_dead_lettered_total"
    assert got[dead, (("error_class", "MessageRejected"),)] == 1
    assert got[dead, (("error_class", "Quarantined"),)] == 1
    assert got["outbox_delivery_latency_seconds_count", ()] == 7
    assert got["outbox_publish_batch_duration_seconds_count", ()] >= 1
    assert got["outbox_owned_buckets", ()] > 0
    assert got["outbox_breaker_open", ()] == 0
    assert got["outbox_pending_events", ()] >= 1  # the flaky event waits an hour
    assert "process_resident_memory_bytes" in {name for name, _ in got}


@pytest.mark.unit
async def test_a_timed_poll_that_finds_new_events_counts_missed_wakeups(db: OutboxDb) -> None:
    """SQLite has no NOTIFY, so every event committed while the relay waits is one a timed
    poll finds unannounced; the first claim after start is not counted."""
    await db.add()
    relay = Relay(db.store(), RecordingPublisher(), relay_id="m", poll_interval=0.05)
    task = asyncio.create_task(relay.run())
    await relay.wait_for(lambda s: s.delivered == 1 and s.idle, timeout=10)
    assert relay.metrics.missed_wakeups == 0
    await db.add_all([OutboxEvent(topic="t", payload={}) for _ in range(3)])
    await relay.wait_for(lambda s: s.delivered == 4, timeout=10)
    relay.request_stop()
    await task
    assert relay.metrics.missed_wakeups == 3


@pytest.mark.unit
def test_stdlib_records_are_json_lines_with_their_logger_and_redacted() -> None:
    """In a process of its own: configure_logging() sets up structlog for the whole process."""
    script = (
        "import logging\n"
        "from outbox.relay.logs import configure_logging\n"
        "configure_logging('json', 'info')\n"
        "configure_logging('json', 'info')  # reconfiguring does not add a second handler\n"
        "logging.getLogger('aiokafka.conn').error("
        "'Unable connect to %s', 'postgresql://u:Sekr3t@db.example/x')\n"
        "logging.getLogger('aiokafka').debug('below the level')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True, timeout=60
    )
    lines = done.stderr.splitlines()
    assert len(lines) == 1, lines
    line = json.loads(lines[0])
    assert line["logger"] == "aiokafka.conn"
    assert line["level"] == "error"
    assert line["event"].startswith("Unable connect to postgresql://u:")
    assert "Sekr3t" not in lines[0]


async def test_cli_relay_serves_metrics_and_logs_only_json(
    database_url: str, kafka_bootstrap: str
) -> None:
    """The real `outbox-relay run --metrics-port`, scraped while it drains to Kafka; then a
    relay whose Kafka is unreachable: the breaker gauge opens, and every stderr line is JSON,
    aiokafka's own included."""
    topic = f"metrics-{os.getpid()}-{time.monotonic_ns()}"
    await create_topic(kafka_bootstrap, topic)
    engine = async_engine(database_url)
    async with AsyncSession(engine) as session, session.begin():
        session.add_all(
            [OutboxEvent(topic=topic, key=f"k{i % 7}", payload={"i": i}) for i in range(50)]
        )
    await engine.dispose()

    async def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        async with httpx.AsyncClient() as http:
            try:
                return samples((await http.get(f"http://127.0.0.1:{port}/metrics")).text)
            except httpx.TransportError:
                return {}

    def start(bootstrap: str, port: int) -> subprocess.Popen[bytes]:
        return relay_process(
            database_url,
            "--broker=kafka",
            f"--kafka-bootstrap={bootstrap}",
            f"--metrics-port={port}",
            "--metrics-host=127.0.0.1",
        )

    published = ("outbox_events_published_total", (("broker", "kafka"), ("topic", topic)))
    port = free_port()
    proc = start(kafka_bootstrap, port)
    try:

        async def all_published() -> bool:
            return (await scrape(port)).get(published) == 50

        await eventually(all_published, timeout=60)
        got = await scrape(port)
        assert got["outbox_delivery_latency_seconds_count", ()] == 50
        async with httpx.AsyncClient() as http:
            text = (await http.get(f"http://127.0.0.1:{port}/metrics")).text
        families = {f.name for f in text_string_to_metric_families(text)}
        documented = set(re.findall(r"^\| `(outbox_\w+)` \|", operations_metrics_section(), re.M))
        assert {d.removesuffix("_total") for d in documented} <= families
        assert got["outbox_owned_buckets", ()] > 0
        assert got["outbox_breaker_open", ()] == 0
    finally:
        proc.terminate()
        proc.communicate(timeout=30)
    assert proc.returncode == 0

    port = free_port()
    proc = start(f"127.0.0.1:{free_port()}", port)  # nothing listens there
    try:

        async def breaker_open() -> bool:
            return (await scrape(port)).get(("outbox_breaker_open", ())) == 1

        await eventually(breaker_open, timeout=60)
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    lines = [json.loads(line) for line in err.decode().splitlines()]  # every line is JSON
    assert any(line.get("logger", "").startswith("aiokafka") for line in lines), lines[:5]

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        bad = await asyncio.to_thread(
            subprocess.run,
            [
                sys.executable,
                "-m",
                "outbox.relay.cli",
                "run",
                "--metrics-host=127.0.0.1",
                f"--metrics-port={taken.getsockname()[1]}",
            ],
            env={**os.environ, "OUTBOX_DATABASE_URL": database_url, "OUTBOX_BROKER": "stdout"},
            capture_output=True,
            text=True,
            timeout=60,
            check=False,
        )
    assert bad.returncode == 2, bad.stderr
    assert bad.stderr.count("\n") == 1, bad.stderr
    assert "metrics_port" in bad.stderr


def operations_metrics_section() -> str:
    text = (ROOT / "docs" / "operations.md").read_text()
    return text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]


@pytest.mark.unit
async def test_docs_list_exactly_the_metrics_and_the_alerts_use_real_ones(db: OutboxDb) -> None:
    import promql_parser

    relay = Relay(db.store(), RecordingPublisher(), relay_id="m")
    relay.metrics.backlog = Backlog(pending=3, oldest_age=1.5, unowned_buckets=0)
    exposed = {
        family.name + ("_total" if family.type == "counter" else "")
        for family in text_string_to_metric_families(
            generate_latest(relay_registry(lambda: relay)).decode()
        )
        if family.name.startswith("outbox_")
    }
    section = operations_metrics_section()
    documented = set(re.findall(r"^\| `(outbox_\w+)` \|", section, flags=re.M))
    assert documented == exposed
    (rules,) = re.findall(r"```yaml\n(.*?)```", section, flags=re.S)
    alerts = yaml.safe_load(rules)["groups"][0]["rules"]
    assert len(alerts) >= 3
    for alert in alerts:
        promql_parser.parse(alert["expr"])  # raises on a syntax error
        used = set(re.findall(r"\b(outbox_\w+?)(?:_bucket|_count|_sum)?\b", alert["expr"]))
        assert used <= exposed, (alert["alert"], used - exposed)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "hold",
    ["BEGIN ISOLATION LEVEL REPEATABLE READ; SELECT 1", "BEGIN; SELECT txid_current()"],
    ids=["snapshot", "xid"],
)
async def test_backlog_shows_the_transaction_that_holds_cleanup_back(
    database_url: str, hold: str
) -> None:
    from outbox.relay.stores.postgres import PostgresStore

    store = PostgresStore(database_url)
    await store.start("backlog-test")
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert (await store.backlog()).oldest_snapshot_age is None
        await holder.execute(hold)
        started = time.monotonic()
        await asyncio.sleep(1.0)  # the age to be read
        age = (await store.backlog()).oldest_snapshot_age
        assert age is not None
        assert 1.0 <= age <= time.monotonic() - started + 1.0
        await holder.execute("ROLLBACK")
        assert (await store.backlog()).oldest_snapshot_age is None
    finally:
        await holder.close()
        await store.stop()


@pytest.mark.unit
def test_delivery_latency_counts_each_delivered_event_by_its_own_age() -> None:
    """Runs of events that share created_at (one transaction) are aged once; every event is
    still counted in its own bucket, and failed events in none."""
    import uuid
    from datetime import UTC, datetime, timedelta

    from outbox.envelope import Envelope
    from outbox.relay.metrics import RelayMetrics
    from outbox.relay.seams import Failure, Verdict

    now = datetime.now(UTC)
    ages = [0.001, 0.001, 3.0, 3.0, 0.001, 40.0, 0.001]
    batch = [
        Envelope(n, uuid.uuid4(), "t", "k", b"{}", created_at=now - timedelta(seconds=age))
        for n, age in enumerate(ages, start=1)
    ]
    failed = Failure("Boom", "no", Verdict.RETRY)
    results = [None, None, None, failed, None, None, None]
    metrics = RelayMetrics()
    metrics.record_batch(batch, results, 0.01)
    latency = metrics.delivery_latency
    expected = [0] * len(latency.counts)
    for age, result in zip(ages, results, strict=True):
        if result is None:
            expected[next(i for i, b in enumerate(latency.bounds) if age <= b)] += 1
    assert latency.counts == expected
    assert metrics.published == {"t": 6}
    delivered = [a for a, r in zip(ages, results, strict=True) if r is None]
    assert latency.total == pytest.approx(sum(delivered), abs=1)


@pytest.mark.unit
@settings(max_examples=60, deadline=None)
@given(
    st.lists(
        st.tuples(
            # ages well inside a bucket: the test's clock and the relay's are read apart
            st.sampled_from([0.07, 0.17, 0.35, 0.7, 1.5, 3.5, 7.0, 20.0, 45.0, 120.0, 1000.0]),
            st.sampled_from(["a", "b", "c"]),
            st.booleans(),
        ),
        max_size=40,
    )
)
def test_delivery_latency_of_a_batch_in_any_order_is_that_of_each_event(
    events: list[tuple[float, str, bool]],
) -> None:
    """The ages are sorted once and counted per bucket by bisection: the counts, the sum and
    the topics must be those of one observation per delivered event, whatever the order."""
    import uuid
    from datetime import UTC, datetime, timedelta

    from outbox.envelope import Envelope
    from outbox.relay.metrics import RelayMetrics
    from outbox.relay.seams import Failure, Verdict

    now = datetime.now(UTC)
    batch = [
        Envelope(n, uuid.uuid4(), topic, "k", b"{}", created_at=now - timedelta(seconds=age))
        for n, (age, topic, _) in enumerate(events, start=1)
    ]
    failed = Failure("Boom", "no", Verdict.RETRY)
    results = [failed if fails else None for _, _, fails in events]
    metrics = RelayMetrics()
    metrics.record_batch(batch, results, 0.01)
    reference = RelayMetrics().delivery_latency
    topics: dict[str, int] = {}
    for age, topic, fails in events:
        if not fails:
            reference.observe(age)
            topics[topic] = topics.get(topic, 0) + 1
    assert metrics.delivery_latency.counts == reference.counts
    assert metrics.delivery_latency.total == pytest.approx(reference.total, abs=0.5)
    assert dict(metrics.published) == topics
    assert sum(metrics.failures.values()) == sum(fails for _, _, fails in events)
