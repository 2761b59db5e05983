"""What the claim needs to start past the rows it has already deleted.

An open transaction anywhere in the database (a report, a session idle in transaction) keeps
Postgres from cleaning up the rows the relays delete, and a claim that starts at the head of
the primary key walks all of them: the drain slowed down as 1/N. The relay now gives the claim
a floor, a seq below which nothing is left to claim. Two things make the floor safe:

- `outbox_last_seq()`: the last seq handed out. With the writers seen in pg_locks it tells
  which seqs can no longer appear (relay/stores/postgres.py, `Horizon`). SECURITY DEFINER, so
  that a relay role needs no privilege on the sequence.
- `ix_outbox_events_waiting_seq`: the lowest seq of the waiting rows (retries, delayed events,
  replayed dead letters), in one probe, so that the claim lowers its floor below them.

Revision ID: 0006
Revises: 0005
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0006"
down_revision: str | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# NULL when the sequence caches values (CACHE > 1): a session may then hand out a lower seq
# long after a higher one, and the relay runs without a floor.
LAST_SEQ_FUNCTION = """
CREATE OR REPLACE FUNCTION outbox_last_seq() RETURNS bigint
LANGUAGE sql STABLE SECURITY DEFINER SET search_path FROM CURRENT AS $$
    SELECT CASE WHEN s.seqcache > 1 THEN NULL
                ELSE coalesce(pg_sequence_last_value(s.seqrelid), 0) END
    FROM pg_sequence AS s
    WHERE s.seqrelid = pg_get_serial_sequence('outbox_events', 'seq')::regclass
$$
"""


def upgrade() -> None:
    sqlite = op.get_context().dialect.name == "sqlite"
    if not sqlite:  # SQLite has one relay and no floor; the index is the same on both
        op.execute(LAST_SEQ_FUNCTION)
    op.create_index(
        "ix_outbox_events_waiting_seq",
        "outbox_events",
        ["seq"],
        postgresql_where=sa.text("available_at > created_at"),
        sqlite_where=sa.text("available_at > created_at"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_events_waiting_seq", table_name="outbox_events")
    if op.get_context().dialect.name != "sqlite":
        op.execute("DROP FUNCTION IF EXISTS outbox_last_seq()")
