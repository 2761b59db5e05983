"""The README's Python snippets ("In your application"), run as written on the test database,
with `Order` standing for the reader's own model as the README says."""

from __future__ import annotations

import re
import textwrap
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from sqlalchemy import create_engine
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

pytestmark = pytest.mark.postgres

ROOT = Path(__file__).resolve().parent.parent
README_URL = "outbox:outbox-dev@127.0.0.1:5432/outbox"


class AppBase(DeclarativeBase):
    pass


class Order(AppBase):  # the reader's own model
    __tablename__ = "readme_orders"
    id: Mapped[int] = mapped_column(primary_key=True)
    customer: Mapped[str]
    total_cents: Mapped[int]


def snippets() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    section = readme.split("## In your application", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```python\n(.*?)```", section, re.S)


async def test_the_readme_snippets_commit_their_events(
    database_url: str, pg: asyncpg.Connection
) -> None:
    place_order, sync_session, fast_path = snippets()  # a new snippet needs a line here
    credentials = database_url.split("://", 1)[1]
    AppBase.metadata.create_all(create_engine(f"postgresql+psycopg://{credentials}"))

    names: dict[str, Any] = {"Order": Order}
    exec(place_order.replace(README_URL, credentials), names)  # noqa: S102 - the README's code
    await names["place_order"]("ada", 4200)

    exec(sync_session.replace(README_URL, credentials), {"Order": Order})  # noqa: S102

    body = textwrap.indent(fast_path, "    ")
    exec(f"async def fast_path(customer, total_cents):\n{body}", names)  # noqa: S102
    await names["fast_path"]("grace", 1200)
    await names["engine"].dispose()

    rows = await pg.fetch(
        "SELECT e.key, o.customer FROM outbox_events e"
        " JOIN readme_orders o ON e.key = 'order-' || o.id ORDER BY e.seq"
    )
    assert [tuple(r) for r in rows] == [
        ("order-1", "ada"),
        ("order-2", "ada"),
        ("order-3", "grace"),
    ]
