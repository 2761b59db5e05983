"""Typed events: pydantic models that know their topic, type name and schema version.

    class OrderPlaced(outbox.Event, topic="orders", version=2):
        order_id: int
        total_cents: int

    session.add(OutboxEvent.of(OrderPlaced(order_id=1, total_cents=10), key="order-1"))
    await enqueue(session, OrderPlaced(order_id=1, total_cents=10), key="order-1")

Class keywords, not `model_config`: they are checked when the class is defined (a bad topic
fails at import, not at the first write), they read as what they are, and pydantic passes them
to `__init_subclass__` untouched. The event type is the type name (by default the class name)
followed by `.v<version>` when a version is given: `OrderPlaced.v2`. So the version travels in
every envelope mode without a header of its own (`outbox-event-type`, CloudEvents `type`), and
a consumer's registry can hold `OrderPlaced.v1` and `OrderPlaced.v2` side by side.
"""

from __future__ import annotations

from typing import Any, ClassVar

from pydantic import BaseModel

from outbox import validation
from outbox.errors import OutboxValidationError


class Event(BaseModel):
    """Base class of typed events. Class keywords: `topic` (else given at each write),
    `type` (default: the class name) and `version` (a positive int, default none)."""

    #: Set by `__init_subclass__`; read them with `event_type_of` and `topic_of`.
    __outbox_topic__: ClassVar[str | None] = None
    __outbox_type__: ClassVar[str] = "Event"

    def __init_subclass__(
        cls,
        *,
        topic: str | None = None,
        type: str | None = None,  # shadows the builtin: the keyword users write
        version: int | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init_subclass__(**kwargs)
        if topic is not None:  # else inherited
            cls.__outbox_topic__ = validation.check_topic(topic)
        name = type if type is not None else cls.__name__
        if version is not None:
            if isinstance(version, bool) or not isinstance(version, int) or version < 1:
                raise OutboxValidationError(
                    "version", f"{cls.__name__}: must be a positive int, got {version!r}"
                )
            name = f"{name}.v{version}"
        checked = validation.check_event_type(name)
        assert checked is not None
        cls.__outbox_type__ = checked


def event_type_of(model: type[BaseModel]) -> str:
    """The event type a model is written with: its `type` (else class name) and `.v<version>`.
    A plain pydantic model: its class name."""
    if issubclass(model, Event):
        return model.__outbox_type__
    return model.__name__


def topic_of(model: type[BaseModel]) -> str | None:
    return model.__outbox_topic__ if issubclass(model, Event) else None


def describe(event: BaseModel, topic: str | None) -> tuple[str, str, Any]:
    """The topic, event type and JSON-ready payload of a typed event; `topic` wins over the
    class's."""
    if not isinstance(event, BaseModel):
        raise OutboxValidationError(
            "event", f"must be a pydantic model, got {type(event).__name__}"
        )
    model = type(event)
    chosen = topic if topic is not None else topic_of(model)
    if chosen is None:
        raise OutboxValidationError(
            "topic",
            f"{model.__name__} declares no topic: pass topic=..., or declare it "
            f"with `class {model.__name__}(outbox.Event, topic=...)`",
        )
    return chosen, event_type_of(model), event.model_dump(mode="json")
