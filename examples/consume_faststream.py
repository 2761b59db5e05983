"""FastStream subscribers typed with the payload's model, for the `faststream` envelope.

The relay writes what FastStream's own publishers write, so the handler gets the payload as
its body, on Kafka and on Redis streams. `message.correlation_id` is the event's
`correlation_id` header, else the event id. `message.message_id` is the event id: on Kafka
with `faststream_parser` (FastStream's Kafka parser makes it "offset-timestamp").
"""

from collections.abc import Awaitable, Callable

from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisStreamMessage
from pydantic import BaseModel

from outbox.envelope import faststream_parser


class OrderPlaced(BaseModel):
    order_id: int
    total_cents: int


#: What the handlers do with an order: (order, event id, correlation id).
OnOrder = Callable[[OrderPlaced, str, str], Awaitable[None]]


def kafka_broker(bootstrap: str, topic: str, group: str, on_order: OnOrder) -> KafkaBroker:
    broker = KafkaBroker(bootstrap, parser=faststream_parser)

    @broker.subscriber(topic, group_id=group, auto_offset_reset="earliest")
    async def handle(body: OrderPlaced, message: KafkaMessage) -> None:
        await on_order(body, message.message_id, message.correlation_id)

    return broker


def redis_broker(url: str, stream: str, group: str, on_order: OnOrder) -> RedisBroker:
    broker = RedisBroker(url)

    @broker.subscriber(stream=StreamSub(stream, group=group, consumer="one", last_id="0"))
    async def handle(body: OrderPlaced, message: RedisStreamMessage) -> None:
        await on_order(body, message.message_id, message.correlation_id)

    return broker
