"""The inbox: the events each consumer has processed (`outbox.inbox.once`).

A consumer adds `(consumer, event_id)` in the transaction of its own changes, with
`INSERT ... ON CONFLICT DO NOTHING`: a redelivered event finds its row and is skipped, exactly
when the changes of its first delivery are committed. `processed_at` is for retention
(`outbox.inbox.prune`).

Revision ID: 0007
Revises: 0006
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0007"
down_revision: str | None = "0006"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "outbox_inbox",
        sa.Column("consumer", sa.Text(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column(
            "processed_at",
            sa.DateTime(timezone=True),
            server_default=sa.func.now(),
            nullable=False,
        ),
        sa.CheckConstraint(
            "length(consumer) BETWEEN 1 AND 255", name=op.f("ck_outbox_inbox_consumer_length")
        ),
        sa.PrimaryKeyConstraint("consumer", "event_id", name=op.f("pk_outbox_inbox")),
    )
    op.create_index("ix_outbox_inbox_processed_at", "outbox_inbox", ["processed_at"])


def downgrade() -> None:
    op.drop_index("ix_outbox_inbox_processed_at", table_name="outbox_inbox")
    op.drop_table("outbox_inbox")
