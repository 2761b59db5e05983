"""Postgres computes `outbox_events.bucket`, so every writer, in any language, spreads keys alike.

Until now the writer computed the bucket (`crc32(key or id) % 64` in Python) and a raw-SQL
INSERT that left it out got bucket 0: all its events went to one relay, and a key written both
ways sat in two buckets, with two owners. Now the BEFORE trigger `outbox_events_bucket` sets
`bucket = hashtext(coalesce(key, id::text)) & 63` on every row inserted, and again when an
UPDATE sets `key`, `id` or `bucket`. A value the writer sends is overwritten, not refused.

A trigger rather than a generated column (`GENERATED ALWAYS AS (...) STORED`), because a
generated column rejects every INSERT that names `bucket`: writers still on an older version
of this package, or services that computed the bucket as the docs used to say, would fail
their business transactions from the moment this migration commits until they are
redeployed. The trigger accepts them and fixes their value. It costs about 1-2 us of server
CPU per row (a generated column about 0.5 us); a one-row write transaction takes about 200 us
or more, and measured no slower. `ENABLE ALWAYS`: it also fires for logical replication and
under `session_replication_role = replica`. The column and its CHECK constraint are unchanged.

Upgrade: creates the trigger, then recomputes the bucket of the rows already there, in one
transaction. CREATE TRIGGER takes a SHARE ROW EXCLUSIVE lock on outbox_events: writers'
INSERTs and the relays' deletes wait until the migration commits (reads go on). The UPDATE
writes a new version of about 63 rows in 64 (7 s per million rows on a 2-core test machine;
the outbox table is normally small). Relays still running meanwhile see their events change
buckets, as after a lease handover: events in flight may be published twice.

Downgrade: drops the trigger and puts back the buckets the Python writers of 0003 compute,
crc32 of the UTF-8 key (or id) modulo 64, with a temporary PL/pgSQL crc32 (15 s per million
rows of short keys).

SQLite (one relay, which owns every bucket) has no hashtext() and its triggers cannot change
NEW: AFTER triggers set the bucket to a cheap hash of the same text (first and last character,
length), so every event of one key shares one bucket there too, whoever writes it.

Revision ID: 0004
Revises: 0003
Create Date: 2026-12-02
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0004"
down_revision: str | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

BUCKET = "hashtext(coalesce(key, id::text)) & 63"  # frozen here: 64 buckets


def sqlite_bucket(row: str) -> str:
    """SQLite's bucket of `row`'s key (or id): any hash does, as long as it is a function of
    that text alone; never NULL, since a key or an id is never empty."""
    text = f"coalesce({row}key, {row}id)"
    return f"((unicode({text}) + 7 * unicode(substr({text}, -1)) + 31 * length({text})) % 64)"


SQLITE_TRIGGERS = (
    f"""
    CREATE TRIGGER outbox_events_bucket AFTER INSERT ON outbox_events
    BEGIN
        UPDATE outbox_events SET bucket = {sqlite_bucket("NEW.")}
        WHERE seq = NEW.seq AND bucket <> {sqlite_bucket("NEW.")};
    END
    """,
    f"""
    CREATE TRIGGER outbox_events_bucket_update AFTER UPDATE OF key, id, bucket ON outbox_events
    BEGIN
        UPDATE outbox_events SET bucket = {sqlite_bucket("NEW.")}
        WHERE seq = NEW.seq AND bucket <> {sqlite_bucket("NEW.")};
    END
    """,
)


def upgrade() -> None:
    if op.get_context().dialect.name == "sqlite":
        for statement in SQLITE_TRIGGERS:
            op.execute(statement)
        op.execute(f"UPDATE outbox_events SET bucket = {sqlite_bucket('')}")
        return
    op.execute(
        """
        CREATE FUNCTION outbox_bucket() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            NEW.bucket := hashtext(coalesce(NEW.key, NEW.id::text)) & 63;
            RETURN NEW;
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER outbox_events_bucket BEFORE INSERT OR UPDATE OF key, id, bucket "
        "ON outbox_events FOR EACH ROW EXECUTE FUNCTION outbox_bucket()"
    )
    op.execute("ALTER TABLE outbox_events ENABLE ALWAYS TRIGGER outbox_events_bucket")
    # After CREATE TRIGGER: its lock lets no writer commit an old-style row past this UPDATE.
    op.execute(f"UPDATE outbox_events SET bucket = {BUCKET} WHERE bucket <> ({BUCKET})")


def downgrade() -> None:
    if op.get_context().dialect.name == "sqlite":  # the buckets stay: one relay owns them all
        op.execute("DROP TRIGGER outbox_events_bucket_update")
        op.execute("DROP TRIGGER outbox_events_bucket")
        return
    op.execute("DROP TRIGGER outbox_events_bucket ON outbox_events")
    op.execute("DROP FUNCTION outbox_bucket()")
    op.execute(
        """
        CREATE FUNCTION pg_temp.outbox_crc32(value text) RETURNS bigint LANGUAGE plpgsql AS $$
        DECLARE
            bytes bytea := convert_to(value, 'UTF8');
            crc bigint := 4294967295;
        BEGIN
            FOR i IN 0 .. length(bytes) - 1 LOOP
                crc := crc # get_byte(bytes, i);
                FOR j IN 1 .. 8 LOOP
                    crc := (crc >> 1) # (CASE WHEN crc & 1 = 1 THEN 3988292384 ELSE 0 END);
                END LOOP;
            END LOOP;
            RETURN crc # 4294967295;
        END
        $$
        """
    )
    op.execute(
        "UPDATE outbox_events SET bucket = pg_temp.outbox_crc32(coalesce(key, id::text)) & 63"
    )
    op.execute("DROP FUNCTION pg_temp.outbox_crc32(text)")
