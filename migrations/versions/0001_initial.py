"""Outbox tables, dead letters, bucket leases, relays, the NOTIFY trigger.

Every migration runs on PostgreSQL and on SQLite (the embedded mode: one relay, one file).
Where a feature is PostgreSQL's own (JSONB, reloptions, PL/pgSQL, NOTIFY), SQLite gets its
equivalent or nothing: JSON text checked with json_type(), no NOTIFY (its relay polls).

Revision ID: 0001
Revises:
Create Date: 2026-11-25
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001"
down_revision: str | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKETS = 64  # frozen here on purpose: a migration never follows later code changes
TZ = sa.DateTime(timezone=True)
JSON = sa.JSON().with_variant(postgresql.JSONB(), "postgresql")
#: SQLite numbers rows only through an INTEGER PRIMARY KEY (the rowid).
SEQ = sa.BigInteger().with_variant(sa.Integer(), "sqlite")

# Delete-heavy queue table: vacuum early and often, never throttled, so dead tuples stay few.
QUEUE_STORAGE = (
    "autovacuum_vacuum_scale_factor = 0.0, autovacuum_vacuum_threshold = 5000, "
    "autovacuum_vacuum_insert_scale_factor = 0.0, autovacuum_vacuum_insert_threshold = 50000, "
    "autovacuum_analyze_scale_factor = 0.02, autovacuum_vacuum_cost_delay = 0, fillfactor = 90"
)


def is_sqlite() -> bool:
    return op.get_context().dialect.name == "sqlite"


def upgrade() -> None:
    sqlite = is_sqlite()
    op.create_table(
        "outbox_events",
        sa.Column("seq", SEQ, sa.Identity(), nullable=False),
        sa.Column("id", sa.Uuid(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("bucket", sa.SmallInteger(), server_default="0", nullable=False),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("headers", JSON, server_default="{}", nullable=False),
        sa.Column("event_type", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("available_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("attempts", sa.Integer(), server_default="0", nullable=False),
        sa.Column("first_failed_at", TZ, nullable=True),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.PrimaryKeyConstraint("seq", name="pk_outbox_events"),
        sa.CheckConstraint("attempts >= 0", name=op.f("ck_outbox_events_attempts_not_negative")),
        sa.CheckConstraint(
            "length(topic) BETWEEN 1 AND 249", name=op.f("ck_outbox_events_topic_length")
        ),
        sa.CheckConstraint(
            "key IS NULL OR length(key) BETWEEN 1 AND 1024",
            name=op.f("ck_outbox_events_key_length"),
        ),
        sa.CheckConstraint(
            f"bucket >= 0 AND bucket < {BUCKETS}", name=op.f("ck_outbox_events_bucket_range")
        ),
        sa.CheckConstraint(
            f"{'json_type' if sqlite else 'jsonb_typeof'}(headers) = 'object'",
            name=op.f("ck_outbox_events_headers_object"),
        ),
        # SQLite keeps JSON as text: refuse what jsonb would refuse.
        *(
            [sa.CheckConstraint("json_valid(payload)", name=op.f("ck_outbox_events_payload_json"))]
            if sqlite
            else []
        ),
        # SQLite: never reuse a seq after the table empties (consumers may order by it).
        sqlite_autoincrement=True,
    )
    # Only rows that wait (delayed, or retrying) are indexed: a plain insert pays for no index
    # but the primary key. The claim finds waiting keys through it.
    op.create_index(
        "ix_outbox_events_waiting",
        "outbox_events",
        ["available_at"],
        postgresql_where=sa.text("available_at > created_at"),
        sqlite_where=sa.text("available_at > created_at"),
    )
    if not sqlite:
        op.execute(f"ALTER TABLE outbox_events SET ({QUEUE_STORAGE})")

    op.create_table(
        "outbox_dead_letters",
        sa.Column("dead_letter_id", SEQ, sa.Identity(), nullable=False),
        sa.Column("event_id", sa.Uuid(), nullable=False),
        sa.Column("original_seq", sa.BigInteger(), nullable=False),
        sa.Column("topic", sa.Text(), nullable=False),
        sa.Column("key", sa.Text(), nullable=True),
        sa.Column("payload", JSON, nullable=False),
        sa.Column("headers", JSON, nullable=False),
        sa.Column("event_type", sa.Text(), nullable=True),
        sa.Column("created_at", TZ, nullable=False),
        sa.Column("attempts", sa.Integer(), nullable=False),
        sa.Column("first_failed_at", TZ, nullable=False),
        sa.Column("last_failed_at", TZ, nullable=False),
        sa.Column("error_class", sa.Text(), nullable=False),
        sa.Column("error_message", sa.Text(), nullable=False),
        sa.Column("relay_id", sa.Text(), nullable=False),
        sa.PrimaryKeyConstraint("dead_letter_id", name="pk_outbox_dead_letters"),
        sa.UniqueConstraint("event_id", name="uq_outbox_dead_letters_event_id"),
        sa.CheckConstraint(
            "attempts >= 0", name=op.f("ck_outbox_dead_letters_attempts_not_negative")
        ),
        sa.CheckConstraint(
            "first_failed_at <= last_failed_at",
            name=op.f("ck_outbox_dead_letters_failure_times_ordered"),
        ),
    )
    op.create_index(
        "ix_outbox_dead_letters_topic_last_failed_at",
        "outbox_dead_letters",
        ["topic", "last_failed_at"],
    )
    op.create_index("ix_outbox_dead_letters_key", "outbox_dead_letters", ["key"])
    op.create_index(
        "ix_outbox_dead_letters_last_failed_at", "outbox_dead_letters", ["last_failed_at"]
    )

    op.create_table(
        "outbox_bucket_leases",
        sa.Column("bucket", sa.SmallInteger(), autoincrement=False, nullable=False),
        sa.Column("owner", sa.Text(), nullable=True),
        sa.Column("lease_until", TZ, nullable=True),
        sa.PrimaryKeyConstraint("bucket", name="pk_outbox_bucket_leases"),
        sa.CheckConstraint(
            f"bucket >= 0 AND bucket < {BUCKETS}", name=op.f("ck_outbox_bucket_leases_bucket_range")
        ),
        sa.CheckConstraint(
            "(owner IS NULL) = (lease_until IS NULL)",
            name=op.f("ck_outbox_bucket_leases_owner_has_lease"),
        ),
    )
    op.execute(
        "WITH RECURSIVE b(n) AS (SELECT 0 UNION ALL SELECT n + 1 FROM b WHERE n < "
        f"{BUCKETS - 1}) INSERT INTO outbox_bucket_leases (bucket) SELECT n FROM b"
        if sqlite
        else f"INSERT INTO outbox_bucket_leases (bucket) SELECT generate_series(0, {BUCKETS - 1})"
    )

    op.create_table(
        "outbox_relays",
        sa.Column("relay_id", sa.Text(), nullable=False),
        sa.Column("hostname", sa.Text(), nullable=False),
        sa.Column("pid", sa.Integer(), nullable=False),
        sa.Column("started_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.Column("heartbeat_at", TZ, server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("relay_id", name="pk_outbox_relays"),
    )

    if sqlite:
        return
    # One NOTIFY per statement with a constant payload; Postgres folds identical notifications
    # of one transaction into one, so a transaction wakes the relays at most once.
    op.execute(
        """
        CREATE FUNCTION outbox_notify() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            PERFORM pg_notify('outbox_events', '');
            RETURN NULL;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER outbox_events_notify AFTER INSERT ON outbox_events "
        "FOR EACH STATEMENT EXECUTE FUNCTION outbox_notify()"
    )


def downgrade() -> None:
    if not is_sqlite():
        op.execute("DROP TRIGGER IF EXISTS outbox_events_notify ON outbox_events")
        op.execute("DROP FUNCTION IF EXISTS outbox_notify()")
    op.drop_table("outbox_relays")
    op.drop_table("outbox_bucket_leases")
    op.drop_index("ix_outbox_dead_letters_last_failed_at", table_name="outbox_dead_letters")
    op.drop_index("ix_outbox_dead_letters_key", table_name="outbox_dead_letters")
    op.drop_index("ix_outbox_dead_letters_topic_last_failed_at", table_name="outbox_dead_letters")
    op.drop_table("outbox_dead_letters")
    op.drop_index("ix_outbox_events_waiting", table_name="outbox_events")
    op.drop_table("outbox_events")
