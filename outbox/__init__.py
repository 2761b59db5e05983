"""Transactional outbox: add `OutboxEvent` rows (or `await enqueue(session, ...)`) in your
business transaction; a relay publishes them.

The names below load on first use (PEP 562), so that importing `outbox.envelope` or
`outbox.urls` (as the relay's CLI does) does not import SQLAlchemy: `outbox-relay status`
as a probe starts in half the time."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox.consume import Registry
    from outbox.context import CorrelationIdMiddleware, correlation_id, current_correlation_id
    from outbox.enqueue import enqueue
    from outbox.envelope import Envelope
    from outbox.errors import (
        EventPayloadError,
        OutboxError,
        OutboxValidationError,
        UnknownEventTypeError,
    )
    from outbox.events import Event
    from outbox.ids import uuid7
    from outbox.models import (
        BucketLease,
        DeadLetter,
        OutboxBase,
        OutboxEvent,
        RelayInstance,
        metadata,
    )
    from outbox.validation import BUCKETS, MAX_KEY_LENGTH, MAX_TOPIC_LENGTH

_WHERE = {
    "BUCKETS": "outbox.validation",
    "MAX_KEY_LENGTH": "outbox.validation",
    "MAX_TOPIC_LENGTH": "outbox.validation",
    "BucketLease": "outbox.models",
    "CorrelationIdMiddleware": "outbox.context",
    "DeadLetter": "outbox.models",
    "Envelope": "outbox.envelope",
    "Event": "outbox.events",
    "EventPayloadError": "outbox.errors",
    "OutboxBase": "outbox.models",
    "OutboxError": "outbox.errors",
    "OutboxEvent": "outbox.models",
    "OutboxValidationError": "outbox.errors",
    "Registry": "outbox.consume",
    "RelayInstance": "outbox.models",
    "UnknownEventTypeError": "outbox.errors",
    "correlation_id": "outbox.context",
    "current_correlation_id": "outbox.context",
    "enqueue": "outbox.enqueue",
    "metadata": "outbox.models",
    "uuid7": "outbox.ids",
}

__all__ = [
    "BUCKETS",
    "MAX_KEY_LENGTH",
    "MAX_TOPIC_LENGTH",
    "BucketLease",
    "CorrelationIdMiddleware",
    "DeadLetter",
    "Envelope",
    "Event",
    "EventPayloadError",
    "OutboxBase",
    "OutboxError",
    "OutboxEvent",
    "OutboxValidationError",
    "Registry",
    "RelayInstance",
    "UnknownEventTypeError",
    "correlation_id",
    "current_correlation_id",
    "enqueue",
    "metadata",
    "uuid7",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
