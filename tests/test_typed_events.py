"""Typed events (outbox/events.py, outbox/consume.py): a pydantic model written in one call,
and read back into its model by a consumer, through the real relay, Kafka and Redis, in every
envelope mode."""

from __future__ import annotations

import json
from typing import Any

import pytest
import redis.asyncio as aioredis
from pydantic import BaseModel, create_model
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import (
    Envelope,
    Event,
    EventPayloadError,
    OutboxEvent,
    OutboxValidationError,
    Registry,
    UnknownEventTypeError,
    enqueue,
)
from outbox.consume import parse
from outbox.envelope import MODES, Encoder, EnvelopeMode
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from outbox.urls import sqlalchemy_async_url
from tests.helpers import pg_relay, read_stream, read_topic
from tests.test_consumers import load_example
from tests.test_envelopes import read_records


class Line(BaseModel):
    sku: str
    quantity: int


class OrderPlaced(Event, topic="orders", version=2):
    order_id: int
    lines: list[Line]


class OrderPlacedV1(Event, topic="orders", type="OrderPlaced", version=1):
    order_id: int


class OrderCancelled(Event, topic="orders"):
    order_id: int
    reason: str | None = None


class Untyped(BaseModel):  # a plain pydantic model: its class name, no topic
    n: int


REGISTRY = Registry(OrderPlaced, OrderPlacedV1, OrderCancelled, Untyped)


def envelope_of(row: OutboxEvent) -> Envelope:
    """What a consumer would read of the row (the envelope modes are tested elsewhere)."""
    return Envelope(
        seq=1,
        id=row.id,
        topic=row.topic,
        key=row.key,
        payload=json.dumps(row.payload).encode(),
        event_type=row.event_type,
    )


# -- unit --------------------------------------------------------------------------------------


@pytest.mark.unit
def test_the_class_keywords_give_topic_type_and_version() -> None:
    placed = OrderPlaced(order_id=7, lines=[Line(sku="a", quantity=2)])
    row = OutboxEvent.of(placed, key="order-7", headers={"n": "1"})
    assert (row.topic, row.key, row.event_type) == ("orders", "order-7", "OrderPlaced.v2")
    assert row.payload == {"order_id": 7, "lines": [{"sku": "a", "quantity": 2}]}
    assert row.headers == {"n": "1"}
    assert OutboxEvent.of(OrderPlacedV1(order_id=7)).event_type == "OrderPlaced.v1"
    assert OutboxEvent.of(OrderCancelled(order_id=7)).event_type == "OrderCancelled"
    assert OutboxEvent.of(placed, topic="orders-eu").topic == "orders-eu"  # topic= wins

    plain = OutboxEvent.of(Untyped(n=1), topic="misc")
    assert (plain.topic, plain.event_type, plain.payload) == ("misc", "Untyped", {"n": 1})


@pytest.mark.unit
def test_a_missing_topic_and_bad_class_keywords_are_named() -> None:
    with pytest.raises(OutboxValidationError, match="Untyped declares no topic") as caught:
        OutboxEvent.of(Untyped(n=1))
    assert caught.value.field == "topic"
    with pytest.raises(OutboxValidationError, match="topic") as caught:

        class BadTopic(Event, topic="no spaces"):
            pass

    with pytest.raises(OutboxValidationError, match="positive int") as caught:

        class BadVersion(Event, version=0):
            pass

    assert caught.value.field == "version"
    with pytest.raises(OutboxValidationError, match="pydantic model") as caught:
        OutboxEvent.of({"n": 1}, topic="t")  # type: ignore[arg-type]
    assert caught.value.field == "event"


@pytest.mark.unit
def test_the_registry_parses_by_type_and_names_what_is_wrong() -> None:
    placed = OrderPlaced(order_id=7, lines=[Line(sku="a", quantity=2)])
    assert REGISTRY.parse(envelope_of(OutboxEvent.of(placed))) == placed
    old = OrderPlacedV1(order_id=7)
    assert REGISTRY.parse(envelope_of(OutboxEvent.of(old))) == old  # the two versions apart
    assert parse(envelope_of(OutboxEvent.of(placed)), OrderPlaced) == placed

    bad = envelope_of(
        OutboxEvent(
            topic="orders",
            event_type="OrderPlaced.v2",
            payload={"order_id": 7, "lines": [{"sku": "a", "quantity": "many"}]},
        )
    )
    with pytest.raises(EventPayloadError) as caught:
        REGISTRY.parse(bad)
    assert caught.value.event_type == "OrderPlaced.v2"
    assert caught.value.field == "lines.0.quantity"
    assert str(caught.value).startswith(f"OrderPlaced.v2 (event {bad.id}): lines.0.quantity: ")

    unknown = envelope_of(OutboxEvent(topic="orders", event_type="OrderShipped", payload={}))
    with pytest.raises(UnknownEventTypeError, match="'OrderShipped' is not registered") as unk:
        REGISTRY.parse(unknown)
    assert unk.value.event_type == "OrderShipped"
    with pytest.raises(UnknownEventTypeError, match=r"expected 'OrderPlaced\.v2'"):
        parse(envelope_of(OutboxEvent.of(old)), OrderPlaced)
    with pytest.raises(ValueError, match="registered already"):
        Registry(OrderCancelled).register(create_model("OrderCancelled"))

    class Again(Event, type="OrderPlaced", version=2):
        pass

    with pytest.raises(ValueError, match=r"'OrderPlaced\.v2': registered already"):
        Registry(OrderPlaced, Again)


@pytest.mark.unit
async def test_enqueue_takes_a_typed_event_or_the_fields_not_both() -> None:
    session: Any = object()  # the checks come before the session is used
    placed = OrderCancelled(order_id=1)
    with pytest.raises(OutboxValidationError, match="not both") as caught:
        await enqueue(session, placed, payload={"x": 1})  # type: ignore[call-overload]
    assert caught.value.field == "event"
    with pytest.raises(OutboxValidationError, match="payload: is required"):
        await enqueue(session, topic="t")  # type: ignore[call-overload]


# -- real Postgres, the real relay, Kafka and Redis --------------------------------------------


async def write_typed(database_url: str, topic: str) -> list[BaseModel]:
    """Typed events written both ways, `OutboxEvent.of` and `enqueue`, in one transaction."""
    sent: list[BaseModel] = [
        OrderPlaced(order_id=1, lines=[Line(sku="a", quantity=2)]),
        OrderCancelled(order_id=1, reason="changed my mind"),
        OrderPlacedV1(order_id=2),
    ]
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    try:
        async with AsyncSession(engine) as session, session.begin():
            session.add(OutboxEvent.of(sent[0], key="order-1", topic=topic))
            await enqueue(session, sent[1], key="order-1", topic=topic)
            await enqueue(session, sent[2], key="order-2", topic=topic)
    finally:
        await engine.dispose()
    return sent


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.parametrize("mode", MODES)
async def test_typed_events_round_trip_through_kafka(
    database_url: str, kafka_bootstrap: str, topic: str, mode: EnvelopeMode
) -> None:
    sent = await write_typed(database_url, topic)
    publisher = KafkaPublisher(kafka_bootstrap, encoder=Encoder(mode))
    assert (await pg_relay(database_url, publisher).drain()).delivered == len(sent)
    received = await read_topic(kafka_bootstrap, topic, len(sent))
    assert sorted(map(repr, (REGISTRY.parse(e) for e in received))) == sorted(map(repr, sent))


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize("mode", MODES)
async def test_typed_events_round_trip_through_redis(
    database_url: str, redis_url: str, topic: str, mode: EnvelopeMode
) -> None:
    sent = await write_typed(database_url, topic)
    publisher = RedisPublisher(redis_url, encoder=Encoder(mode))
    assert (await pg_relay(database_url, publisher).drain()).delivered == len(sent)
    received = await read_stream(redis_url, topic, len(sent))
    assert [REGISTRY.parse(e) for e in received] == sent  # one stream: in commit order
    types = {e.event_type for e in received}
    assert types == {"OrderPlaced.v2", "OrderCancelled", "OrderPlaced.v1"}


# -- examples/typed_events.py, as docs/consumers.md shows it -----------------------------------


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.redis
async def test_the_typed_example_round_trips_through_kafka_and_redis(
    database_url: str, kafka_bootstrap: str, redis_url: str, topic: str
) -> None:
    example = load_example("typed_events")
    expected = [
        example.OrderPlaced(order_id=5, total_cents=4200),
        example.OrderCancelled(order_id=5, reason="test"),
    ]
    kafka_topic, stream = f"{topic}-k.orders", f"{topic}-r.orders"  # the example's "orders"
    for publisher in (
        KafkaPublisher(
            kafka_bootstrap,
            encoder=Encoder("cloudevents-structured"),
            topic_prefix=f"{topic}-k.",
        ),
        RedisPublisher(
            redis_url, encoder=Encoder("cloudevents-binary"), topic_prefix=f"{topic}-r."
        ),
    ):
        engine = create_async_engine(sqlalchemy_async_url(database_url))
        try:
            async with AsyncSession(engine) as session, session.begin():
                await example.place_and_cancel(session, 5)
        finally:
            await engine.dispose()
        assert (await pg_relay(database_url, publisher).drain()).delivered == 2
    records = await read_records(kafka_bootstrap, kafka_topic, 2)
    got = [example.from_record(r.topic, r.key, r.value, r.headers) for r in records]
    assert got == expected
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(stream)  # type: ignore[assignment]
    finally:
        await client.aclose()
    assert [example.from_entry(stream, fields) for _, fields in entries] == expected
