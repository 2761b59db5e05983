"""Read the relay's Kafka records with aiokafka, in any envelope mode.

`Envelope.from_kafka` reads plain, faststream, cloudevents-binary and cloudevents-structured
records alike. Delivery is at-least-once: deduplicate on `event.id`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from aiokafka import AIOKafkaConsumer

from outbox import Envelope


async def consume(
    bootstrap: str, topic: str, group: str, handle: Callable[[Envelope], Awaitable[None]]
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
            event = Envelope.from_kafka(record.topic, record.key, record.value, record.headers)
            await handle(event)  # event.id, .seq, .key, .event_type, .created_at, .json()
            await consumer.commit()  # after handling: at-least-once
    finally:
        await consumer.stop()
