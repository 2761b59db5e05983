"""The NOTIFY trigger honours the `outbox.notify` setting.

A transaction that NOTIFYs holds a cluster-wide lock from its pre-commit until its commit record
is flushed, so such commits queue one behind another instead of sharing an fsync. Writers that
commit many outbox transactions per second can turn the notification off, for a database, a
role, a session or one transaction (`SET LOCAL outbox.notify = off`), and let the relay poll.

Revision ID: 0002
Revises: 0001
Create Date: 2026-11-25
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        return  # no NOTIFY on SQLite: its relay polls
    op.execute(
        """
        CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF lower(coalesce(current_setting('outbox.notify', true), ''))
                    NOT IN ('off', 'false', 'no', '0') THEN
                PERFORM pg_notify('outbox_events', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        return
    op.execute(
        """
        CREATE OR REPLACE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('outbox_events', '');
            RETURN NULL;
        END
        $$
        """
    )
