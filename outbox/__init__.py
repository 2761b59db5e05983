"""Transactional outbox: add `OutboxEvent` rows (or `await enqueue(session, ...)`) in your
business transaction; a relay publishes them."""

from outbox.enqueue import enqueue
from outbox.envelope import Envelope
from outbox.errors import OutboxError, OutboxValidationError
from outbox.ids import uuid7
from outbox.models import BucketLease, DeadLetter, OutboxBase, OutboxEvent, RelayInstance, metadata
from outbox.validation import BUCKETS, MAX_KEY_LENGTH, MAX_TOPIC_LENGTH

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
