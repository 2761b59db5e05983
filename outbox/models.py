"""The outbox tables as SQLAlchemy 2 mapped classes.

`OutboxEvent` is what applications add to their own session. The classes use a declarative base
of this package, so they work in any `Session`/`AsyncSession` whatever the application's own base
is. The Alembic migrations in `migrations/` create the tables, on PostgreSQL and on SQLite
(`outbox-relay migrate`); these classes declare exactly what they create, CHECK constraints
included (tests/test_schema.py compares both dialects). The triggers live in the migrations.
"""

from __future__ import annotations

import uuid
from datetime import UTC, datetime
from typing import Any, cast

from pydantic import BaseModel
from sqlalchemy import (
    JSON,
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    FetchedValue,
    Identity,
    Index,
    Integer,
    MetaData,
    SmallInteger,
    Text,
    TypeDecorator,
    Uuid,
    column,
    event,
    false,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.compiler import compiles
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates
from sqlalchemy.sql.compiler import SQLCompiler
from sqlalchemy.sql.functions import GenericFunction

from outbox import validation
from outbox.context import with_context
from outbox.events import describe
from outbox.ids import uuid7

JsonColumn = JSON().with_variant(JSONB(), "postgresql")
SeqColumn = BigInteger().with_variant(Integer(), "sqlite")


class json_kind(GenericFunction[str]):  # noqa: N801 - a SQL function's name
    """The JSON type of a value ('object', 'array', ...): `jsonb_typeof` on PostgreSQL,
    `json_type` on SQLite (as migration 0001 writes the `headers` CHECK on each)."""

    type = Text()
    inherit_cache = True


@compiles(json_kind, "postgresql")
def _jsonb_typeof(element: json_kind, compiler: SQLCompiler, **kw: Any) -> str:
    return f"jsonb_typeof({compiler.process(element.clauses, **kw)})"


@compiles(json_kind, "sqlite")
def _json_type(element: json_kind, compiler: SQLCompiler, **kw: Any) -> str:
    return f"json_type({compiler.process(element.clauses, **kw)})"


class UtcDateTime(TypeDecorator[datetime]):
    """`DateTime(timezone=True)` that means UTC on every backend.

    SQLite has no time zone type and SQLAlchemy's SQLite DateTime silently drops `tzinfo`, so
    aware values are converted to UTC before they are written (stored there as naive UTC text,
    like CURRENT_TIMESTAMP), and naive values read back are UTC-aware again. Postgres keeps
    `timestamptz`; the DDL is unchanged.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None or value.tzinfo is None:
            return value
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is not None and value.tzinfo is None:
            return value.replace(tzinfo=UTC)
        return value


NAMING_CONVENTION = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "pk": "pk_%(table_name)s",
}


class OutboxBase(DeclarativeBase):
    """Declarative base of the outbox tables, separate from the application's own base."""

    metadata = MetaData(naming_convention=NAMING_CONVENTION)


class OutboxEvent(OutboxBase):
    """A pending event. Add it to the session of the business transaction that causes it.

    >>> session.add(OutboxEvent(topic="orders", key="order-42", payload={"total": 10}))
    """

    __tablename__ = "outbox_events"
    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint(
            f"length(topic) BETWEEN 1 AND {validation.MAX_TOPIC_LENGTH}", name="topic_length"
        ),
        CheckConstraint(
            f"key IS NULL OR length(key) BETWEEN 1 AND {validation.MAX_KEY_LENGTH}",
            name="key_length",
        ),
        CheckConstraint(f"bucket >= 0 AND bucket < {validation.BUCKETS}", name="bucket_range"),
        CheckConstraint(json_kind(column("headers")) == "object", name="headers_object"),
        # SQLite only: JSON is text there (Postgres's jsonb refuses what is not JSON itself).
        CheckConstraint("json_valid(payload)", name="payload_json").ddl_if(dialect="sqlite"),
        # Only waiting rows (delayed or retrying) are indexed, so a plain insert pays nothing
        # for it. The claim's per-key check "has this key an earlier waiting event?" is a
        # probe of it, and the only index that can answer it (migration 0003).
        Index(
            "ix_outbox_events_waiting_key",
            "key",
            "seq",
            "available_at",
            postgresql_where=text("available_at > created_at"),
            sqlite_where=text("available_at > created_at"),
        ),
        # The lowest seq of the waiting rows in one probe: the claim's floor goes below it
        # (migration 0006).
        Index(
            "ix_outbox_events_waiting_seq",
            "seq",
            postgresql_where=text("available_at > created_at"),
            sqlite_where=text("available_at > created_at"),
        ),
        # "Is any row waiting that is not due yet?" in one probe from now(), however many
        # waiting rows are due already. `attempts >= 0` (always true) keeps it to the queries
        # that say so: the per-key probe stays on the index above (migration 0009).
        Index(
            "ix_outbox_events_waiting_at",
            "available_at",
            postgresql_where=text("available_at > created_at AND attempts >= 0"),
            sqlite_where=text("available_at > created_at AND attempts >= 0"),
        ),
        # SQLite: never reuse a seq after the table empties (consumers may order by it).
        {"sqlite_autoincrement": True},
    )
    # The INSERT returns only `seq`; `created_at`, `available_at` and `attempts` load on first
    # access. Fetching them too cost ~0.1 ms of writer CPU per event (bench: writer overhead).
    # So the writer's role needs SELECT on `seq` alone (docs/operations.md, "Database roles").
    __mapper_args__ = {"eager_defaults": False}  # noqa: RUF012 - SQLAlchemy's own attribute

    #: Per-table monotonic sequence: the delivery order of events that share a key.
    seq: Mapped[int] = mapped_column(SeqColumn, Identity(), primary_key=True)
    #: Stable id, sent to the broker so consumers can deduplicate.
    id: Mapped[uuid.UUID] = mapped_column(Uuid(), nullable=False)
    topic: Mapped[str] = mapped_column(Text, nullable=False)
    key: Mapped[str | None] = mapped_column(Text)
    #: Lease bucket of the key, `hashtext(coalesce(key, id::text)) & 63`: Postgres sets it on
    #: every insert, whoever writes the row (a trigger of migration 0004); a value sent is
    #: overwritten. SQLite's trigger uses a cheaper hash of the same text (one relay owns every
    #: bucket there): on both, every event of one key has one bucket.
    bucket: Mapped[int] = mapped_column(
        SmallInteger, nullable=False, server_default="0", server_onupdate=FetchedValue()
    )
    payload: Mapped[Any] = mapped_column(JsonColumn, nullable=False)
    headers: Mapped[dict[str, str]] = mapped_column(JsonColumn, nullable=False, server_default="{}")
    event_type: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), nullable=False, server_default=func.now()
    )
    #: Not before this time: delayed delivery, and the next attempt after a failure.
    available_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), nullable=False, server_default=func.now()
    )
    attempts: Mapped[int] = mapped_column(Integer, nullable=False, server_default="0")
    first_failed_at: Mapped[datetime | None] = mapped_column(UtcDateTime())
    last_error: Mapped[str | None] = mapped_column(Text)

    def __init__(
        self,
        *,
        topic: str,
        payload: Any,
        key: str | None = None,
        headers: dict[str, str] | None = None,
        event_type: str | None = None,
        available_at: datetime | None = None,
        id: uuid.UUID | None = None,
    ) -> None:
        self.id = id if id is not None else uuid7()
        self.topic = topic
        self.key = key
        self.payload = payload
        # With the correlation id and trace context, if any; `_validate_headers` checks it.
        self.headers = cast("dict[str, str]", with_context(headers) or {})
        self.event_type = event_type
        if available_at is not None:
            self.available_at = available_at

    @classmethod
    def of(
        cls,
        event: BaseModel,
        *,
        key: str | None = None,
        topic: str | None = None,
        headers: dict[str, str] | None = None,
        available_at: datetime | None = None,
        id: uuid.UUID | None = None,
    ) -> OutboxEvent:
        """The row of a typed event (`outbox.Event`, or any pydantic model with `topic=`): its
        topic (`topic` wins), its event type with the version, its fields as the payload.

        >>> session.add(OutboxEvent.of(OrderPlaced(order_id=42, total_cents=10), key="o-42"))
        """
        chosen, event_type, payload = describe(event, topic)
        return cls(
            topic=chosen,
            payload=payload,
            key=key,
            headers=headers,
            event_type=event_type,
            available_at=available_at,
            id=id,
        )

    @validates("topic")
    def _validate_topic(self, _: str, value: object) -> str:
        return validation.check_topic(value)

    @validates("key")
    def _validate_key(self, _: str, value: object) -> str | None:
        return validation.check_key(value)

    @validates("payload")
    def _validate_payload(self, _: str, value: object) -> Any:
        return validation.check_payload(value)[0]

    @validates("headers")
    def _validate_headers(self, _: str, value: object) -> dict[str, str]:
        return validation.check_headers(value)

    @validates("event_type")
    def _validate_event_type(self, _: str, value: object) -> str | None:
        return validation.check_event_type(value)

    @validates("available_at")
    def _validate_available_at(self, _: str, value: object) -> datetime:
        return validation.check_available_at(value)

    def __repr__(self) -> str:
        return f"OutboxEvent(id={self.id}, topic={self.topic!r}, key={self.key!r})"


@event.listens_for(OutboxEvent, "before_insert")
def _check_again_at_flush(_: Any, __: Any, target: OutboxEvent) -> None:
    """The payload and headers may have been changed in place since they were checked (a
    dict is mutable): what is written is checked again, so it is what the checks allowed."""
    validation.check_payload(target.payload)
    validation.check_headers(target.headers)


class DeadLetter(OutboxBase):
    """An event the relay gave up on. Operators query this table with SQL and replay rows."""

    __tablename__ = "outbox_dead_letters"
    __table_args__ = (
        CheckConstraint("attempts >= 0", name="attempts_not_negative"),
        CheckConstraint("first_failed_at <= last_failed_at", name="failure_times_ordered"),
        Index("ix_outbox_dead_letters_topic_last_failed_at", "topic", "last_failed_at"),
        Index("ix_outbox_dead_letters_key", "key"),
        Index("ix_outbox_dead_letters_last_failed_at", "last_failed_at"),
        CheckConstraint("key IS NOT NULL OR NOT holds_key", name="only_keys_are_held"),
        # The claim's quarantine check: "is this key held by a dead letter?" (migration 0003).
        Index(
            "ix_outbox_dead_letters_quarantine",
            "key",
            "original_seq",
            postgresql_where=text("holds_key"),
            sqlite_where=text("holds_key"),
        ),
    )

    dead_letter_id: Mapped[int] = mapped_column(SeqColumn, Identity(), primary_key=True)
    #: The event's original id (`outbox_events.id`). Not unique: two events written with the
    #: same id must both be able to land here (a unique key crash-looped the relay).
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid(), nullable=False, index=True)
    original_seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    topic: Mapped[str] = mapped_column(Text, nullable=False)
    key: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JsonColumn, nullable=False)
    headers: Mapped[dict[str, str]] = mapped_column(JsonColumn, nullable=False)
    event_type: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    first_failed_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    last_failed_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    error_class: Mapped[str] = mapped_column(Text, nullable=False)
    error_message: Mapped[str] = mapped_column(Text, nullable=False)
    relay_id: Mapped[str] = mapped_column(Text, nullable=False)
    #: True while this dead letter quarantines its key: later events of the key are parked
    #: behind it (see relay/ordering.py). Replaying or deleting the row lifts it.
    holds_key: Mapped[bool] = mapped_column(
        Boolean, nullable=False, default=False, server_default=false()
    )
    #: For an event parked behind a poison event of its key: that poison event's id.
    held_behind: Mapped[uuid.UUID | None] = mapped_column(Uuid())


class BucketLease(OutboxBase):
    """Which relay owns which key bucket, until when. One row per bucket, seeded by migration."""

    __tablename__ = "outbox_bucket_leases"
    __table_args__ = (
        CheckConstraint(f"bucket >= 0 AND bucket < {validation.BUCKETS}", name="bucket_range"),
        CheckConstraint("(owner IS NULL) = (lease_until IS NULL)", name="owner_has_lease"),
    )

    bucket: Mapped[int] = mapped_column(SmallInteger, primary_key=True, autoincrement=False)
    owner: Mapped[str | None] = mapped_column(Text)
    lease_until: Mapped[datetime | None] = mapped_column(UtcDateTime())


class RelayInstance(OutboxBase):
    """Live relays and their heartbeats; buckets are shared fairly among the live ones."""

    __tablename__ = "outbox_relays"

    relay_id: Mapped[str] = mapped_column(Text, primary_key=True)
    hostname: Mapped[str] = mapped_column(Text, nullable=False)
    pid: Mapped[int] = mapped_column(Integer, nullable=False)
    started_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), nullable=False, server_default=func.now()
    )
    heartbeat_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), nullable=False, server_default=func.now()
    )


metadata = OutboxBase.metadata


class InboxEntry(OutboxBase):
    """An event a consumer has processed: `outbox.inbox.once` adds it in the transaction of
    the consumer's own changes, so a redelivered event is skipped once they are committed."""

    __tablename__ = "outbox_inbox"
    __table_args__ = (
        CheckConstraint(
            f"length(consumer) BETWEEN 1 AND {validation.MAX_CONSUMER_LENGTH}",
            name="consumer_length",
        ),
        # Retention: `outbox.inbox.prune` deletes by age.
        Index("ix_outbox_inbox_processed_at", "processed_at"),
    )

    #: Who processed it: one name per handler, so two handlers of one event each run once.
    consumer: Mapped[str] = mapped_column(Text, primary_key=True)
    #: The event's id (`Envelope.id`, the `outbox-id` / `message_id` / CloudEvents `id`).
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid(), primary_key=True)
    processed_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), nullable=False, server_default=func.now()
    )


class DeliveredEvent(OutboxBase):
    """An event the broker acknowledged, kept when the relay runs with `history = on`: the
    relay moves it here in the statement that deletes it from outbox_events (migration 0008),
    and deletes it after `history_retention`. Query it with SQL; `outbox-relay republish`
    puts events back into the outbox."""

    __tablename__ = "outbox_delivered"
    __table_args__ = (
        CheckConstraint("attempts >= 1", name="attempts_positive"),
        Index("ix_outbox_delivered_key", "key"),
        # Rows arrive in delivered_at order: a BRIN index is a few pages and nearly free.
        Index("ix_outbox_delivered_delivered_at", "delivered_at", postgresql_using="brin"),
    )

    #: Delivery order; the relay's retention walks it, oldest first.
    delivered_id: Mapped[int] = mapped_column(SeqColumn, Identity(), primary_key=True)
    event_id: Mapped[uuid.UUID] = mapped_column(Uuid(), nullable=False)
    seq: Mapped[int] = mapped_column(BigInteger, nullable=False)
    topic: Mapped[str] = mapped_column(Text, nullable=False)
    key: Mapped[str | None] = mapped_column(Text)
    event_type: Mapped[str | None] = mapped_column(Text)
    payload: Mapped[Any] = mapped_column(JsonColumn, nullable=False)
    headers: Mapped[dict[str, str]] = mapped_column(JsonColumn, nullable=False)
    created_at: Mapped[datetime] = mapped_column(UtcDateTime(), nullable=False)
    delivered_at: Mapped[datetime] = mapped_column(
        UtcDateTime(), nullable=False, server_default=func.now()
    )
    relay_id: Mapped[str] = mapped_column(Text, nullable=False)
    #: Attempts it took, the successful one included.
    attempts: Mapped[int] = mapped_column(Integer, nullable=False)
    #: Where the broker stored it: Kafka's partition and offset, or Redis's stream entry id
    #: (NULL for Redis pub/sub and the stdout broker).
    broker_partition: Mapped[int | None] = mapped_column(Integer)
    broker_offset: Mapped[int | None] = mapped_column(BigInteger)
    broker_entry_id: Mapped[str | None] = mapped_column(Text)
