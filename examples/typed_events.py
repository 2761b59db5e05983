"""Typed events: one pydantic model per event, shared by the writer and its consumers.

The writer adds the event in its transaction in one call; the consumer reads a Kafka record or
a Redis stream entry back into the model, in any envelope mode. The event type is the class
name, with `.v<version>` when the class declares one: `OrderPlaced.v2`.
"""

import uuid
from collections.abc import Mapping, Sequence

from pydantic import BaseModel
from sqlalchemy.ext.asyncio import AsyncSession

from outbox import Envelope, Event, OutboxEvent, Registry, enqueue


class OrderPlaced(Event, topic="orders", version=2):
    order_id: int
    total_cents: int


class OrderCancelled(Event, topic="orders"):
    order_id: int
    reason: str | None = None


async def place_and_cancel(session: AsyncSession, order_id: int) -> uuid.UUID:
    """In the caller's transaction: `enqueue` the model, or add `OutboxEvent.of(model)`."""
    key = f"order-{order_id}"
    placed = await enqueue(session, OrderPlaced(order_id=order_id, total_cents=4200), key=key)
    session.add(OutboxEvent.of(OrderCancelled(order_id=order_id, reason="test"), key=key))
    return placed


#: The consumer's models, by event type.
REGISTRY = Registry(OrderPlaced, OrderCancelled)


def from_record(
    topic: str, key: bytes | None, value: bytes | None, headers: Sequence[tuple[str, bytes | None]]
) -> BaseModel:
    """A Kafka record's event as its model (aiokafka: record.topic, .key, .value, .headers).
    UnknownEventTypeError for a type not registered, EventPayloadError for a bad payload."""
    return REGISTRY.parse(Envelope.from_kafka(topic, key, value, headers))


def from_entry(stream: str, fields: Mapping[bytes, bytes]) -> BaseModel:
    """A Redis stream entry's event as its model."""
    return REGISTRY.parse(Envelope.from_redis(stream, fields))
