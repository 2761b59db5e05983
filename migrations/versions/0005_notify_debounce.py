"""The NOTIFY trigger notifies for at most two transactions at a time.

A transaction that NOTIFYs takes a cluster-wide lock at pre-commit and holds it until its commit
record is flushed, so notifying commits queue one behind another instead of sharing an fsync:
with 64 writers that cost a third of the write throughput. Now a transaction notifies only if it
gets one of two transaction-scoped advisory locks; while two notifying transactions are in
flight, the others skip the NOTIFY. Their events are not lost: a relay that a NOTIFY woke keeps
claiming quickly (10 ms, doubling) until a claim comes back empty, so it finds the events of
the transactions that committed beside the notifying one; and a relay polls anyway. Two slots,
not one, so that one long transaction holding a slot does not silence every other writer.

The advisory lock keys are 0x6F7574626F780001 and ...0002 ("outbox" + 1, 2), taken with
pg_try_advisory_xact_lock(bigint); an application that uses advisory locks should avoid them.
`outbox.notify = off` still turns the NOTIFY off altogether.

Revision ID: 0005
Revises: 0004
Create Date: 2026-11-30
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0005"
down_revision: str | None = "0004"
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
                    NOT IN ('off', 'false', 'no', '0')
               AND (pg_try_advisory_xact_lock(x'6F7574626F780001'::bigint)
                    OR pg_try_advisory_xact_lock(x'6F7574626F780002'::bigint)) THEN
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
            IF lower(coalesce(current_setting('outbox.notify', true), ''))
                    NOT IN ('off', 'false', 'no', '0') THEN
                PERFORM pg_notify('outbox_events', '');
            END IF;
            RETURN NULL;
        END
        $$
        """
    )
