"""OutboxEvent rejects bad input at construction, naming the field (property-tested)."""

from __future__ import annotations

import json
import string
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import BaseModel

from outbox import MAX_KEY_LENGTH, MAX_TOPIC_LENGTH, OutboxEvent, OutboxValidationError
from outbox.ids import uuid7
from outbox.validation import DEFAULT_MAX_PAYLOAD_BYTES

pytestmark = pytest.mark.unit

LEGAL = string.ascii_letters + string.digits + "._-"
legal_topics = st.text(alphabet=LEGAL, min_size=1, max_size=MAX_TOPIC_LENGTH).filter(
    lambda t: t not in (".", "..")
)
# Text Postgres can store: no NUL, no lone surrogates (both are rejected, see below).
pg_text = st.characters(blacklist_categories=["Cs"], blacklist_characters="\x00")
json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(pg_text, max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(pg_text, max_size=8), children, max_size=4)
    ),
    max_leaves=12,
)


def rejected(field: str, **kwargs: Any) -> OutboxValidationError:
    args: dict[str, Any] = {"topic": "orders", "payload": {}} | kwargs
    with pytest.raises(OutboxValidationError) as info:
        OutboxEvent(**args)
    assert info.value.field == field
    assert str(info.value).startswith(f"{field}: ")
    return info.value


@given(
    topic=legal_topics,
    payload=st.dictionaries(st.text(pg_text, max_size=8), json_values, max_size=5),
)
def test_legal_events_are_accepted(topic: str, payload: dict[str, Any]) -> None:
    event = OutboxEvent(topic=topic, payload=payload, key="k")
    assert event.topic == topic
    assert event.payload == payload


@given(st.text(min_size=1, max_size=60).filter(lambda t: any(c not in LEGAL for c in t)))
def test_topics_outside_kafkas_charset_are_rejected(topic: str) -> None:
    rejected("topic", topic=topic)


@pytest.mark.parametrize("topic", ["", ".", "..", "a" * (MAX_TOPIC_LENGTH + 1), 42, None])
def test_bad_topics(topic: object) -> None:
    rejected("topic", topic=topic)


def test_key_limits() -> None:
    assert OutboxEvent(topic="t", payload={}, key="k" * MAX_KEY_LENGTH).key
    error = rejected("key", key="k" * (MAX_KEY_LENGTH + 1))
    assert str(MAX_KEY_LENGTH) in error.problem
    rejected("key", key="")
    rejected("key", key=7)
    assert OutboxEvent(topic="t", payload={}).key is None


@given(st.one_of(st.integers(), st.floats(), st.text(), st.binary(), st.sets(st.integers())))
def test_payload_must_be_a_dict_list_or_model(payload: object) -> None:
    rejected("payload", payload=payload)


@pytest.mark.parametrize(
    "payload",
    [
        {"when": datetime.now(UTC)},
        {"x": {1, 2}},
        {"nan": float("nan")},
        [object()],
        {"s": "\x00"},
        {"s": "\ud800"},
    ],
)
def test_payload_not_json_serialisable(payload: object) -> None:
    rejected("payload", payload=payload)


def test_payload_size_limit_is_configurable(monkeypatch: pytest.MonkeyPatch) -> None:
    big = {"blob": "x" * DEFAULT_MAX_PAYLOAD_BYTES}
    assert "limit is" in rejected("payload", payload=big).problem
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "10")
    rejected("payload", payload={"blob": "x" * 10})
    assert OutboxEvent(topic="t", payload={"a": 1}).payload == {"a": 1}
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "lots")
    rejected("OUTBOX_MAX_PAYLOAD_BYTES", payload={})


class Order(BaseModel):
    order_id: int
    placed_at: datetime


def test_pydantic_payloads_are_dumped_as_json() -> None:
    when = datetime(2026, 11, 25, 12, 0, tzinfo=UTC)
    event = OutboxEvent(topic="orders", payload=Order(order_id=1, placed_at=when))
    assert event.payload == {"order_id": 1, "placed_at": "2026-11-25T12:00:00Z"}
    json.dumps(event.payload)


@given(
    st.dictionaries(
        st.text(pg_text, min_size=1, max_size=10), st.text(pg_text, max_size=10), max_size=5
    )
)
def test_str_headers_are_accepted(headers: dict[str, str]) -> None:
    headers = {k: v for k, v in headers.items() if not k.lower().startswith("outbox-")}
    assert OutboxEvent(topic="t", payload={}, headers=headers).headers == headers


@pytest.mark.parametrize(
    "headers", [{"a": 1}, {1: "a"}, {"": "a"}, ["a"], {"outbox-id": "x"}, {"a": b"bytes"}]
)
def test_bad_headers(headers: object) -> None:
    rejected("headers", headers=headers)


def test_event_type_and_available_at() -> None:
    rejected("event_type", event_type="")
    rejected("event_type", event_type=3)
    rejected("available_at", available_at=datetime(2026, 1, 1))  # naive: ambiguous
    when = datetime.now(UTC).replace(microsecond=0) + timedelta(days=300)
    assert OutboxEvent(topic="t", payload={}, available_at=when).available_at == when


def test_ids_are_unique_and_time_ordered() -> None:
    ids = [OutboxEvent(topic="t", payload={}).id for _ in range(2000)]
    assert len(set(ids)) == len(ids)
    assert ids == sorted(ids)
    assert all(i.version == 7 for i in ids)


# -- what is published is what was checked (hardening) ----------------------------------------


def test_the_payload_limit_counts_the_json_as_postgres_renders_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """jsonb renders `[0, 0]` with a space after each comma: that is what the relay sends."""
    monkeypatch.setenv("OUTBOX_MAX_PAYLOAD_BYTES", "1000")
    fits = [0] * 333  # 1 + 333 + 332 * 2 + 1 = 999 bytes as rendered
    assert len(json.dumps(fits)) == 999
    OutboxEvent(topic="t", payload=fits)
    over = [0] * 334  # 1,002 bytes as rendered, though 669 compact
    assert "1002 bytes" in rejected("payload", payload=over).problem


def test_headers_have_a_size_limit() -> None:
    problem = rejected("headers", headers={"trace": "x" * (64 * 1024)}).problem
    assert "limit" in problem


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda e: e.payload.__setitem__("blob", "x" * (2 * 1024 * 1024)), "payload"),
        (lambda e: e.headers.__setitem__("outbox-id", "spoofed"), "headers"),
        (lambda e: e.headers.__setitem__("n", 1), "headers"),
    ],
    ids=["payload-grown", "reserved-header", "int-header"],
)
def test_changes_after_construction_are_checked_at_flush(change: Any, field: str) -> None:
    from sqlalchemy import create_engine
    from sqlalchemy.orm import Session

    from outbox import metadata

    engine = create_engine("sqlite://")
    metadata.create_all(engine)
    event = OutboxEvent(topic="t", payload={"a": 1}, headers={"h": "v"})
    change(event)
    with Session(engine) as session:
        session.add(event)
        with pytest.raises(OutboxValidationError) as info:
            session.flush()
    assert info.value.field == field
    engine.dispose()


def test_deep_nesting_is_a_validation_error() -> None:
    deep: list[Any] = []
    for _ in range(100_000):
        deep = [deep]
    assert "nested" in rejected("payload", payload=deep).problem


def test_available_at_is_bounded() -> None:
    far = datetime(9999, 1, 1, tzinfo=UTC)
    assert "later than" in rejected("available_at", available_at=far).problem


def test_a_spoofed_relay_header_does_not_win_for_consumers() -> None:
    from outbox.envelope import Envelope

    event = Envelope(7, uuid7(), "t", "k", b"{}", headers={"outbox-id": "spoofed", "h": "v"})
    headers = event.kafka_headers()
    assert [name for name, _ in headers].count("outbox-id") == 1
    back = Envelope.from_kafka("t", b"k", b"{}", [*headers, ("outbox-id", b"spoofed")])
    assert back.id == event.id
    assert back.headers == {"h": "v"}
