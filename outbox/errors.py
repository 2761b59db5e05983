"""Exceptions raised by the `outbox` package."""

from __future__ import annotations


class OutboxError(Exception):
    """Base class of every error this package raises."""


class OutboxValidationError(OutboxError, ValueError):
    """An event field was rejected; `field` names it and `problem` says why."""

    def __init__(self, field: str, problem: str) -> None:
        super().__init__(f"{field}: {problem}")
        self.field = field
        self.problem = problem


class UnknownEventTypeError(OutboxError, LookupError):
    """A received event whose type no model of the registry has; `event_type` names it."""

    def __init__(self, event_type: str | None, event_id: object, known: str) -> None:
        super().__init__(f"event {event_id}: type {event_type!r} is not registered ({known})")
        self.event_type = event_type
        self.event_id = event_id


class EventPayloadError(OutboxError, ValueError):
    """A received payload that does not match its model: `field` names the first field at
    fault (dotted path; `payload` for the document itself) and `problem` says why."""

    def __init__(self, event_type: str, event_id: object, field: str, problem: str) -> None:
        super().__init__(f"{event_type} (event {event_id}): {field}: {problem}")
        self.event_type = event_type
        self.event_id = event_id
        self.field = field
        self.problem = problem
