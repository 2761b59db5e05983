"""Key quarantine in the dead letters, and the claim's per-key index of waiting events.

- `outbox_dead_letters.holds_key`: the dead letter quarantines its key (later events of the key
  are parked behind it); `held_behind`: the poison event a parked event waits behind.
- `ix_outbox_dead_letters_quarantine`: the claim's "is this key held?" probe, over the held
  rows only.
- `outbox_dead_letters.event_id` is no longer unique (an index instead).
- `ix_outbox_events_waiting_key` replaces `ix_outbox_events_waiting`: the claim's "has this key
  an earlier waiting event?" probe, over waiting rows only (a plain insert pays nothing for
  it). With a single partial index over waiting rows the planner cannot pick the
  `available_at` one for the per-key probe (it did, with a few hundred waiting rows, and each
  probe then walked all of them), so the claim's cost no longer grows with waiting rows.

Revision ID: 0003
Revises: 0002
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    # Batch mode: SQLite cannot drop a constraint or add a CHECK in place, so it copies the
    # table; PostgreSQL runs the same operations as plain ALTER TABLE statements.
    with op.batch_alter_table("outbox_dead_letters") as batch:
        # Two events written with one id (nothing forbids it in outbox_events) could not both
        # be dead-lettered: the second move failed on this key and crash-looped the relay.
        batch.drop_constraint("uq_outbox_dead_letters_event_id", type_="unique")
        batch.add_column(
            sa.Column("holds_key", sa.Boolean(), server_default=sa.false(), nullable=False)
        )
        batch.add_column(sa.Column("held_behind", sa.Uuid(), nullable=True))
        batch.create_check_constraint(
            op.f("ck_outbox_dead_letters_only_keys_are_held"), "key IS NOT NULL OR NOT holds_key"
        )
    op.create_index("ix_outbox_dead_letters_event_id", "outbox_dead_letters", ["event_id"])
    op.create_index(
        "ix_outbox_dead_letters_quarantine",
        "outbox_dead_letters",
        ["key", "original_seq"],
        postgresql_where=sa.text("holds_key"),
        sqlite_where=sa.text("holds_key"),
    )
    op.create_index(
        "ix_outbox_events_waiting_key",
        "outbox_events",
        ["key", "seq", "available_at"],
        postgresql_where=sa.text("available_at > created_at"),
        sqlite_where=sa.text("available_at > created_at"),
    )
    op.drop_index("ix_outbox_events_waiting", table_name="outbox_events")


def downgrade() -> None:
    op.create_index(
        "ix_outbox_events_waiting",
        "outbox_events",
        ["available_at"],
        postgresql_where=sa.text("available_at > created_at"),
        sqlite_where=sa.text("available_at > created_at"),
    )
    op.drop_index("ix_outbox_events_waiting_key", table_name="outbox_events")
    op.drop_index("ix_outbox_dead_letters_quarantine", table_name="outbox_dead_letters")
    op.drop_index("ix_outbox_dead_letters_event_id", table_name="outbox_dead_letters")
    with op.batch_alter_table("outbox_dead_letters") as batch:
        batch.drop_constraint(op.f("ck_outbox_dead_letters_only_keys_are_held"), type_="check")
        batch.drop_column("held_behind")
        batch.drop_column("holds_key")
        batch.create_unique_constraint("uq_outbox_dead_letters_event_id", ["event_id"])
