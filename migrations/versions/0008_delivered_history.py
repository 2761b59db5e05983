"""Delivered history (opt-in, `history = on`): the relay moves each delivered event into
`outbox_delivered` in the statement that deletes it, with when, by which relay, after how
many attempts, and where the broker stored it (Kafka partition and offset, Redis entry id).

Indexes: the primary key (the relay prunes old rows walking it, oldest first), the key (`was
order 42's event published?`), and a BRIN index of delivered_at for time ranges: rows arrive in
delivered_at order, so it is a few pages and costs the insert nearly nothing. Every btree index
costs the relay's settle statement about 2 us of Postgres time per event (measured), so the
event id, the topic and the event type have none: filter them with a time range.

Revision ID: 0008
Revises: 0007
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects.postgresql import JSONB

revision: str = "0008"
down_revision: str | None = "0007"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    postgres = op.get_bind().dialect.name == "postgresql"
    json = JSONB() if postgres else sa.JSON()
    op.create_table(
        "outbox_delivered",
        sa.Column(
            "delivered_id",
            sa.BigInteger().with_variant(sa.Integer(), "sqlite"),
            sa.Identity(),
            nullable=False,
        ),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("seq", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("event_type", sa.Text(), nullable=True),
        sa.Column("payload", json, nullable=False),
        sa.Column("headers", json, nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column(
            "delivered_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.Column("relay_id", sa.Text(), nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("broker_partition", sa.Integer(), nullable=True),
        sa.Column("broker_offset", sa.BigInteger(), nullable=True),
        sa.Column("broker_entry_id", sa.Text(), nullable=True),
        sa.CheckConstraint("attempts >= 1", name=op.f("ck_outbox_delivered_attempts_positive")),
        sa.PrimaryKeyConstraint("delivered_id", name=op.f("pk_outbox_delivered")),
    )
    op.create_index("ix_outbox_delivered_key", "outbox_delivered", ["key"])
    op.create_index(
        "ix_outbox_delivered_delivered_at",
        "outbox_delivered",
        ["delivered_at"],
        postgresql_using="brin",
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_delivered_delivered_at", table_name="outbox_delivered")
    op.drop_index("ix_outbox_delivered_key", table_name="outbox_delivered")
    op.drop_table("outbox_delivered")
