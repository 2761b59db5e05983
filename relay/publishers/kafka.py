"""Kafka publisher: an idempotent aiokafka producer with acks=all; only acked events count.

How it fails (the table of error classes and verdicts is in docs/errors.md, "Kafka"):

- Outage. A producer is never left running against a broker that is gone: aiokafka would retry
  in a tight loop (100% CPU, tens of thousands of log lines a second) and expire batches, which
  leaves gaps in the idempotent sequence. While acks are late, a watchdog probes the brokers'
  ports; when none answers (or no ack came within the deadline), the producer is killed, the
  unacked events are answered BROKER and the loop opens its circuit breaker. The next publish
  (the breaker's probe) starts a fresh producer: a new producer id, sequences from 0.
- A batch the broker failed. aiokafka numbers batches when it sends them and never takes the
  number back: after one failed batch every later batch of its partition fails with
  OutOfOrderSequenceNumber. So after any failed batch the producer is replaced, and the events
  that failed through no fault of their own (sequence errors) are resent at once (HELD if the
  rounds run out; no attempt counted).
- Too large. aiokafka never splits a batch: when the broker refuses one as too large, its
  records are sent again one by one, each in a batch of its own and acked before the next;
  only a record refused on its own is POISON. A topic that needed this gets one-record batches
  for a while. Big records (over half the batch size) always go alone, acked before anything
  later of their key is sent: if the broker refuses one, nothing after it of its key is out.
- Topics. The topics of a batch that the producer does not know yet are looked up together, in
  one metadata request, before anything is sent. An invalid name is POISON at once; a topic
  still missing after `topic_wait_seconds` is POISON (auto-create off); the error names it.
- Per-key order. A key stops at its first event that is not delivered: later events of the key
  are HELD_BACK, also when the failure came asynchronously with the ack.
- Security settings the brokers refuse at start (a wrong SASL password, a CA that does not
  verify them) raise ConfigurationError: `run` exits 2. Once running, the same errors are an
  outage (BROKER), as for Redis. See relay/publishers/kafka_security.py.

Records are built by the `Encoder` (outbox/envelope.py): value and headers in the envelope mode
of the event's topic, and the event's `created_at` as the timestamp.

aiokafka's own loggers are rate limited (one line per message template per 30 s).
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Sequence
from typing import Any

from aiokafka import AIOKafkaProducer
from aiokafka import errors as ke
from aiokafka.conn import create_conn
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest
from aiokafka.record.default_records import DefaultRecordBatchBuilder

from outbox.envelope import Encoder, Envelope, kafka_timestamp
from outbox.relay.logs import relay_logger
from outbox.relay.ordering import KeyGate, hold_back_after_failures
from outbox.relay.publishers.kafka_errors import (
    Kind,
    ProducerAborted,
    classify,
    describe,
    kind_of,
    quiet_aiokafka_logs,
)
from outbox.relay.publishers.kafka_security import CONNECTION_OPTIONS, configuration_problem
from outbox.relay.seams import (
    HELD_BACK,
    BrokerUnavailableError,
    ConfigurationError,
    Failure,
    Position,
    PublishResult,
    Verdict,
)

log = relay_logger("relay.kafka")


# -- the publisher -----------------------------------------------------------------------------


class _KeyPartitions:
    """Kafka's default key → partition mapping (murmur2, as the Java client), memoised.

    aiokafka hashes every message in pure Python (an eighth of the relay's CPU in profiles);
    keys repeat, so each is hashed once per partition count."""

    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._by_key: dict[tuple[bytes, int], int] = {}

    def partition(self, key: bytes, count: int) -> int:
        found = self._by_key.get((key, count))
        if found is None:
            if len(self._by_key) >= self.MAX_KEYS:
                self._by_key.clear()
            found = self._by_key[(key, count)] = (murmur2(key) & 0x7FFFFFFF) % count
        return found


class KafkaPublisher:
    name = "kafka"
    #: One record batch per partition: the relay claims more while events spread (seams.py).
    batches_per_partition = True

    #: Send rounds per publish: the first, then resends after a replaced producer.
    MAX_ROUNDS = 3
    #: How long a topic that refused multi-record batches gets one-record batches.
    ONE_BY_ONE_SECONDS = 600.0

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic_prefix: str = "",
        request_timeout_ms: int = 15_000,
        topic_wait_seconds: float = 2.0,
        probe_interval: float = 0.25,
        encoder: Encoder | None = None,
        **producer_options: Any,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic_prefix = topic_prefix
        #: Each record's value and headers, in its topic's envelope mode.
        self.encoder = encoder or Encoder()
        self._options: dict[str, Any] = {
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 0,
            "max_batch_size": 512 * 1024,
            "max_request_size": 2 * 1024 * 1024,
            "request_timeout_ms": request_timeout_ms,
            "client_id": "outbox-relay",
            **producer_options,
        }
        self._request_timeout = request_timeout_ms / 1000
        #: Our own deadline for the acks of a batch (aiokafka would retry for ever).
        self._ack_timeout = self._request_timeout + 5
        self._topic_wait = topic_wait_seconds
        self._probe_interval = probe_interval
        self._producer: Any = None
        self._dirty = False
        #: Partition and offset of each acked event (RecordsPositions); None: not recorded.
        self.positions: dict[int, Position] | None = None
        self._disposals: set[asyncio.Task[None]] = set()
        self._partitions = _KeyPartitions()
        #: Topics the broker called invalid (a name stays invalid).
        self._invalid_topics: dict[str, Failure] = {}
        #: Topics found missing: when first, and when last asked.
        self._missing_since: dict[str, float] = {}
        self._missing_checked: dict[str, tuple[float, Failure]] = {}
        #: Topics that refused multi-record batches as too large: until when to send one by one.
        self._one_by_one: dict[str, float] = {}
        #: Why the current publish's producer was killed (None while it lives).
        self._abort_reason: str | None = None
        #: The topics of the batch being published (a producer started meanwhile loads them).
        self._topics_in_use: set[str] = set()
        #: Records with a value larger than this are sent alone, acked before what follows.
        self._big_record = int(self._options["max_batch_size"]) // 2
        quiet_aiokafka_logs()

    # -- lifecycle -----------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the producer. ConfigurationError when the brokers refuse the relay's TLS or
        SASL settings (an operator must fix them); BrokerUnavailableError otherwise."""
        if self._producer is None:
            try:
                await self._start_producer()
            except BrokerUnavailableError:
                await self._raise_if_misconfigured()
                raise

    #: How long the diagnosis at start waits for its connections (an outage that drops
    #: packets would otherwise hold each start retry for another request timeout).
    DIAGNOSIS_SECONDS = 5.0

    async def _raise_if_misconfigured(self) -> None:
        """One connection to each bootstrap server, at once, with the producer's security
        options: aiokafka's own start only says "Unable to bootstrap" (see
        relay/publishers/kafka_security.py). Raises ConfigurationError for the first server
        whose answer is about the settings."""
        options = {k: self._options[k] for k in CONNECTION_OPTIONS if k in self._options}
        options["request_timeout_ms"] = self._options["request_timeout_ms"]

        async def connect(host: str, port: int) -> BaseException | None:
            try:
                connection = await create_conn(host, port, **options)
            except Exception as exc:  # noqa: BLE001 - the cause is what we came for
                return exc
            connection.close()
            return None

        servers = self._bootstrap_addresses()
        tasks = [asyncio.create_task(connect(host, port)) for host, port in servers]
        if not tasks:
            return
        _, late = await asyncio.wait(
            tasks, timeout=min(self._request_timeout, self.DIAGNOSIS_SECONDS)
        )
        for task in late:
            task.cancel()  # aiokafka closes a connection cancelled halfway
        await asyncio.gather(*tasks, return_exceptions=True)
        for (host, port), task in zip(servers, tasks, strict=True):
            outcome = None if task.cancelled() else task.result()
            problem = configuration_problem(outcome) if outcome is not None else None
            if problem is not None:
                raise ConfigurationError(f"kafka {host}:{port}: {problem}") from outcome

    async def stop(self) -> None:
        producer, self._producer = self._producer, None
        if producer is not None:
            try:
                async with asyncio.timeout(5):
                    await producer.stop()  # flushes what is still buffered
            except Exception:  # noqa: BLE001 - a stuck stop must not keep the relay up
                self._kill(producer, "stop failed")
            except BaseException:
                self._kill(producer, "stop cancelled")
                raise
        await self._await_disposals()

    def _new_producer(self) -> Any:
        return AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, **self._options)

    async def _start_producer(self) -> Any:
        await self._await_disposals()  # the last producer is really gone before a new one
        producer = self._new_producer()
        try:
            async with asyncio.timeout(self._request_timeout):
                await producer.start()
        except BaseException as exc:  # whatever it is, there is no producer
            self._kill(producer, "start failed")
            if not isinstance(exc, Exception):
                raise  # cancelled
            if isinstance(exc, asyncio.TimeoutError):
                exc = TimeoutError(f"no producer id within {self._request_timeout:.0f}s")
            raise BrokerUnavailableError(f"kafka {self.bootstrap_servers}: {exc!r}") from exc
        if self._topics_in_use:
            # A fresh producer within a publish: one metadata request for the batch's topics,
            # not one per topic at its first send.
            for topic in self._topics_in_use:
                producer.client.add_topic(topic)
            try:
                async with asyncio.timeout(self._request_timeout):
                    await producer.client.force_metadata_update()
            except Exception as exc:
                self._kill(producer, "metadata update failed")
                raise BrokerUnavailableError(
                    f"kafka {self.bootstrap_servers}: metadata update failed: {exc!r}"
                ) from exc
        self._producer = producer
        self._dirty = False
        return producer

    async def _fresh_producer(self, reason: str) -> Any:
        """Replace the producer (new producer id, sequences from 0)."""
        old, self._producer = self._producer, None
        if old is not None:
            try:
                async with asyncio.timeout(5):
                    await old.stop()  # nothing is pending: quick
            except Exception:  # noqa: BLE001 - stuck: kill it
                self._kill(old, reason)
            except BaseException:
                self._kill(old, reason)
                raise
        log.info("kafka_producer_replaced", reason=reason)
        return await self._start_producer()

    def _kill(self, producer: Any, reason: str) -> None:
        """Stop a producer now, without flushing: every pending send fails with
        ProducerAborted, its background tasks are cancelled and its connections closed (in a
        task the next start waits for)."""
        if producer is self._producer:
            self._producer = None
        if getattr(producer, "_outbox_killed", False):
            return
        with contextlib.suppress(Exception):
            producer._outbox_killed = True
        error = ProducerAborted(reason)
        sender_task = None
        with contextlib.suppress(Exception):
            sender = producer._sender
            sender_task = sender.sender_task
            if sender_task is not None:
                # Its done-callback would fail the pending sends, which fail here below; and
                # when the task ends with an error, not cancelled, it raised AttributeError
                # (an idempotent producer's transaction manager has no waiter): an ERROR log
                # with a traceback at every kill.
                sender_task.remove_done_callback(sender._fail_all)
                sender_task.cancel()
        with contextlib.suppress(Exception):
            accumulator = producer._message_accumulator
            accumulator.fail_all(error)
            # A batch queued again for a retry is no longer in `_pending_batches`, but its
            # done-callback still removes it from there: put it back, or that callback raises.
            for queue in accumulator._batches.values():
                accumulator._pending_batches.update(b for b in queue if b.retry_count)
        with contextlib.suppress(Exception):
            producer._closed = True  # stop() is now a no-op, and no "unclosed" warning
        task = asyncio.create_task(self._dispose(producer, sender_task))
        self._disposals.add(task)
        task.add_done_callback(self._disposals.discard)

    async def _dispose(self, producer: Any, sender_task: asyncio.Task[Any] | None) -> None:
        with contextlib.suppress(BaseException):
            async with asyncio.timeout(2):
                await producer.client.close()
        if sender_task is not None:
            with contextlib.suppress(BaseException):
                async with asyncio.timeout(2):
                    await asyncio.shield(sender_task)
            if sender_task.done() and not sender_task.cancelled():
                sender_task.exception()  # retrieved: no "never retrieved" noise

    async def _await_disposals(self) -> None:
        if self._disposals:
            await asyncio.wait(set(self._disposals), timeout=5)

    def _abort(self, producer: Any, reason: str) -> None:
        """The broker is gone for this publish: kill the producer; unacked events are BROKER."""
        if self._abort_reason is None:
            self._abort_reason = reason
            log.warning("kafka_producer_aborted", reason=reason)
        self._kill(producer, reason)

    # -- publish -------------------------------------------------------------------------------

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        self._abort_reason = None
        if self.positions is not None:
            self.positions.clear()
        producer = self._producer
        if producer is None:
            producer = await self._start_producer()
        elif self._dirty:
            producer = await self._fresh_producer("a batch failed at the broker")
        prefix = self.topic_prefix
        names = [prefix + e.topic for e in batch] if prefix else [e.topic for e in batch]
        topics = set(names)
        refused = await self._check_topics(producer, topics)
        self._topics_in_use = topics.difference(refused)
        try:
            return await self._publish(batch, names, refused)
        finally:
            self._topics_in_use = set()

    async def _publish(
        self, batch: Sequence[Envelope], names: list[str], refused: dict[str, Failure]
    ) -> list[PublishResult]:
        results: list[PublishResult] = [None] * len(batch)
        todo = list(range(len(batch)))
        alone: set[int] = set()
        violations = 0
        for round_no in range(self.MAX_ROUNDS):
            resend = await self._send_round(batch, names, todo, results, refused, alone)
            violations += hold_back_after_failures(batch, results)
            if self._abort_reason is not None:
                break
            todo = self._next_round(batch, results, resend)
            if not todo or round_no + 1 == self.MAX_ROUNDS:
                break  # what is left keeps its HELD answer: sent again with the next batch
        if violations:
            log.error(
                "kafka_acked_after_failure",
                events=violations,
                note="acked by the broker after an earlier event of their key failed; "
                "answered HELD_BACK, so they will be published again after it",
            )
        if self._abort_reason is not None and all(r is not None for r in results):
            raise BrokerUnavailableError(f"kafka {self.bootstrap_servers}: {self._abort_reason}")
        return results

    @staticmethod
    def _next_round(
        batch: Sequence[Envelope], results: list[PublishResult], resend: list[int]
    ) -> list[int]:
        """The events to send again, in order. A key stops at its first event that is not
        delivered and not sent again: its later events are HELD_BACK."""
        if not resend:
            return []
        again = set(resend)
        stopped = KeyGate()
        todo: list[int] = []
        for i, event in enumerate(batch):
            if results[i] is None:
                continue
            if i in again and stopped.admits(event):
                todo.append(i)
            else:
                stopped.close(event)
                if i in again:
                    results[i] = HELD_BACK
        return todo

    async def _send_round(
        self,
        batch: Sequence[Envelope],
        names: list[str],
        todo: list[int],
        results: list[PublishResult],
        refused: dict[str, Failure],
        alone: set[int],
    ) -> list[int]:
        """Send the `todo` events (in order) and wait for their acks; fill in `results`.
        Returns the events to send again with a fresh producer (after which the publisher's
        producer is a fresh one).

        Two phases. First, in a pipeline, every event except those to send alone (records of
        a topic that refuses batches, records refused in a batch, big records) and the later
        events of their keys. Then those, one by one, each acked before the next is sent: a
        refused record stops its key before anything later of the key went out."""
        producer = self._producer
        if producer is None or self._dirty:
            try:
                producer = await self._fresh_producer("resending after a failed batch")
            except BrokerUnavailableError as exc:
                self._abort_reason = str(exc)
                broker = Failure("BrokerUnavailableError", str(exc), Verdict.BROKER)
                for i in todo:
                    results[i] = broker
                return []
        loop = asyncio.get_running_loop()
        blocked = KeyGate()  # keys with an event not delivered in this round
        deferred: list[int] = []
        deferred_keys = KeyGate()  # keys with an event sent alone: the rest follow it
        unsent: list[int] = []
        one_by_one = self._one_by_one
        if one_by_one:
            now = loop.time()
            for topic in [t for t, until in one_by_one.items() if until < now]:
                del one_by_one[topic]
        big = self._big_record
        request_cap = int(self._options["max_request_size"])
        encode = self.encoder.kafka
        batches = _Batches(self, producer)
        sent: list[tuple[_Batch, asyncio.Future[Any]]] = []
        watchdog = _Watchdog(self, producer, loop.time() + self._ack_timeout)
        timer = loop.call_later(self._probe_interval, watchdog.start)
        try:
            for position, i in enumerate(todo):
                event = batch[i]
                if not blocked.admits(event):
                    results[i] = HELD_BACK
                    continue
                topic = names[i]
                if refused and topic in refused:
                    results[i] = refused[topic]
                    blocked.close(event)
                    continue
                value, headers = encode(event)
                size = len(value) + (len(event.key) if event.key is not None else 0)
                if size > request_cap:  # what aiokafka's `send` refused before any batch
                    results[i] = classify(
                        ke.MessageSizeTooLargeError(
                            f"the record's key and value are {size} bytes, more than "
                            f"max_request_size ({request_cap})"
                        ),
                        f"topic {topic!r}",
                    )
                    blocked.close(event)
                    continue
                if topic not in batches.counts:
                    try:
                        await batches.learn(topic)
                    except Exception as exc:  # noqa: BLE001 - the event's result, as a send's
                        if kind_of(exc) is Kind.BROKER:
                            self._abort(producer, f"metadata failed: {describe(exc)}")
                            built_ones = batches.in_send_order()
                            unsent = [j for b in built_ones for j in b.indices] + todo[position:]
                            break
                        results[i] = classify(exc, f"topic {topic!r}")
                        blocked.close(event)
                        continue
                if (
                    len(value) > big
                    or (alone and i in alone)
                    or (one_by_one and topic in one_by_one)
                    or not deferred_keys.admits(event)
                    or not batches.append(i, event, topic, value, headers)
                ):
                    deferred.append(i)
                    deferred_keys.close(event)
            for built in batches.in_send_order() if not unsent else []:
                try:
                    future = await producer.send_batch(
                        built.builder, built.topic, partition=built.partition
                    )
                except Exception as exc:  # noqa: BLE001 - any send error is its events' result
                    if kind_of(exc) is Kind.BROKER:
                        self._abort(producer, f"send failed: {describe(exc)}")
                        unsent += [j for b in batches.not_sent(built) for j in b.indices]
                        break
                    failure = classify(exc, f"topic {built.topic!r}")
                    for j in built.indices:
                        results[j] = failure
                        blocked.close(batch[j])
                else:
                    sent.append((built, future))
            outcomes = await asyncio.gather(*(f for _, f in sent), return_exceptions=True)
        finally:
            timer.cancel()
            await watchdog.stop()
        resend: list[int] = []
        positions = self.positions
        for (built, _), outcome in zip(sent, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                for i in built.indices:
                    event = batch[i]
                    self._failed(
                        i, event, built.topic, outcome, results, resend, alone, in_batch=True
                    )
                    blocked.close(event)
            elif positions is not None:  # the batch's RecordMetadata: its first offset
                partition, base = built.partition, outcome.offset
                for k, i in enumerate(built.indices):
                    positions[batch[i].seq] = Position(partition, base + k)
        if deferred and self._abort_reason is None:
            await self._send_one_by_one(batch, names, deferred, results, resend, alone, blocked)
        elif deferred:
            unsent.extend(deferred)
        if unsent:
            broker = Failure(
                "BrokerUnavailableError",
                f"kafka {self.bootstrap_servers}: {self._abort_reason}",
                Verdict.BROKER,
            )
            for i in unsent:
                results[i] = broker
        return resend

    def _failed(
        self,
        i: int,
        event: Envelope,
        topic: str,
        outcome: BaseException,
        results: list[PublishResult],
        resend: list[int],
        alone: set[int],
        *,
        in_batch: bool,
    ) -> None:
        """Record a failed ack: the event's answer, and whether to send it again."""
        if not isinstance(outcome, ProducerAborted):
            self._dirty = True  # the failed batch used sequence numbers: a gap now
        kind = kind_of(outcome)
        context = f"topic {topic!r}"
        if kind is Kind.RECORD:
            size = self._record_size(event)
            context += f", record of {size} bytes"
            if in_batch and size <= self._options["max_batch_size"]:
                # Its batch was refused, perhaps for the other records: send it alone.
                alone.add(i)
                resend.append(i)
                failure = classify(outcome, context + ", in a refused batch")
                results[i] = Failure(failure.error_class, failure.message, Verdict.HELD)
                return
            context += ", alone in its batch"
        elif kind is Kind.SEQUENCE:
            resend.append(i)
        results[i] = classify(outcome, context)

    async def _send_one_by_one(
        self,
        batch: Sequence[Envelope],
        names: list[str],
        deferred: list[int],
        results: list[PublishResult],
        resend: list[int],
        alone: set[int],
        blocked: KeyGate,
    ) -> None:
        """Send each deferred event in a batch of its own and wait for its ack."""
        loop = asyncio.get_running_loop()
        for position, i in enumerate(deferred):
            event = batch[i]
            if not blocked.admits(event):
                results[i] = HELD_BACK
                continue
            try:
                producer = self._producer
                if producer is None or self._dirty:  # a failed record left a sequence gap
                    producer = await self._fresh_producer("a record failed at the broker")
            except BrokerUnavailableError as exc:
                self._abort_reason = self._abort_reason or str(exc)
                for j in deferred[position:]:
                    results[j] = Failure("BrokerUnavailableError", str(exc), Verdict.BROKER)
                return
            topic = names[i]
            watchdog = _Watchdog(self, producer, loop.time() + self._ack_timeout)
            timer = loop.call_later(self._probe_interval, watchdog.start)
            try:
                future = await self._send_alone(producer, topic, event)
                outcome: BaseException | None = None
                metadata = await future
                if self.positions is not None:
                    self.positions[event.seq] = Position(metadata.partition, metadata.offset)
            except Exception as exc:  # noqa: BLE001 - any send error is that event's result
                outcome = exc
            finally:
                timer.cancel()
                await watchdog.stop()
            if outcome is None:
                results[i] = None
                if i in alone:
                    self._note_one_by_one(topic, loop.time())
                continue
            if kind_of(outcome) is Kind.BROKER:
                self._abort(producer, f"send failed: {describe(outcome)}")
                broker = Failure(
                    type(outcome).__name__,
                    f"kafka {self.bootstrap_servers}: {self._abort_reason}",
                    Verdict.BROKER,
                )
                for j in deferred[position:]:
                    results[j] = broker
                return
            self._failed(i, event, topic, outcome, results, resend, alone, in_batch=False)
            blocked.close(event)

    def _note_one_by_one(self, topic: str, now: float) -> None:
        """A record refused in a batch went through alone: the topic's size limit is below
        our batch size, so it gets one-record batches for a while."""
        if topic not in self._one_by_one:
            log.warning("kafka_topic_one_by_one", topic=topic, minutes=self.ONE_BY_ONE_SECONDS / 60)
        self._one_by_one[topic] = now + self.ONE_BY_ONE_SECONDS

    async def _send_alone(self, producer: Any, topic: str, event: Envelope) -> asyncio.Future[Any]:
        """Send one record in a batch of its own; the future of its ack."""
        key = event.key.encode() if event.key is not None else None
        builder = producer.create_batch()
        value, headers = self.encoder.kafka(event)
        timestamp = kafka_timestamp(event)
        if builder.append(timestamp=timestamp, key=key, value=value, headers=headers) is None:
            raise ke.MessageSizeTooLargeError("the record does not fit in a batch")
        count = await self._partition_count(producer, topic)
        if key is not None:
            partition = self._partitions.partition(key, count)
        else:
            cluster = producer.client.cluster
            available = cluster.available_partitions_for_topic(topic)
            partition = random.choice(sorted(available or range(count)))
        future: asyncio.Future[Any] = await producer.send_batch(builder, topic, partition=partition)
        return future

    @staticmethod
    async def _partition_count(producer: Any, topic: str) -> int:
        """The topic's partition count in the producer's metadata (a fresh producer fetches
        it; the topic was checked before, so this does not wait long)."""
        partitions = producer.client.cluster.partitions_for_topic(topic)
        if partitions is None:
            partitions = await producer.partitions_for(topic)
        return len(partitions)

    def _record_size(self, event: Envelope) -> int:
        key = event.key.encode() if event.key is not None else None
        value, headers = self.encoder.kafka(event)
        return int(DefaultRecordBatchBuilder.estimate_size_in_bytes(key, value, headers))

    # -- topics --------------------------------------------------------------------------------

    async def _check_topics(self, producer: Any, topics: set[str]) -> dict[str, Failure]:
        """The batch's topics that cannot take events, with the failure for their events.
        The others are in the producer's metadata when this returns. Topics the producer does
        not know yet are looked up together, one metadata request per try."""
        cluster = producer.client.cluster
        unknown = {t for t in topics if cluster.partitions_for_topic(t) is None}
        if not unknown:
            return {}
        refused: dict[str, Failure] = {}
        loop = asyncio.get_running_loop()
        now = loop.time()
        for topic in list(unknown):
            invalid = self._invalid_topics.get(topic)
            checked = self._missing_checked.get(topic)
            if invalid is not None:
                refused[topic] = invalid
                unknown.discard(topic)
            elif checked is not None and now - checked[0] < 1.0:
                refused[topic] = checked[1]  # asked less than a second ago: still missing
                unknown.discard(topic)
        delay = 0.05
        while unknown:
            now = loop.time()
            answer = await self._topic_metadata(producer, sorted(unknown))
            found: list[str] = []
            for topic in sorted(unknown):
                error, partitions = answer.get(topic, (ke.UnknownTopicOrPartitionError, 0))
                since = self._missing_since.setdefault(topic, now)
                if error is ke.NoError and partitions:
                    found.append(topic)
                    continue
                failure = self._topic_failure(topic, error, now - since)
                if failure is None:
                    continue  # perhaps being created: ask again
                refused[topic] = failure
                if error is ke.InvalidTopicError:
                    self._invalid_topics[topic] = failure
                else:
                    self._missing_checked[topic] = (now, failure)
                unknown.discard(topic)
                log.warning("kafka_topic_refused", topic=topic, error=failure.message)
            if found:
                for topic in found:
                    producer.client.add_topic(topic)
                await self._refresh_metadata(producer)
                for topic in found:
                    if cluster.partitions_for_topic(topic) is not None:
                        unknown.discard(topic)
                        self._missing_since.pop(topic, None)
                        self._missing_checked.pop(topic, None)
                    elif now - self._missing_since[topic] > self._topic_wait:
                        unknown.discard(topic)  # the broker has it, the producer does not
                        refused[topic] = Failure(
                            "LeaderNotAvailableError",
                            f"topic {topic!r}: no partition metadata after "
                            f"{now - self._missing_since[topic]:.1f}s",
                            Verdict.RETRY,
                        )
            if unknown:
                await asyncio.sleep(delay)
                delay = min(delay * 2, 0.5)
        return refused

    def _topic_failure(
        self, topic: str, error: type[BaseException], waited: float
    ) -> Failure | None:
        """What a metadata error for `topic` means for its events; None: ask again."""
        if error is ke.InvalidTopicError:
            return Failure(
                "InvalidTopicError",
                f"topic {topic!r} is not a valid Kafka topic name ({len(topic)} characters; "
                "at most 249 of ASCII letters, digits, '.', '_' and '-')",
                Verdict.POISON,
            )
        if error in (ke.TopicAuthorizationFailedError, ke.PolicyViolationError):
            return Failure(
                error.__name__, f"topic {topic!r}: the broker refused it", Verdict.POISON
            )
        if waited < self._topic_wait:
            return None
        if error is ke.UnknownTopicOrPartitionError:
            return Failure(
                "UnknownTopicOrPartitionError",
                f"topic {topic!r} does not exist, and was not created within "
                f"{self._topic_wait:g}s (is auto.create.topics.enable off?)",
                Verdict.POISON,
            )
        # Leader not available and the like: the topic exists but cannot take writes yet.
        return Failure(
            getattr(error, "__name__", "KafkaError"),
            f"topic {topic!r} is not ready after {waited:.1f}s",
            Verdict.RETRY,
        )

    async def _topic_metadata(
        self, producer: Any, topics: list[str]
    ) -> dict[str, tuple[type[ke.BrokerResponseError], int]]:
        """Topic -> (error class, partition count), from one metadata request."""
        client = producer.client
        node = client.get_random_node()
        try:
            async with asyncio.timeout(self._request_timeout):
                response = await client.send(node, MetadataRequest(topics))
        except Exception as exc:
            self._abort(producer, f"metadata request failed: {describe(exc)}")
            raise BrokerUnavailableError(
                f"kafka {self.bootstrap_servers}: metadata request failed: {exc!r}"
            ) from exc
        out: dict[str, tuple[type[ke.BrokerResponseError], int]] = {}
        for entry in response.topics:
            # (error_code, name, [is_internal,] partitions, [...]) depending on the version
            partitions = next((f for f in entry[2:] if isinstance(f, list)), [])
            out[entry[1]] = (ke.for_code(entry[0]), len(partitions))
        return out

    async def _refresh_metadata(self, producer: Any) -> None:
        try:
            async with asyncio.timeout(self._request_timeout):
                await producer.client.force_metadata_update()
        except Exception as exc:
            self._abort(producer, f"metadata update failed: {describe(exc)}")
            raise BrokerUnavailableError(
                f"kafka {self.bootstrap_servers}: metadata update failed: {exc!r}"
            ) from exc

    # -- reachability --------------------------------------------------------------------------

    def _bootstrap_addresses(self) -> list[tuple[str, int]]:
        addresses = []
        for part in self.bootstrap_servers.split(","):
            host, _, port = part.strip().rpartition(":")
            if host and port.isdigit():
                addresses.append((host.strip("[]"), int(port)))
        return addresses

    async def _reachable(self, producer: Any) -> bool:
        """Whether any broker of the cluster (or of the bootstrap list) accepts a connection."""
        addresses: set[tuple[str, int]] = set()
        with contextlib.suppress(Exception):
            addresses |= {(b.host, int(b.port)) for b in producer.client.cluster.brokers()}
        addresses.update(self._bootstrap_addresses())
        for host, number in sorted(addresses):
            try:
                async with asyncio.timeout(1.0):
                    _, writer = await asyncio.open_connection(host, number)
            except (OSError, TimeoutError):
                continue
            writer.close()
            with contextlib.suppress(Exception):
                await writer.wait_closed()
            return True
        return False


class _Batch:
    """One record batch for a topic partition, and the batch indices of its events."""

    __slots__ = ("builder", "generation", "indices", "partition", "topic")

    def __init__(self, builder: Any, topic: str, partition: int, generation: int) -> None:
        self.builder = builder
        self.topic = topic
        self.partition = partition
        #: How many batches of the partition came before it in this round.
        self.generation = generation
        self.indices: list[int] = []


class _Batches:
    """A round's records, built into one aiokafka batch per topic partition (`create_batch`,
    `send_batch`): one future per batch instead of one per record, which is most of what
    aiokafka's `send` costs. A key's records go to one partition, in order."""

    def __init__(self, publisher: KafkaPublisher, producer: Any) -> None:
        self._publisher = publisher
        self._producer = producer
        self._open: dict[tuple[str, int], _Batch] = {}
        self._all: list[_Batch] = []
        self._generations: dict[tuple[str, int], int] = {}
        #: Each topic's partition count (`learn`).
        self.counts: dict[str, int] = {}
        #: The partition of a topic's records without a key, for this round.
        self._keyless: dict[str, int] = {}

    async def learn(self, topic: str) -> None:
        """Look up the topic's partition count (before the first `append` of its events)."""
        self.counts[topic] = await self._publisher._partition_count(self._producer, topic)

    def append(
        self,
        i: int,
        event: Envelope,
        topic: str,
        value: bytes,
        headers: list[tuple[str, bytes]],
    ) -> bool:
        """Add event `i` to its partition's batch; False when it does not fit in an empty one."""
        key = event.key.encode() if event.key is not None else None
        partition = self._partition(topic, key)
        timestamp = kafka_timestamp(event)
        built = self._open.get((topic, partition))
        if (
            built is None
            or built.builder.append(timestamp=timestamp, key=key, value=value, headers=headers)
            is None
        ):  # none yet, or full (and closed now): a new batch for the partition
            built = self._new(topic, partition)
            if (
                built.builder.append(timestamp=timestamp, key=key, value=value, headers=headers)
                is None
            ):  # too big for any batch
                del self._open[(topic, partition)]
                self._all.pop()
                return False
        built.indices.append(i)
        return True

    def _new(self, topic: str, partition: int) -> _Batch:
        generation = self._generations.get((topic, partition), 0)
        self._generations[(topic, partition)] = generation + 1
        built = _Batch(self._producer.create_batch(), topic, partition, generation)
        self._open[(topic, partition)] = built
        self._all.append(built)
        return built

    def _partition(self, topic: str, key: bytes | None) -> int:
        count = self.counts[topic]
        if key is not None:
            return self._publisher._partitions.partition(key, count)
        chosen = self._keyless.get(topic)
        if chosen is None:
            available = self._producer.client.cluster.available_partitions_for_topic(topic)
            chosen = self._keyless[topic] = random.choice(sorted(available or range(count)))
        return chosen

    def in_send_order(self) -> list[_Batch]:
        """Every partition's first batch, then the second ones, ...: aiokafka waits for a
        partition's batch to go out before it queues the next one of that partition."""
        return sorted(self._all, key=lambda b: b.generation)

    def not_sent(self, first: _Batch) -> list[_Batch]:
        """`first` and the batches after it in send order."""
        order = self.in_send_order()
        return order[order.index(first) :]


class _Watchdog:
    """Runs while a round's sends and acks take longer than a probe interval: kills the
    producer when no broker answers, or when the acks are overdue."""

    __slots__ = ("_deadline", "_producer", "_publisher", "_task")

    def __init__(self, publisher: KafkaPublisher, producer: Any, deadline: float) -> None:
        self._publisher = publisher
        self._producer = producer
        self._deadline = deadline
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._watch())

    async def stop(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})  # our own cancellation still propagates
            if not task.cancelled():
                task.exception()

    async def _watch(self) -> None:
        publisher = self._publisher
        loop = asyncio.get_running_loop()
        while True:
            if loop.time() > self._deadline:
                publisher._abort(self._producer, f"no ack within {publisher._ack_timeout:.0f}s")
                return
            if not await publisher._reachable(self._producer):
                publisher._abort(self._producer, "no broker accepts connections")
                return
            await asyncio.sleep(publisher._probe_interval)
