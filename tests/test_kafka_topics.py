"""Many topics at the real broker: what a producer that knows no topic yet asks the broker.

A fresh relay knows no topic. The publisher looks the new topics of a batch up together, in one
metadata request naming only them, then has aiokafka refresh its metadata once: two requests
per batch with new topics, however many, and none for a batch of known topics. (Metadata was
not the many-topics cliff: docs/benchmarks.md, "Many topics", has the figures.)
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition
from aiokafka.admin import AIOKafkaAdminClient, NewTopic
from aiokafka.conn import AIOKafkaConnection
from aiokafka.partitioner import murmur2
from aiokafka.protocol.metadata import MetadataRequest

from outbox.envelope import Envelope
from outbox.relay.publishers.kafka import KafkaPublisher

PARTITIONS = 2


@pytest.fixture
async def new_topics(kafka_bootstrap: str) -> AsyncIterator[list[str]]:
    """40 topics of 2 partitions, created for this test and deleted after it. A record is
    written to each partition first (another producer), so that every leader takes writes:
    a topic just created refuses them for a moment, and aiokafka then refreshes its metadata."""
    names = [f"many-{uuid.uuid4().hex[:8]}-{n}" for n in range(40)]
    admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
    await admin.start()
    try:
        await admin.create_topics([NewTopic(t, PARTITIONS, 1) for t in names])
        warm = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, enable_idempotence=True)
        await warm.start()
        try:
            sent = [
                await warm.send(t, b"warm-up", partition=p)
                for t in names
                for p in range(PARTITIONS)
            ]
            await asyncio.gather(*sent)
        finally:
            await warm.stop()
        yield names
    finally:
        await admin.delete_topics(names)
        await admin.close()


@pytest.fixture
def metadata_requests(monkeypatch: pytest.MonkeyPatch) -> list[list[str] | None]:
    """The topics named by every metadata request any client of this process sends (None:
    all topics), at the connection, below both the publisher's lookups and aiokafka's own."""
    asked: list[list[str] | None] = []
    real_send = AIOKafkaConnection.send

    def counting_send(self: AIOKafkaConnection, request: Any, expect_response: bool = True) -> Any:
        if isinstance(request, MetadataRequest):
            topics = request._topics
            asked.append(None if topics is None else sorted(topics))
        return real_send(self, request, expect_response)

    monkeypatch.setattr(AIOKafkaConnection, "send", counting_send)
    return asked


def batch_over(topics: list[str], first_seq: int) -> list[Envelope]:
    """Three keyed events per topic, topics interleaved as a claim would mix them."""
    return [
        Envelope(
            seq=first_seq + n,
            id=uuid.uuid4(),
            topic=topics[n % len(topics)],
            key=f"k{n}",
            payload=b'{"n": %d}' % n,
        )
        for n in range(3 * len(topics))
    ]


async def test_new_topics_are_looked_up_together(
    kafka_bootstrap: str, new_topics: list[str], metadata_requests: list[list[str] | None]
) -> None:
    first, second = new_topics[:20], new_topics[20:]
    publisher = KafkaPublisher(kafka_bootstrap)
    await publisher.start()
    try:
        metadata_requests.clear()  # the producer's bootstrap
        one = batch_over(first, 1)
        assert await publisher.publish(one) == [None] * len(one)
        assert metadata_requests[0] == sorted(first)  # the lookup: the new topics together
        assert len(metadata_requests) == 2  # and aiokafka's one refresh
        asked = len(metadata_requests)

        again = batch_over(first, 1_000)
        assert await publisher.publish(again) == [None] * len(again)
        assert len(metadata_requests) == asked  # nothing new: no request

        mixed = batch_over(first[:5] + second, 2_000)
        assert await publisher.publish(mixed) == [None] * len(mixed)
        assert metadata_requests[asked] == sorted(second)
        assert len(metadata_requests) == asked + 2
    finally:
        await publisher.stop()

    # Each event is in its topic, in the partition Kafka's default partitioner gives its key.
    for topic in first[:3] + second[:3]:
        expected: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
        for event in one + again + mixed:
            if event.topic == topic:
                assert event.key is not None
                expected[(murmur2(event.key.encode()) & 0x7FFFFFFF) % PARTITIONS].append(event.key)
        assert await keys_by_partition(kafka_bootstrap, topic) == expected


async def keys_by_partition(bootstrap: str, topic: str) -> dict[int, list[str]]:
    """The keys of a topic's records, per partition, in offset order (warm-ups left out)."""
    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, enable_auto_commit=False)
    await consumer.start()
    tps = [TopicPartition(topic, p) for p in range(PARTITIONS)]
    out: dict[int, list[str]] = {p: [] for p in range(PARTITIONS)}
    try:
        async with asyncio.timeout(30):
            consumer.assign(tps)
            await consumer.seek_to_beginning(*tps)
            ends = await consumer.end_offsets(tps)
            read = 0
            while read < sum(ends.values()):
                for tp, records in (await consumer.getmany(timeout_ms=200)).items():
                    read += len(records)
                    out[tp.partition] += [r.key.decode() for r in records if r.key is not None]
    finally:
        await consumer.stop()
    return out
