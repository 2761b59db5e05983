"""`ix_outbox_events_waiting_at`: the waiting rows by the time they become due.

The claim first asks "is any row waiting that is not due yet?" (only then does it check each
event's key for an earlier waiting event). Answered from `ix_outbox_events_waiting_key`
(key, seq, available_at), that question read every waiting row that was already due: a
republished history, replayed dead letters, retries that came due. Over 200,000 of them a
claim took 4.9 ms instead of 0.6, and a drain of such a backlog ran at 70k ev/s against 124k
for new events. This index answers it in one probe from now(). A plain insert pays nothing for
it (not a waiting row: not in the index), as for the other two partial indexes.

Its predicate also says `attempts >= 0`, which always holds (a CHECK constraint): only a query
that says so too can use it. The claim's per-key probe ("an earlier waiting event of this
key?") must stay on `ix_outbox_events_waiting_key`; on this index it would read every waiting
row per event, and the planner took this one when both were empty.

Revision ID: 0009
Revises: 0008
Create Date: 2026-11-30
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009"
down_revision: str | None = "0008"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_outbox_events_waiting_at",
        "outbox_events",
        ["available_at"],
        postgresql_where=sa.text("available_at > created_at AND attempts >= 0"),
        sqlite_where=sa.text("available_at > created_at AND attempts >= 0"),
    )


def downgrade() -> None:
    op.drop_index("ix_outbox_events_waiting_at", table_name="outbox_events")
