"""A FastStream subscriber that bills each order once, however often it is delivered.

The relay delivers at least once: after a crash between the broker's acknowledgement and the
delete, an event arrives again. `inbox.once` records the event id in `outbox_inbox` in the
transaction that writes the invoice, so a redelivered event finds its row and is skipped. The
relay publishes in the `faststream` envelope: `message.message_id` is the event id (on Kafka
with `faststream_parser`).

The billing database needs the outbox tables (`outbox-relay migrate`: `outbox_inbox` is one)
and its own `invoices` table.
"""

import uuid
from collections.abc import Awaitable, Callable

from faststream.kafka import KafkaBroker
from faststream.kafka.annotations import KafkaMessage
from faststream.redis import RedisBroker, StreamSub
from faststream.redis.annotations import RedisStreamMessage
from pydantic import BaseModel
from sqlalchemy import BigInteger, Identity, Uuid
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox import inbox
from outbox.envelope import faststream_parser


class BillingBase(DeclarativeBase):
    """The billing service's own tables."""


class Invoice(BillingBase):
    __tablename__ = "invoices"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    order_id: Mapped[int]
    total_cents: Mapped[int]
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid())


class OrderPlaced(BaseModel):
    order_id: int
    total_cents: int


Sessions = async_sessionmaker[AsyncSession]
#: Called after each delivery's transaction: (event id, whether it was billed now).
OnBilled = Callable[[str, bool], Awaitable[None]]


async def bill(sessions: Sessions, order: OrderPlaced, event_id: str) -> bool:
    """Write the order's invoice, unless this event was billed already. One transaction: the
    invoice and the inbox row commit together, or neither does."""
    async with sessions() as session, inbox.once(session, event_id, consumer="billing") as fresh:
        if fresh:
            session.add(
                Invoice(
                    order_id=order.order_id,
                    total_cents=order.total_cents,
                    event_id=uuid.UUID(event_id),
                )
            )
    return fresh


def kafka_broker(
    bootstrap: str, topic: str, group: str, sessions: Sessions, on_billed: OnBilled
) -> KafkaBroker:
    broker = KafkaBroker(bootstrap, parser=faststream_parser)

    @broker.subscriber(topic, group_id=group, auto_offset_reset="earliest")
    async def handle(body: OrderPlaced, message: KafkaMessage) -> None:
        await on_billed(message.message_id, await bill(sessions, body, message.message_id))

    return broker


def redis_broker(
    url: str, stream: str, group: str, sessions: Sessions, on_billed: OnBilled
) -> RedisBroker:
    broker = RedisBroker(url)

    @broker.subscriber(stream=StreamSub(stream, group=group, consumer="one", last_id="0"))
    async def handle(body: OrderPlaced, message: RedisStreamMessage) -> None:
        await on_billed(message.message_id, await bill(sessions, body, message.message_id))

    return broker
