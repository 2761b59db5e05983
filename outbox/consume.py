"""Typed events on the consumer side: a received event back into its pydantic model.

    registry = Registry(OrderPlaced, OrderCancelled)
    event = Envelope.from_kafka(record.topic, record.key, record.value, record.headers)
    order = registry.parse(event)  # an OrderPlaced, by the event's type

Works in every envelope mode: `Envelope.from_kafka` / `from_redis` read the type from
`outbox-event-type` or the CloudEvents `type`. An unregistered type raises
`UnknownEventTypeError`; a payload that does not match its model raises `EventPayloadError`, which
names the type and the field.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TypeVar

from pydantic import BaseModel, ValidationError

from outbox.envelope import Envelope
from outbox.errors import EventPayloadError, UnknownEventTypeError
from outbox.events import event_type_of

M = TypeVar("M", bound=BaseModel)


class Registry:
    """Event types to their models (`outbox.Event` subclasses, or pydantic models by class
    name). One model per type: `OrderPlaced.v1` and `OrderPlaced.v2` are two types."""

    def __init__(self, *models: type[BaseModel]) -> None:
        self._models: dict[str, type[BaseModel]] = {}
        for model in models:
            self.register(model)

    def register(self, model: type[M]) -> type[M]:
        """Add a model; usable as a class decorator. ValueError if its type is taken."""
        name = event_type_of(model)
        if self._models.get(name, model) is not model:
            raise ValueError(f"event type {name!r}: registered already, by {self._models[name]}")
        self._models[name] = model
        return model

    @property
    def types(self) -> Iterable[str]:
        return self._models.keys()

    def parse(self, envelope: Envelope) -> BaseModel:
        """The envelope's payload as the model of its event type."""
        model = self._models.get(envelope.event_type or "")
        if model is None:
            known = ", ".join(sorted(self._models)) or "none"
            raise UnknownEventTypeError(envelope.event_type, envelope.id, f"registered: {known}")
        return _validate(model, envelope)


def parse(envelope: Envelope, model: type[M]) -> M:
    """The envelope's payload as `model`, which must be the model of its event type."""
    expected = event_type_of(model)
    if envelope.event_type != expected:
        raise UnknownEventTypeError(envelope.event_type, envelope.id, f"expected {expected!r}")
    return _validate(model, envelope)


def _validate(model: type[M], envelope: Envelope) -> M:
    try:
        return model.model_validate_json(envelope.payload)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(part) for part in first["loc"]) or "payload"
        more = exc.error_count() - 1
        problem = first["msg"] + (f" (and {more} more)" if more else "")
        raise EventPayloadError(event_type_of(model), envelope.id, field, problem) from None
