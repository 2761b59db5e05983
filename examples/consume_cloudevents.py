"""Read the relay's cloudevents-binary and cloudevents-structured events with the CloudEvents
SDK (`cloudevents` 2.x): records of Kafka, and entries of Redis streams.

A Redis entry holds the Kafka record's headers as its fields and the value in `data`, so the
SDK's Kafka binding reads it too.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping

from aiokafka import AIOKafkaConsumer
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import kafka


async def consume(
    bootstrap: str, topic: str, group: str, handle: Callable[[BaseCloudEvent], Awaitable[None]]
) -> None:
    consumer = AIOKafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=group,
        enable_auto_commit=False,
        auto_offset_reset="earliest",
    )
    await consumer.start()
    try:
        async for record in consumer:
            message = kafka.KafkaMessage(
                headers=dict(record.headers), key=record.key, value=record.value
            )
            await handle(kafka.from_kafka_event(message))  # binary or structured
            await consumer.commit()
    finally:
        await consumer.stop()


def from_stream_entry(fields: Mapping[bytes, bytes]) -> BaseCloudEvent:
    """A Redis stream entry of either CloudEvents mode (redis-py's bytes replies)."""
    headers = {name.decode(): value for name, value in fields.items() if name != b"data"}
    return kafka.from_kafka_event(kafka.KafkaMessage(headers, None, fields[b"data"]))
