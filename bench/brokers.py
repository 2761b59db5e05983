"""Topics and streams per run, delivered counts, and the consumers that time and order-check."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import re
import time
from dataclasses import dataclass, field
from typing import Any, Literal, cast

import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.errors import KafkaConnectionError
from confluent_kafka import OFFSET_BEGINNING, Consumer
from confluent_kafka import TopicPartition as KafkaPartition

from bench.infra import Services

Broker = Literal["kafka", "redis"]
BROKERS: tuple[Broker, ...] = ("kafka", "redis")
PARTITIONS = 3
#: The payload id every system carries through (see bench.seed.payload).
BENCH_ID = re.compile(rb'"b": ?"([0-9a-f]{32})"')


@dataclass
class OrderCheck:
    """Per-key order as the consumer saw it: `outbox-seq` must grow for every key."""

    received: int = 0
    violations: int = 0
    duplicates: int = 0
    _last: dict[bytes, int] = field(default_factory=dict)
    _seen: set[int] = field(default_factory=set)

    def feed(self, key: bytes | None, seq: int) -> None:
        self.received += 1
        if seq in self._seen:
            self.duplicates += 1
        self._seen.add(seq)
        if key is None:
            return
        last = self._last.get(key)
        if last is not None and seq < last:
            self.violations += 1
        else:
            self._last[key] = seq

    def summary(self) -> dict[str, int]:
        return {
            "received": self.received,
            "order_violations": self.violations,
            "duplicates": self.duplicates,
            "keys": len(self._last),
        }


class BrokerOps:
    def __init__(self, services: Services) -> None:
        self.services = services

    def redis(self) -> aioredis.Redis:
        return aioredis.Redis.from_url(self.services.redis_url)

    async def prepare(self, broker: Broker, topic: str, *, append_times: bool = False) -> None:
        """A fresh topic (3 partitions, created up front) or an absent stream. `append_times`:
        the broker stamps each record with the time it appended it (`LogAppendTime`, in ms),
        which the latency runs use to split the path at the broker."""
        if broker == "redis":
            await self._delete_stream(topic)
            return
        configs = {"message.timestamp.type": "LogAppendTime"} if append_times else {}
        admin = await self._kafka_admin()
        try:
            await admin.create_topics(
                [
                    NewTopic(
                        topic,
                        num_partitions=PARTITIONS,
                        replication_factor=1,
                        topic_configs=configs,
                    )
                ]
            )
        finally:
            await admin.close()
        await self._wait_for_leaders(topic)

    async def _delete_stream(self, stream: str) -> None:
        client = self.redis()
        try:
            await client.delete(stream)
        finally:
            await client.aclose()

    async def _kafka_admin(self, patience: float = 120.0) -> AIOKafkaAdminClient:
        """An admin client; waits while the broker is down (others' tests restart it)."""
        deadline = time.monotonic() + patience
        while True:
            admin = AIOKafkaAdminClient(bootstrap_servers=self.services.kafka_bootstrap)
            try:
                await admin.start()
            except KafkaConnectionError:
                await admin.close()
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(1.0)
            else:
                return admin

    async def _wait_for_leaders(self, topic: str) -> None:
        consumer = AIOKafkaConsumer(bootstrap_servers=self.services.kafka_bootstrap)
        await consumer.start()
        try:
            for _ in range(100):
                await consumer._client.force_metadata_update()
                parts = consumer.partitions_for_topic(topic)
                if parts and len(parts) == PARTITIONS:
                    return
                await asyncio.sleep(0.05)
        finally:
            await consumer.stop()

    async def prepare_many(self, broker: Broker, topics: list[str]) -> None:
        """Fresh topics (3 partitions each), created up front, with one record written to each
        partition (a leader just created refuses writes for a while, and that is not what is
        measured); or absent streams."""
        if broker == "redis":
            client = self.redis()
            try:
                await client.delete(*topics)
            finally:
                await client.aclose()
            return
        admin = await self._kafka_admin()
        try:
            for i in range(0, len(topics), 100):
                await admin.create_topics(
                    [
                        NewTopic(t, num_partitions=PARTITIONS, replication_factor=1)
                        for t in topics[i : i + 100]
                    ]
                )
        finally:
            await admin.close()
        # aiokafka waits for each topic's metadata, and retries while a leader is not ready
        # (with a warning per partition: not news here).
        producer = AIOKafkaProducer(bootstrap_servers=self.services.kafka_bootstrap)
        sender_log = logging.getLogger("aiokafka.producer.sender")
        level = sender_log.level
        sender_log.setLevel(logging.ERROR)
        await producer.start()
        try:
            await producer.client.set_topics(topics)  # one metadata request, not one per topic
            acks = [
                await producer.send(t, b"warm-up", partition=p)
                for t in topics
                for p in range(PARTITIONS)
            ]
            await asyncio.gather(*acks)
        finally:
            await producer.stop()
            sender_log.setLevel(level)

    async def write_first_index_entries(self, topics: list[str]) -> float:
        """Make the broker write the first offset- and time-index entry of every partition of
        `topics` (Kafka topics made by `prepare_many`); returns the seconds it took.

        A partition's first index entry is the first write into its segment's preallocated,
        memory-mapped index files (10 MB each by default, 1 MB on the project's brokers), and
        on this machine's kernel such a write costs ~0.2 ms of CPU per MB of the file
        (measured with Python's mmap alone): with 10 MB indexes, a produce request that
        crossed the first index entries of 3,000 new partitions took 12-16 s at the broker,
        with 1 MB ~2 s (docs/benchmarks.md, "Eighth session"). The broker adds an entry at
        the first append after `index.interval.bytes` (4,096) of log: a record of 4.5 KB,
        then one more, to each partition."""
        producer = AIOKafkaProducer(
            bootstrap_servers=self.services.kafka_bootstrap,
            request_timeout_ms=120_000,
            max_request_size=16 * 1024 * 1024,
        )
        await producer.start()
        started = time.perf_counter()
        try:
            await producer.client.set_topics(topics)
            for value in (b"i" * 4608, b"index"):
                acks = [
                    await producer.send(t, value, partition=p)
                    for t in topics
                    for p in range(PARTITIONS)
                ]
                await asyncio.gather(*acks)
        finally:
            await producer.stop()
        return time.perf_counter() - started

    async def delivered_many(self, broker: Broker, topics: list[str]) -> int:
        """Entries in all the streams / records in all the topics."""
        if broker == "redis":
            client = self.redis()
            try:
                async with client.pipeline(transaction=False) as pipe:
                    for topic in topics:
                        pipe.xlen(topic)
                    return sum(int(n) for n in await pipe.execute())
            finally:
                await client.aclose()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.services.kafka_bootstrap)
        await consumer.start()
        try:
            # Every topic's metadata in one request (end_offsets would add them one by one).
            await consumer._client.set_topics(topics)
            parts = [TopicPartition(t, p) for t in topics for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(parts)
            return int(sum(ends.values()))
        finally:
            await consumer.stop()

    async def cleanup_many(self, broker: Broker, topics: list[str]) -> None:
        with contextlib.suppress(Exception):
            if broker == "redis":
                client = self.redis()
                try:
                    await client.delete(*topics)
                finally:
                    await client.aclose()
                return
            admin = AIOKafkaAdminClient(bootstrap_servers=self.services.kafka_bootstrap)
            await admin.start()
            try:
                for i in range(0, len(topics), 100):
                    await admin.delete_topics(topics[i : i + 100])
            finally:
                await admin.close()

    async def delivered(self, broker: Broker, topic: str) -> int:
        """Entries in the stream / records in the topic (sum of end offsets)."""
        if broker == "redis":
            client = self.redis()
            try:
                return int(await client.xlen(topic))
            finally:
                await client.aclose()
        consumer = AIOKafkaConsumer(bootstrap_servers=self.services.kafka_bootstrap)
        await consumer.start()
        try:
            parts = [TopicPartition(topic, p) for p in range(PARTITIONS)]
            ends = await consumer.end_offsets(parts)
            return int(sum(ends.values()))
        finally:
            await consumer.stop()

    async def cleanup(self, broker: Broker, topic: str) -> None:
        with contextlib.suppress(Exception):
            if broker == "redis":
                await self._delete_stream(topic)
            else:
                admin = AIOKafkaAdminClient(bootstrap_servers=self.services.kafka_bootstrap)
                await admin.start()
                try:
                    await admin.delete_topics([topic])
                finally:
                    await admin.close()

    async def check_stream_order(self, stream: str) -> OrderCheck:
        """Read a whole stream in order and check per-key order of the `outbox-seq` field."""
        check = OrderCheck()
        client = self.redis()
        try:
            start = "-"
            while True:
                entries = cast(list[Any], await client.xrange(stream, min=start, count=10_000))
                for _, fields in entries:
                    check.feed(fields.get(b"outbox-key"), int(fields[b"outbox-seq"]))
                if len(entries) < 10_000:
                    return check
                start = "(" + entries[-1][0].decode()
        finally:
            await client.aclose()


def bench_id_of(*values: bytes | None) -> str | None:
    for value in values:
        if value:
            match = BENCH_ID.search(value)
            if match:
                return match.group(1).decode()
    return None


class Receiver:
    """Records when each event reaches a consumer: bench id -> time.monotonic(). On Kafka, also
    the record's timestamp, on the same clock (`appended`): on a topic made with
    `prepare(..., append_times=True)` the time the broker appended it, to the millisecond."""

    def __init__(self, services: Services, broker: Broker, topic: str) -> None:
        self.services = services
        self.broker = broker
        self.topic = topic
        self.receipts: dict[str, float] = {}
        self.appended: dict[str, float] = {}
        self.order = OrderCheck()
        self.ready = asyncio.Event()
        self._stop = asyncio.Event()

    def stop(self) -> None:
        self._stop.set()

    async def run(self) -> None:
        if self.broker == "redis":
            await self._redis()
        else:
            await self._kafka()

    async def _redis(self) -> None:
        client = aioredis.Redis.from_url(self.services.redis_url)
        last: bytes | str = "0"
        self.ready.set()
        try:
            while not self._stop.is_set():
                reply = cast(
                    list[Any], await client.xread({self.topic: last}, count=2000, block=100)
                )
                now = time.monotonic()
                for _, entries in reply:
                    for entry_id, fields in entries:
                        last = entry_id
                        found = bench_id_of(*fields.values())
                        if found is not None:
                            self.receipts.setdefault(found, now)
                        if b"outbox-seq" in fields:  # plain envelope (not FastStream's)
                            self.order.feed(fields.get(b"outbox-key"), int(fields[b"outbox-seq"]))
        finally:
            await client.aclose()

    async def _kafka(self) -> None:
        """librdkafka (confluent-kafka), polled in a thread of its own. The consumer shares the
        machine's two cores with the relay, the writers, Postgres and Kafka: aiokafka's
        consumer cost 183 us of CPU per record at 1,000 records/s, librdkafka 49 (ad hoc
        probe, docs/benchmarks.md "Eighth session"), so its load no longer moves the tail
        it measures. It is also a client of another lineage reading what the relay wrote."""
        await asyncio.to_thread(self._kafka_poll, asyncio.get_running_loop())

    def _kafka_poll(self, loop: asyncio.AbstractEventLoop) -> None:
        consumer = Consumer(
            {
                "bootstrap.servers": self.services.kafka_bootstrap,
                "group.id": f"bench-receiver-{self.topic}",  # assigned, never joins the group
                "enable.auto.commit": False,
                "fetch.wait.max.ms": 50,
            }
        )
        wall_to_monotonic = time.monotonic() - time.time()  # both clocks are the machine's
        try:
            consumer.assign(
                [KafkaPartition(self.topic, p, OFFSET_BEGINNING) for p in range(PARTITIONS)]
            )
            loop.call_soon_threadsafe(self.ready.set)
            while not self._stop.is_set():
                message = consumer.poll(0.1)
                if message is None or message.error() is not None:
                    continue
                now = time.monotonic()
                found = bench_id_of(message.value())
                if found is not None:
                    self.receipts.setdefault(found, now)
                    stamp_ms = message.timestamp()[1]
                    self.appended.setdefault(found, stamp_ms / 1000 + wall_to_monotonic)
                seq = dict(message.headers() or ()).get("outbox-seq")
                if seq is not None:
                    self.order.feed(message.key(), int(seq))
        finally:
            consumer.close()
