"""Transactional outbox: add `OutboxEvent` rows (or `await enqueue(session, ...)`) in your
business transaction; a relay publishes them.

The names below load on first use (PEP 562), so that importing `outbox.envelope` or
`outbox.urls` (as the relay's CLI does) does not import SQLAlchemy: `outbox-relay status`
as a probe starts in half the time."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from outbox.enqueue import enqueue
    from outbox.envelope import Envelope
    from outbox.errors import OutboxError, OutboxValidationError
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
    "DeadLetter": "outbox.models",
    "Envelope": "outbox.envelope",
    "OutboxBase": "outbox.models",
    "OutboxError": "outbox.errors",
    "OutboxEvent": "outbox.models",
    "OutboxValidationError": "outbox.errors",
    "RelayInstance": "outbox.models",
    "enqueue": "outbox.enqueue",
    "metadata": "outbox.models",
    "uuid7": "outbox.ids",
}

__all__ = [
    "BUCKETS",
    "MAX_KEY_LENGTH",
    "MAX_TOPIC_LENGTH",
    "BucketLease",
    "DeadLetter",
    "Envelope",
    "OutboxBase",
    "OutboxError",
    "OutboxEvent",
    "OutboxValidationError",
    "RelayInstance",
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
