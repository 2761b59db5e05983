"""Commit one order and its OrderPlaced event in one transaction (the README's tour).

python examples/write_one.py      # uses OUTBOX_DATABASE_URL, after `outbox-relay migrate`
"""

import asyncio
import os

from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

from outbox import OutboxEvent
from outbox.urls import async_engine


class Base(DeclarativeBase):
    pass


class Order(Base):  # stands for one of your own models
    __tablename__ = "tour_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]


async def main() -> None:
    engine = async_engine(os.environ["OUTBOX_DATABASE_URL"])
    async with engine.begin() as conn:  # the example's own table, if it is missing
        await conn.run_sync(Base.metadata.create_all)
    async with AsyncSession(engine, expire_on_commit=False) as session, session.begin():
        order = Order(customer="ada")  # the business row ...
        session.add(order)
        await session.flush()  # assigns order.id
        session.add(  # ... and its event: both commit, or neither
            OutboxEvent(
                topic="orders",
                key=f"order-{order.id}",
                event_type="OrderPlaced",
                payload={"order_id": order.id, "customer": order.customer},
            )
        )
    print(f"committed order {order.id} and its OrderPlaced event")
    await engine.dispose()


if __name__ == "__main__":
    asyncio.run(main())
