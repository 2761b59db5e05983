"""A FastAPI app that writes orders and their events in one transaction, relay embedded.

    outbox-relay migrate                      # the outbox tables (OUTBOX_DATABASE_URL)
    OUTBOX_BROKER=redis uvicorn --factory examples.fastapi_app:create_app
    curl -X POST localhost:8000/orders -H 'content-type: application/json' \\
         -d '{"customer": "ada", "total_cents": 4200}'
    curl localhost:8000/outbox/health/ready   # and /outbox/health/live, /outbox/metrics

`POST /orders` inserts the order and adds an `OutboxEvent` in the same `AsyncSession`
transaction: both commit or neither does. The relay runs in the app's lifespan and publishes the
event to the "orders" topic (Kafka) or stream (Redis) once the transaction has committed. The
event carries the request's correlation id (`X-Correlation-ID`, echoed in the response).
"""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime

from fastapi import FastAPI
from pydantic import BaseModel, Field
from sqlalchemy import BigInteger, DateTime, Identity, Text, func
from sqlalchemy.ext.asyncio import async_sessionmaker
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox import CorrelationIdMiddleware, Event, OutboxEvent
from outbox.relay.fastapi import outbox_lifespan, outbox_router
from outbox.relay.relay import Relay
from outbox.relay.settings import RelaySettings
from outbox.urls import async_engine


class ShopBase(DeclarativeBase):
    """The application's own declarative base; the outbox tables have theirs."""


class Order(ShopBase):
    __tablename__ = "orders"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    customer: Mapped[str] = mapped_column(Text)
    total_cents: Mapped[int]
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())


class OrderPlaced(Event, topic="orders"):
    """The event: its topic and type ("OrderPlaced") travel with the class."""

    order_id: int
    customer: str
    total_cents: int


class OrderIn(BaseModel):
    customer: str = Field(min_length=1, max_length=200)
    total_cents: int = Field(gt=0)


class OrderOut(BaseModel):
    id: int
    customer: str
    total_cents: int
    event_id: uuid.UUID


class RelayStatus(BaseModel):
    relay_id: str
    owned_buckets: int
    delivered: int
    retried: int
    dead_lettered: int
    broker_failures: int


def create_app(settings: RelaySettings | None = None) -> FastAPI:
    """The app; `settings` default to the OUTBOX_* environment variables."""
    settings = settings or RelaySettings()
    engine = async_engine(settings.database_url)  # TLS parameters of the URL work too
    sessions = async_sessionmaker(engine, expire_on_commit=False)
    relay_lifespan = outbox_lifespan(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # The example creates its own table; a real app has its own migrations. The outbox
        # tables come from `outbox-relay migrate`.
        async with engine.begin() as conn:
            await conn.run_sync(ShopBase.metadata.create_all)
        try:
            async with relay_lifespan(app):  # also sets app.state.outbox_relay
                yield
        finally:
            await engine.dispose()

    app = FastAPI(title="orders (outbox example)", lifespan=lifespan)
    # Each request's X-Correlation-ID (else a new one) goes into its events' headers.
    app.add_middleware(CorrelationIdMiddleware)
    # GET /outbox/health/live, /outbox/health/ready and /outbox/metrics (Prometheus).
    app.include_router(outbox_router(relay_lifespan))

    @app.post("/orders", status_code=201)
    async def place_order(body: OrderIn) -> OrderOut:
        async with sessions.begin() as session:  # one transaction: commit on exit
            order = Order(customer=body.customer, total_cents=body.total_cents)
            session.add(order)
            await session.flush()  # assigns order.id
            placed = OrderPlaced(
                order_id=order.id, customer=order.customer, total_cents=order.total_cents
            )
            event = OutboxEvent.of(placed, key=f"order-{order.id}")
            session.add(event)
        return OrderOut(
            id=order.id, customer=order.customer, total_cents=order.total_cents, event_id=event.id
        )

    @app.get("/outbox/relay")
    async def relay_status() -> RelayStatus:
        relay: Relay = app.state.outbox_relay
        s = relay.stats
        return RelayStatus(
            relay_id=relay.relay_id,
            owned_buckets=s.owned_buckets,
            delivered=s.delivered,
            retried=s.retried,
            dead_lettered=s.dead_lettered,
            broker_failures=s.broker_failures,
        )

    return app
