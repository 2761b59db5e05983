"""Kafka failure paths, each provoked at a real broker: a restart mid-drain, records the broker
refuses, topics it refuses. Restarts and auto-create-off run on a throwaway broker of our own
(tests/kafka_broker.py), never on the shared one; the shared broker only gets fresh topics.

The unit tests at the end check the classification and the per-key rule without a broker."""

from __future__ import annotations

import asyncio
import logging
import socket
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from typing import IO, Any

import asyncpg
import psutil
import pytest
import structlog.testing
from aiokafka import AIOKafkaProducer
from aiokafka import errors as ke
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay.ordering import hold_back_after_failures
from outbox.relay.publishers.kafka import KafkaPublisher, _Watchdog
from outbox.relay.publishers.kafka_errors import (
    KINDS,
    Kind,
    ProducerAborted,
    RateLimitFilter,
    classify,
    kind_of,
)
from outbox.relay.retry import CircuitBreaker
from outbox.relay.seams import HELD_BACK, BrokerUnavailableError, Failure, PublishResult, Verdict
from tests.helpers import (
    assert_per_key_order,
    commit_events,
    create_topic,
    first_seen_order,
    keyed_events,
    pg_relay,
    read_all,
    read_topic,
    relay_process,
)
from tests.kafka_broker import KafkaBroker, kafka_available, port_open
from tests.tcp_proxy import SilentProxy

pytestmark = [pytest.mark.postgres, pytest.mark.kafka]


# -- helpers -----------------------------------------------------------------------------------


def free_port_pair(start: int = 19092) -> int:
    """A port p such that p and p + 1 are free on loopback."""
    for port in range(start, start + 200, 2):
        if port_open(port) or port_open(port + 1):
            continue
        with socket.socket() as a, socket.socket() as b:
            try:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            except OSError:
                continue
        return port
    raise RuntimeError("no free port pair for the test broker")


@pytest.fixture(scope="module")
def chaos_broker() -> Iterator[KafkaBroker]:
    """A broker of our own, auto-create off, that the tests may stop and restart."""
    if not kafka_available():
        pytest.skip("no Kafka jars in .services/kafka/libs (run scripts/services.sh up)")
    broker = KafkaBroker("chaos", free_port_pair(), auto_create=False)
    try:
        broker.start()
        yield broker
    finally:
        broker.cleanup()


def partition_of(key: str, partitions: int = 3) -> int:
    return int((murmur2(key.encode()) & 0x7FFFFFFF) % partitions)


def keys_on_partition(partition: int, count: int, prefix: str) -> list[str]:
    keys: list[str] = []
    n = 0
    while len(keys) < count:
        key = f"{prefix}-{n}"
        if partition_of(key) == partition:
            keys.append(key)
        n += 1
    return keys


class LineCounter:
    """Reads a child's pipe in a thread (the child never blocks on a full pipe) and keeps each
    line with the monotonic time it arrived."""

    def __init__(self, pipe: IO[bytes] | None) -> None:
        self.lines: list[tuple[float, bytes]] = []
        self._thread = threading.Thread(target=self._read, args=(pipe,), daemon=True)
        self._thread.start()

    def _read(self, pipe: IO[bytes] | None) -> None:
        if pipe is not None:
            for line in iter(pipe.readline, b""):
                self.lines.append((time.monotonic(), line))

    def between(self, start: float, end: float) -> list[bytes]:
        return [line for t, line in list(self.lines) if start <= t <= end]

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)


async def pending(pg: asyncpg.Connection) -> int:
    return int(await pg.fetchval("SELECT count(*) FROM outbox_events"))


async def wait_until_pending(pg: asyncpg.Connection, below: int, timeout: float) -> float:
    """Poll the outbox (the relay is another process) until fewer than `below` events are
    left; the seconds it took."""
    t0 = time.monotonic()
    while await pending(pg) >= below:
        if time.monotonic() - t0 > timeout:
            raise TimeoutError(f"still {await pending(pg)} events pending after {timeout}s")
        await asyncio.sleep(0.05)
    return time.monotonic() - t0


async def dead_letters(pg: asyncpg.Connection) -> list[asyncpg.Record]:
    return list(
        await pg.fetch(
            "SELECT event_id, topic, key, attempts, error_class, error_message "
            "FROM outbox_dead_letters ORDER BY original_seq"
        )
    )


# -- (a) a broker restart mid-drain ------------------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    ("outage", "crash"),
    [(10.0, False), (60.0, False), (10.0, True)],
    ids=["stop-10s", "stop-60s", "kill-10s"],
)
async def test_broker_restart_mid_drain(
    outage: float,
    crash: bool,
    database_url: str,
    pg: asyncpg.Connection,
    chaos_broker: KafkaBroker,
) -> None:
    """30,000 events, the real relay (a child process, --batch-size 20), the broker stopped
    (SIGTERM, or SIGKILL: `crash`) once a quarter of the events went out, with sends in flight,
    and started again `outage` seconds later. (At a fixed 1.5 s into the drain, a faster relay
    had sent all 30,000 before the broker was down.)"""
    topic = f"chaos-{uuid.uuid4().hex[:8]}"
    await create_topic(chaos_broker.bootstrap, topic)
    events = keyed_events(topic, keys=300, per_key=100)
    await commit_events(database_url, events)
    total = len(events)
    proc = relay_process(
        database_url,
        "--broker",
        "kafka",
        "--kafka-bootstrap",
        chaos_broker.bootstrap,
        "--batch-size",
        "20",
        "--relay-id",
        f"chaos-{uuid.uuid4().hex[:4]}",
    )
    stderr = LineCounter(proc.stderr)
    stdout = LineCounter(proc.stdout)
    relay = psutil.Process(proc.pid)
    try:
        await wait_until_pending(pg, total, timeout=60)  # the drain has begun
        await wait_until_pending(pg, total * 3 // 4, timeout=60)  # the broker goes mid-drain
        t_stop = time.monotonic()
        await asyncio.to_thread(chaos_broker.kill if crash else chaos_broker.stop)
        t_down = time.monotonic()
        cpu_down = relay.cpu_times()
        left_at_stop = await pending(pg)
        await asyncio.sleep(outage)  # the outage itself
        cpu_up = relay.cpu_times()
        t_up = time.monotonic()
        busy = cpu_up.user + cpu_up.system - cpu_down.user - cpu_down.system
        cpu = busy / (t_up - t_down)
        outage_lines = stderr.between(t_stop, t_up) + stdout.between(t_stop, t_up)
        await asyncio.to_thread(chaos_broker.start)
        t_back = time.monotonic()
        drain = await wait_until_pending(pg, 1, timeout=60)
        dead = await pg.fetchval("SELECT count(*) FROM outbox_dead_letters")
        aborted = [t for t, line in stderr.lines if b"kafka_producer_aborted" in line]
        print(
            f"\n[restart] {'SIGKILL' if crash else 'SIGTERM'} outage={outage:.0f}s "
            f"pending_at_stop={left_at_stop}/{total} broker_shutdown={t_down - t_stop:.2f}s "
            f"producer_killed_after={aborted[0] - t_stop if aborted else -1:.2f}s "
            f"relay_cpu_during_outage={cpu:.1%} "
            f"relay_log_lines_during_outage={len(outage_lines)} "
            f"broker_restart={t_back - t_up:.1f}s drained_after_return={drain:.1f}s "
            f"dead_letters={dead}"
        )
    finally:
        proc.terminate()
        try:
            await asyncio.to_thread(proc.wait, 30)
        except subprocess.TimeoutExpired:
            proc.kill()
        stderr.join(5)
    assert proc.returncode == 0
    assert 0 < left_at_stop < total  # the broker really went away mid-drain
    assert dead == 0
    assert cpu < 0.20
    assert len(outage_lines) < 2000
    assert drain < 60
    received = await read_all(chaos_broker.bootstrap, topic)
    assert {e.id for e in received} == {e.id for e in events}
    assert_per_key_order(first_seen_order(received))


# -- (b) a record the broker refuses, then innocent events on its partition -----------------


async def test_refused_record_dead_letters_alone(
    database_url: str,
    kafka_bootstrap: str,
    topic: str,
    pg: asyncpg.Connection,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A 1.5 MB payload (the writer takes it, the producer's max_request_size is 2 MiB, the
    broker's message.max.bytes is ~1 MB) is refused at the broker. Before the fix its
    partition's sequence had a gap: every later event there failed OutOfOrderSequenceNumber
    and was dead-lettered too."""
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "2000000")
    await create_topic(kafka_bootstrap, topic)
    big = OutboxEvent(topic=topic, key="big", payload={"blob": "x" * 1_500_000})
    same = partition_of("big")
    innocents = [
        OutboxEvent(topic=topic, key=k, payload={"n": n})
        for n, k in enumerate(keys_on_partition(same, 50, "same"))
    ]
    elsewhere = [
        OutboxEvent(topic=topic, key=k, payload={"n": n})
        for n, k in enumerate(keys_on_partition((same + 1) % 3, 10, "other"))
    ]
    after_big = OutboxEvent(topic=topic, key="big", payload={"after": True})
    await commit_events(database_url, [big, *innocents, *elsewhere, after_big])
    stats = await pg_relay(database_url, KafkaPublisher(kafka_bootstrap)).drain()
    dead = await dead_letters(pg)
    assert [d["event_id"] for d in dead] == [big.id, after_big.id]  # after_big: parked behind
    assert dead[0]["error_class"] == "MessageSizeTooLargeError"
    assert dead[0]["attempts"] == 1
    assert topic in dead[0]["error_message"]
    assert stats.retried == 0
    received = await read_all(kafka_bootstrap, topic)
    assert {e.id for e in received} == {e.id for e in innocents + elsewhere}
    assert_per_key_order(first_seen_order(received))
    assert await pending(pg) == 0


async def test_a_grown_claim_over_many_topics_dead_letters_only_the_guilty(
    database_url: str, kafka_bootstrap: str, pg: asyncpg.Connection, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Events spread over 40 topics, so the claims grow (batch_size 10: a claim of 10 events on
    10 topics makes the next one 1,000). Inside the grown claim: a record the broker refuses
    (1.5 MB), and a topic with an illegal name. Only they, and the big record's later event of
    its key (parked behind it), are dead-lettered; every other event arrives in key order."""
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "2000000")
    prefix = f"grow-{uuid.uuid4().hex[:6]}-"
    topics = [f"{prefix}{n}" for n in range(40)]
    for topic in topics:
        await create_topic(kafka_bootstrap, topic)
    innocents = [
        OutboxEvent(topic=t, key=f"{t}-k{k}", payload={"n": n})
        for n in range(3)
        for k in range(2)
        for t in topics
    ]
    big = OutboxEvent(topic=topics[7], key="big", payload={"blob": "x" * 1_500_000})
    after_big = OutboxEvent(topic=topics[7], key="big", payload={"after": True})
    illegal = [OutboxEvent(topic=f"{prefix}bad", key=f"bad-{n}", payload={}) for n in range(3)]
    await commit_events(database_url, [*innocents[:10], big, *illegal, *innocents[10:], after_big])
    await pg.execute(
        "UPDATE outbox_events SET topic = topic || '!' WHERE topic = $1", f"{prefix}bad"
    )
    relay = pg_relay(database_url, KafkaPublisher(kafka_bootstrap), batch_size=10)
    limits: list[int] = []
    claim = relay.store.claim

    async def noting(limit: int, exclude: Any = (), after: int = 0) -> Any:
        limits.append(limit)
        return await claim(limit, exclude=exclude, after=after)

    monkeypatch.setattr(relay.store, "claim", noting)
    stats = await relay.drain()
    assert max(limits) == 1000  # the claim grew
    dead = await dead_letters(pg)
    assert {d["event_id"] for d in dead} == {big.id, after_big.id, *(e.id for e in illegal)}
    assert {d["error_class"] for d in dead if d["event_id"] != after_big.id} == {
        "MessageSizeTooLargeError",
        "InvalidTopicError",
    }
    assert stats.delivered == len(innocents)
    received = {t: await read_all(kafka_bootstrap, t) for t in topics}
    assert {e.id for r in received.values() for e in r} == {e.id for e in innocents}
    for records in received.values():  # each key is on one topic
        assert_per_key_order(first_seen_order(records))
    assert await pending(pg) == 0


# -- (c) a topic whose size limit is below the producer's batch size -------------------------


async def test_small_topic_limit_splits_batches(
    database_url: str, kafka_bootstrap: str, topic: str, pg: asyncpg.Connection
) -> None:
    """max.message.bytes=3000 on the topic: aiokafka's batches of small events are refused
    (it never splits them); the publisher sends the records again one by one, and only the
    record too large on its own is dead-lettered."""
    await create_topic(kafka_bootstrap, topic, configs={"max.message.bytes": "3000"})
    small = keyed_events(topic, keys=10, per_key=4)
    for event in small:
        event.payload = {"pad": "p" * 220, **event.payload}  # ~250 bytes each
    oversize = OutboxEvent(topic=topic, key="oversize", payload={"blob": "y" * 4000})
    await commit_events(database_url, [*small[:20], oversize, *small[20:]])
    publisher = KafkaPublisher(kafka_bootstrap)
    stats = await pg_relay(database_url, publisher).drain()
    dead = await dead_letters(pg)
    assert [d["event_id"] for d in dead] == [oversize.id]
    assert dead[0]["error_class"] == "MessageSizeTooLargeError"
    assert dead[0]["attempts"] == 1
    assert "alone in its batch" in dead[0]["error_message"]
    assert stats.delivered == len(small)
    received = await read_all(kafka_bootstrap, topic)
    assert {e.id for e in received} == {e.id for e in small}
    assert_per_key_order(first_seen_order(received))
    # The same publisher sends this topic's next batch one by one at once: no batch refused,
    # no producer replaced.
    later = keyed_events(topic, keys=3, per_key=2)
    await commit_events(database_url, later)
    with structlog.testing.capture_logs() as logged:
        stats = await pg_relay(database_url, publisher).drain()
    assert stats.delivered == len(later)
    assert "kafka_producer_replaced" not in {entry["event"] for entry in logged}
    assert len(await read_all(kafka_bootstrap, topic)) >= len(small) + len(later)


# -- (d) topics the broker refuses -------------------------------------------------------------


async def test_invalid_topics_are_poison_for_their_events_only(
    database_url: str, kafka_bootstrap: str, pg: asyncpg.Connection
) -> None:
    """A name over 249 characters once the prefix is on, and a name with an illegal character
    (written past the writer's checks): their events are dead-lettered at once, the error names
    the topic, and the other topic's events flow."""
    prefix = f"pfx{uuid.uuid4().hex[:6]}."
    good = f"ok-{uuid.uuid4().hex[:8]}"
    too_long = "l" * (249 - len(prefix) + 1)  # valid for the writer, 250 with the prefix
    illegal = f"bad-{uuid.uuid4().hex[:6]}"
    events = [
        OutboxEvent(topic=t, key=f"{t[:8]}-{k}", payload={"n": n})
        for n in range(5)
        for k in range(3)
        for t in (good, too_long, illegal)
    ]
    await commit_events(database_url, events)
    await pg.execute("UPDATE outbox_events SET topic = 'bad!' || topic WHERE topic = $1", illegal)
    publisher = KafkaPublisher(kafka_bootstrap, topic_prefix=prefix)
    t0 = time.monotonic()
    stats = await pg_relay(database_url, publisher).drain()
    took = time.monotonic() - t0
    dead = await dead_letters(pg)
    print(f"\n[invalid topics] drained in {took:.2f}s, dead letters: {len(dead)}")
    assert took < 5
    assert stats.delivered == 15
    assert stats.retried == 0
    assert len(dead) == 30
    first = {d["topic"]: d for d in dead if d["error_class"] == "InvalidTopicError"}
    assert set(first) == {too_long, f"bad!{illegal}"}
    assert prefix + too_long in first[too_long]["error_message"]
    assert f"bad!{illegal}" in first[f"bad!{illegal}"]["error_message"]
    assert all(d["attempts"] <= 1 for d in dead)
    received = await read_all(kafka_bootstrap, prefix + good)
    assert {e.id for e in received} == {e.id for e in events if e.topic == good}


async def test_a_lookup_that_fails_mid_batch_sends_nothing_of_it(
    kafka_bootstrap: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The partition count of a topic is looked up while the batch is built: when that
    lookup finds the broker gone, nothing of the batch is sent (the records built so far
    included) and every event is answered BROKER, as for a send that failed."""
    first, second = (f"mid-{uuid.uuid4().hex[:8]}" for _ in range(2))
    for name in (first, second):
        await create_topic(kafka_bootstrap, name)
    publisher = KafkaPublisher(kafka_bootstrap)
    await publisher.start()
    counts = KafkaPublisher._partition_count

    async def failing(producer: Any, topic: str) -> int:
        if topic == second:
            raise ke.KafkaConnectionError("connection lost")
        return await counts(producer, topic)

    monkeypatch.setattr(KafkaPublisher, "_partition_count", staticmethod(failing))
    batch = [
        Envelope(seq=n, id=uuid.uuid4(), topic=t, key=f"k{n}", payload=b"{}")
        for n, t in enumerate([first, first, second, first], start=1)
    ]
    try:
        with pytest.raises(BrokerUnavailableError, match="metadata failed"):
            await publisher.publish(batch)
    finally:
        await publisher.stop()
    assert await read_all(kafka_bootstrap, first, timeout=2) == []


async def test_missing_topic_with_auto_create_off(
    database_url: str, pg: asyncpg.Connection, chaos_broker: KafkaBroker
) -> None:
    good = f"ok-{uuid.uuid4().hex[:8]}"
    missing = f"missing-{uuid.uuid4().hex[:8]}"
    await create_topic(chaos_broker.bootstrap, good)
    events = [
        OutboxEvent(topic=t, key=f"{t}-{k}", payload={"n": n})
        for n in range(4)
        for k in range(5)
        for t in (good, missing)
    ]
    await commit_events(database_url, events)
    publisher = KafkaPublisher(chaos_broker.bootstrap, topic_wait_seconds=2.0)
    relay = pg_relay(database_url, publisher)
    t0 = time.monotonic()
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.dead_lettered >= 5, timeout=30)
        decided = time.monotonic() - t0
        await relay.wait_for(lambda s: s.idle and s.delivered == 20, timeout=30)
    finally:
        relay.request_stop()
        await task
    dead = await dead_letters(pg)
    print(f"\n[missing topic] dead-lettered after {decided:.2f}s")
    assert decided < 5
    assert len(dead) == 20
    assert {d["topic"] for d in dead} == {missing}
    heads = [d for d in dead if d["error_class"] == "UnknownTopicOrPartitionError"]
    assert len(heads) == 5
    assert all(missing in d["error_message"] for d in heads)
    assert relay.stats.retried == 0
    received = await read_all(chaos_broker.bootstrap, good)
    assert {e.id for e in received} == {e.id for e in events if e.topic == good}


async def test_new_topics_of_a_batch_are_looked_up_together(
    chaos_broker: KafkaBroker,
) -> None:
    """300 topics the producer does not know: one metadata lookup for all of them, not one
    per topic (which made 1,000 topics drain 18 times slower than one)."""
    topics = [f"many-{uuid.uuid4().hex[:6]}-{n}" for n in range(300)]
    admin = AIOKafkaAdminClient(bootstrap_servers=chaos_broker.bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, 1, 1) for t in topics])
    finally:
        await admin.close()
    publisher = KafkaPublisher(chaos_broker.bootstrap)
    await publisher.start()
    client = publisher._producer.client
    sent: list[Any] = []
    real_send = client.send

    async def counting_send(node: Any, request: Any, **kw: Any) -> Any:
        sent.append(request)
        return await real_send(node, request, **kw)

    client.send = counting_send
    batch = [
        Envelope(seq=n, id=uuid.uuid4(), topic=t, key=f"k{n}", payload=b"{}")
        for n, t in enumerate(topics)
    ]
    try:
        t0 = time.monotonic()
        results = await publisher.publish(batch)
        took = time.monotonic() - t0
    finally:
        await publisher.stop()
    lookups = [r for r in sent if isinstance(r, MetadataRequest)]
    print(f"\n[300 new topics] one publish: {took:.2f}s, metadata requests: {len(lookups)}")
    assert results == [None] * len(batch)
    assert len(lookups) <= 3


# -- without a broker --------------------------------------------------------------------------


def envelope(seq: int, key: str | None) -> Envelope:
    return Envelope(seq=seq, id=uuid.uuid4(), topic="t", key=key, payload=b"{}")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (ke.OutOfOrderSequenceNumber(), Verdict.HELD),
        (ke.UnknownProducerId(), Verdict.HELD),
        (ke.InvalidProducerEpoch(), Verdict.HELD),
        (ke.ProducerFenced(), Verdict.HELD),
        (ke.NotLeaderForPartitionError(), Verdict.HELD),
        (ke.MessageSizeTooLargeError(), Verdict.POISON),
        (ke.RecordListTooLargeError(), Verdict.POISON),
        (ke.CorruptRecordException(), Verdict.POISON),
        (ke.InvalidTopicError(), Verdict.POISON),
        (ke.TopicAuthorizationFailedError("t"), Verdict.POISON),
        (ke.KafkaConnectionError(), Verdict.BROKER),
        (ke.NodeNotReadyError(), Verdict.BROKER),
        (ke.RequestTimedOutError(), Verdict.BROKER),
        (ke.KafkaTimeoutError(), Verdict.BROKER),
        (ke.NotEnoughReplicasError(), Verdict.BROKER),
        (ke.KafkaStorageError(), Verdict.BROKER),
        (ke.ClusterAuthorizationFailedError(), Verdict.BROKER),
        (ProducerAborted("gone"), Verdict.BROKER),
        (ConnectionResetError(), Verdict.BROKER),
        (ke.UnknownError(), Verdict.RETRY),
        (ke.InvalidTimestampError(), Verdict.RETRY),
        (ValueError("odd"), Verdict.RETRY),
    ],
)
def test_classification(exc: BaseException, verdict: Verdict) -> None:
    failure = classify(exc, "topic 't'")
    assert failure.verdict is verdict
    assert failure.error_class == type(exc).__name__
    assert "topic 't'" in failure.message


#: Broker error codes deliberately left to the default (RETRY): they are not produce errors,
#: or say nothing about the event, the topic or the broker as a whole.
RETRY_BY_DEFAULT = {
    "NoError",
    "UnknownError",
    "OffsetOutOfRangeError",
    "OffsetMetadataTooLargeError",
    "StaleControllerEpochError",
    "IllegalGenerationError",
    "InconsistentGroupProtocolError",
    "InvalidGroupIdError",
    "UnknownMemberIdError",
    "InvalidSessionTimeoutError",
    "RebalanceInProgressError",
    "InvalidCommitOffsetSizeError",
    "GroupAuthorizationFailedError",
    "InvalidTimestampError",
    "TopicAlreadyExistsError",
    "InvalidPartitionsError",
    "InvalidReplicationFactorError",
    "InvalidReplicationAssignmentError",
    "InvalidConfigurationError",
    "InvalidFetchRequestError",
    "ConcurrentTransactions",
    "InvalidTransactionTimeout",
    "OperationNotAttempted",
    "LogDirNotFound",
    "ReassignmentInProgress",
    "DelegationTokenAuthDisabled",
    "DelegationTokenNotFound",
    "DelegationTokenOwnerMismatch",
    "DelegationTokenRequestNotAllowed",
    "DelegationTokenAuthorizationFailed",
    "DelegationTokenExpired",
    "InvalidPrincipalType",
    "NonEmptyGroup",
    "GroupIdNotFound",
    "FetchSessionIdNotFound",
    "InvalidFetchSessionEpoch",
    "ListenerNotFound",
    "MemberIdRequired",
}


@pytest.mark.unit
def test_every_broker_error_code_is_classified() -> None:
    """Each error code aiokafka knows is either in the table or knowingly left to RETRY."""
    codes: set[type[BaseException]] = set()
    todo: list[type[BaseException]] = [ke.BrokerResponseError]
    while todo:
        cls = todo.pop()
        codes.add(cls)
        todo.extend(cls.__subclasses__())
    codes.discard(ke.BrokerResponseError)
    left = {c.__name__ for c in codes if kind_of(c()) is Kind.RETRY}
    assert left == RETRY_BY_DEFAULT
    listed = [cls for _, classes in KINDS for cls in classes]
    assert len(listed) == len(set(listed))  # no class in two kinds


@pytest.mark.unit
def test_a_later_event_acked_after_its_keys_failure_is_held_back() -> None:
    batch = [envelope(1, "a"), envelope(2, "b"), envelope(3, "a"), envelope(4, None)]
    failed = Failure("RequestTimedOutError", "late", Verdict.BROKER)
    results: list[PublishResult] = [failed, None, None, None]
    assert hold_back_after_failures(batch, results) == 1
    assert results == [failed, None, HELD_BACK, None]
    assert hold_back_after_failures(batch, results) == 0  # idempotent


@pytest.mark.unit
def test_resend_rounds_stop_a_key_at_its_first_final_failure() -> None:
    batch = [envelope(1, "a"), envelope(2, "a"), envelope(3, "b"), envelope(4, "b")]
    poison = Failure("MessageSizeTooLargeError", "big", Verdict.POISON)
    held = Failure("OutOfOrderSequenceNumber", "gap", Verdict.HELD)
    results: list[PublishResult] = [poison, held, held, held]
    todo = KafkaPublisher._next_round(batch, results, resend=[1, 2, 3])
    assert todo == [2, 3]  # b goes again; a stopped at its poison event
    assert results[1] is HELD_BACK


@pytest.mark.unit
def test_aiokafka_logs_are_rate_limited() -> None:
    limit = RateLimitFilter(interval=60)
    record = logging.LogRecord(
        "aiokafka", logging.ERROR, __file__, 1, "Unable connect to node %s", ("1",), None
    )
    passed = sum(limit.filter(logging.makeLogRecord(record.__dict__)) for _ in range(1000))
    assert passed == 1
    debug = logging.makeLogRecord({**record.__dict__, "levelno": logging.DEBUG})
    assert limit.filter(debug)
    limit.interval = 0
    again = logging.makeLogRecord(record.__dict__)
    assert limit.filter(again)
    assert "999 more like this" in again.getMessage()


@pytest.mark.unit
async def test_aiokafka_internals_the_kill_relies_on() -> None:
    """Killing a producer reaches into aiokafka (there is no public abort): fail loudly here
    if an upgrade moves what it uses."""
    producer = AIOKafkaProducer(bootstrap_servers="127.0.0.1:1", enable_idempotence=True)
    accumulator = producer._message_accumulator
    assert callable(accumulator.fail_all)
    assert isinstance(accumulator._batches, dict)
    assert isinstance(accumulator._pending_batches, set)
    assert hasattr(producer._sender, "sender_task")
    assert callable(producer.client.cluster.partitions_for_topic)
    assert callable(producer.client.add_topic)
    await producer.client.close()
    producer._closed = True


@pytest.mark.unit
async def test_no_broker_at_start_is_broker_unavailable_at_once() -> None:
    port = free_port_pair(29092)  # nothing listens there
    publisher = KafkaPublisher(f"127.0.0.1:{port}")
    t0 = time.monotonic()
    with pytest.raises(BrokerUnavailableError, match=str(port)):
        await publisher.publish([envelope(1, "a")])
    await publisher.stop()
    assert time.monotonic() - t0 < 2
    leftovers = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert leftovers == []


async def test_killing_a_producer_whose_sender_failed_logs_no_traceback(
    kafka_bootstrap: str,
) -> None:
    """Seen in a benchmark: the broker answered a produce request `REQUEST_TIMED_OUT`, the
    watchdog killed the producer, and its sender task ended with an exception rather than
    cancelled. aiokafka's done-callback (`Sender._fail_all`) then raised `AttributeError`
    in its transaction manager (an idempotent producer has no transaction waiter), logged by
    asyncio at ERROR with a traceback. The relay fails every pending send itself, so that
    callback has nothing left to do."""
    loop = asyncio.get_running_loop()
    reported: list[dict[str, Any]] = []
    previous = loop.get_exception_handler()
    loop.set_exception_handler(lambda _, context: reported.append(context))
    publisher = KafkaPublisher(kafka_bootstrap)
    await publisher.start()
    producer = publisher._producer
    sender = producer._sender
    real = sender._sender_task

    async def failing_sender() -> None:
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            raise RuntimeError("the sender failed while it was stopped") from None

    # The real sender stops; a stand-in that ends with an exception takes its place, with
    # aiokafka's own done-callback on it, as on the real task.
    real.remove_done_callback(sender._fail_all)
    real.cancel()
    await asyncio.gather(real, return_exceptions=True)
    stand_in = asyncio.create_task(failing_sender())
    stand_in.add_done_callback(sender._fail_all)
    sender._sender_task = stand_in
    await asyncio.sleep(0)
    try:
        publisher._kill(producer, "test: no ack")
        await asyncio.gather(stand_in, return_exceptions=True)
        await asyncio.sleep(0.05)  # done-callbacks run on the next loop iterations
        assert stand_in.exception() is not None  # it did end with an exception
        assert [c.get("message") for c in reported] == []
    finally:
        loop.set_exception_handler(previous)
        await publisher.stop()


class _ClosedWriter:
    def close(self) -> None:
        return None

    async def wait_closed(self) -> None:
        return None


async def test_the_ack_watchdog_stops_when_cancelled_as_its_probe_connects(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A round's watchdog is stopped (cancelled) when the acks are in. If the cancel came just
    as its reachability probe connected, Python 3.11's `asyncio.wait_for` returned the
    connection and dropped the cancel: the watchdog kept probing, and the round waited for
    it until the ack deadline, then killed the producer (20 s drains over many topics)."""
    loop = asyncio.get_running_loop()
    probing = asyncio.Event()
    connected: asyncio.Future[tuple[None, _ClosedWriter]] = loop.create_future()

    async def open_connection(host: str, port: int) -> tuple[None, _ClosedWriter]:
        probing.set()
        return await connected

    monkeypatch.setattr(asyncio, "open_connection", open_connection)
    publisher = KafkaPublisher("127.0.0.1:9", probe_interval=0.01)
    watchdog = _Watchdog(publisher, None, deadline=loop.time() + 60)
    watchdog.start()
    await probing.wait()
    connected.set_result((None, _ClosedWriter()))
    stopping = asyncio.create_task(watchdog.stop())  # runs right after the probe completes
    async with asyncio.timeout(5):
        await stopping
    assert publisher._abort_reason is None  # stopped, not timed out into an abort


@pytest.mark.postgres
@pytest.mark.slow
async def test_kafka_connections_that_the_network_forgets_are_given_up(database_url: str) -> None:
    """The network between the relay and Kafka forgets the producer's connections (a firewall's
    or a NAT gateway's idle timeout): their packets are dropped, with no reset. A broker of our
    own advertises a proxy that does that (tests/tcp_proxy.py). The producer's request timeout
    gives up, the relay retries on new connections, and every event arrives, in order per key,
    none dead-lettered."""
    if not kafka_available():
        pytest.skip("no Kafka jars in .services/kafka/libs (run scripts/services.sh up)")
    port = free_port_pair(29192)
    proxy = SilentProxy(port)
    await proxy.start()
    broker = KafkaBroker(
        "forgets", port, settings={"advertised.listeners": f"PLAINTEXT://127.0.0.1:{proxy.port}"}
    )
    topic = f"forgets-{uuid.uuid4().hex[:8]}"
    before = keyed_events(topic, keys=5, per_key=10)
    after = keyed_events(topic, keys=5, per_key=10)
    try:
        await asyncio.to_thread(broker.start)
        bootstrap = f"127.0.0.1:{proxy.port}"
        await create_topic(bootstrap, topic)
        await commit_events(database_url, before)
        relay = pg_relay(database_url, KafkaPublisher(bootstrap), batch_size=10)
        relay._breaker = CircuitBreaker(base_seconds=0.05, max_seconds=0.2)
        task = asyncio.create_task(relay.run())
        try:
            await relay.wait_for(lambda s: s.delivered == len(before), timeout=60)
            proxy.forget()
            forgotten_at = time.monotonic()
            await commit_events(database_url, after)
            await relay.wait_for(lambda s: s.delivered == len(before) + len(after), timeout=120)
            recovered = time.monotonic() - forgotten_at
        finally:
            relay.request_stop()
            await task
        received = first_seen_order(await read_topic(bootstrap, topic, len(before) + len(after)))
    finally:
        await proxy.stop()
        await asyncio.to_thread(broker.cleanup)
    print(
        f"\n[forgets] {proxy.forgotten} connections forgotten,"
        f" all delivered {recovered:.1f} s later"
    )
    assert proxy.forgotten >= 1
    assert relay.stats.dead_lettered == 0
    assert {e.id for e in received} == {e.id for e in [*before, *after]}
    assert_per_key_order(received)
