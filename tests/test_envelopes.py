"""Envelope modes (outbox/envelope.py): what the relay writes in each mode, read back by
`Envelope`, by FastStream's own parser and by the CloudEvents SDK; the settings; and events
sent through the real relay to real Kafka and Redis in each mode."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis
from aiokafka import AIOKafkaConsumer, ConsumerRecord
from cloudevents import v1 as cloudevents_v1
from cloudevents.core.base import BaseCloudEvent
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.v1 import kafka as ce_kafka_v1
from faststream.redis.parser import BinaryMessageFormatV1
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from outbox import OutboxEvent
from outbox.envelope import (
    MODES,
    Encoder,
    Envelope,
    EnvelopeMode,
    _FastStream,
    epoch_seconds,
    iso_bytes,
    kafka_timestamp,
    resp_bulk,
)
from outbox.relay.factory import build_relay
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher, resp_command
from outbox.relay.settings import RelaySettings, default_source
from tests.helpers import commit_events, pg_relay
from tests.test_cli import cli

SOURCE = "/outbox/test"
TRACEPARENT = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
#: What XRANGE returns: [(entry id, {field: value})].
Entries = list[tuple[bytes, dict[bytes, bytes]]]
CE_MODES: tuple[EnvelopeMode, ...] = ("cloudevents-binary", "cloudevents-structured")
assert cloudevents_v1  # the SDK's 1.x API, kept in 2.x as cloudevents.v1


def envelope(**given: Any) -> Envelope:
    fields: dict[str, Any] = {
        "seq": 42,
        "id": uuid.uuid4(),
        "topic": "orders",
        "key": "order-1",
        "payload": '{"order_id": 1, "total_cents": 4200, "note": "café \\"quoted\\""}'.encode(),
        "headers": {"correlation_id": "checkout-7", "traceparent": TRACEPARENT, "h": "v"},
        "event_type": "OrderPlaced",
        "created_at": datetime(2024, 5, 1, 12, 0, 0, 123456, tzinfo=UTC),
    }
    return Envelope(**(fields | given))


def sample_events(topic: str) -> list[OutboxEvent]:
    """One event with headers, one without an event type, one without a key."""
    return [
        OutboxEvent(
            topic=topic,
            key="order-1",
            event_type="OrderPlaced",
            payload={"order_id": 1, "total_cents": 4200, "note": "café"},
            headers={"correlation_id": "checkout-7", "traceparent": TRACEPARENT, "h": "v"},
        ),
        OutboxEvent(topic=topic, key="order-2", payload={"order_id": 2, "total_cents": 99}),
        OutboxEvent(topic=topic, event_type="Ping", payload={"order_id": 3, "total_cents": 0}),
    ]


def stream_entry(flat: list[bytes]) -> dict[bytes, bytes]:
    return dict(zip(flat[::2], flat[1::2], strict=True))


# -- every mode reads back -------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize("mode", MODES)
def test_every_mode_reads_back_from_kafka_redis_and_pubsub(mode: EnvelopeMode) -> None:
    encoder = Encoder(mode, source=SOURCE)
    for event in (envelope(), envelope(key=None, event_type=None, headers={})):
        value, headers = encoder.kafka(event)
        key = event.key.encode() if event.key is not None else None
        entry = stream_entry(encoder.stream_fields(event))
        readings = [
            Envelope.from_kafka(event.topic, key, value, headers),
            Envelope.from_redis(event.topic, entry),
            Envelope.from_redis_message(event.topic, encoder.pubsub_message(event)),
        ]
        if mode != "faststream":  # FastStream's binary message is no text
            text = {k.decode(): v.decode() for k, v in entry.items()}  # decode_responses=True
            readings.append(Envelope.from_redis(event.topic, text))
        for back in readings:
            event_type = event.event_type
            if mode.startswith("cloudevents"):
                event_type = event_type or event.topic  # the type of an untyped event
            assert (back.id, back.seq, back.key, back.event_type, back.created_at) == (
                event.id,
                event.seq,
                event.key,
                event_type,
                event.created_at,
            )
            assert back.headers == event.headers
            assert back.json() == event.json()


@pytest.mark.unit
def test_kafka_timestamp_is_created_at_in_milliseconds() -> None:
    event = envelope(created_at=datetime(2024, 5, 1, 12, 0, 0, 999999, tzinfo=UTC))
    assert kafka_timestamp(event) == 1714564800999
    assert kafka_timestamp(envelope(created_at=None)) is None


@pytest.mark.unit
@given(
    st.lists(
        st.tuples(
            st.datetimes(
                min_value=datetime(1971, 1, 1),
                max_value=datetime(2200, 1, 1),
                timezones=st.sampled_from(
                    [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]
                ),
            ),
            st.booleans(),
        ),
        max_size=8,
    )
)
def test_time_conversions_are_those_of_the_value_in_any_order(
    values: list[tuple[datetime, bool]],
) -> None:
    """The conversions remember the last value: equal instants in other zones, repeated or
    interleaved, still print their own offset and give the exact millisecond."""
    for when, again in values:
        for _ in range(2 if again else 1):
            assert iso_bytes(when) == when.isoformat().encode()
            expected = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
            assert kafka_timestamp(envelope(created_at=when)) == expected
    noon_utc = datetime(2024, 5, 1, 12, tzinfo=UTC)
    same_in_paris = noon_utc.astimezone(timezone(timedelta(hours=2)))
    assert iso_bytes(noon_utc) == b"2024-05-01T12:00:00+00:00"
    assert iso_bytes(same_in_paris) == b"2024-05-01T14:00:00+02:00"


@given(
    st.datetimes(
        min_value=datetime(1971, 1, 1),
        max_value=datetime(2200, 1, 1),
        timezones=st.sampled_from(
            [UTC, timezone(timedelta(hours=2)), timezone(timedelta(hours=-5))]
        ),
    ),
    st.lists(st.tuples(st.sampled_from([0, 1, 999, 500_000, 999_999]), st.booleans()), max_size=10),
)
def test_time_conversions_within_one_second_print_their_own_fraction(
    base: datetime, steps: list[tuple[int, bool]]
) -> None:
    """Events committed within one second share the bytes up to the seconds: each still gets
    its own fraction (none at all when it is zero, as `isoformat` prints it) and offset."""
    paris = timezone(timedelta(hours=2))
    for microsecond, elsewhere in steps:
        when = base.replace(microsecond=microsecond)
        if elsewhere:
            when = when.astimezone(paris)
        assert iso_bytes(when) == when.isoformat().encode()
        expected = (when - datetime(1970, 1, 1, tzinfo=UTC)) // timedelta(milliseconds=1)
        assert kafka_timestamp(envelope(created_at=when)) == expected
        assert epoch_seconds(when) == when.timestamp()


# -- plain ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_plain_redis_fields_are_the_kafka_headers_plus_key_and_payload() -> None:
    event = envelope()
    value, headers = Encoder().kafka(event)
    assert value == event.payload
    assert ("content-type", b"application/json") in headers
    assert stream_entry(Encoder().stream_fields(event)) == {
        name.encode(): value for name, value in headers
    } | {b"outbox-key": b"order-1", b"outbox-payload": event.payload}
    assert event.kafka_headers() == headers
    assert event.redis_fields() == {
        name.decode(): value for name, value in stream_entry(Encoder().stream_fields(event)).items()
    }


@pytest.mark.unit
def test_from_redis_reads_the_fields_of_earlier_versions() -> None:
    event_id = uuid.uuid4()
    old = {
        b"id": str(event_id).encode(),
        b"seq": b"7",
        b"key": b"order-1",
        b"type": b"OrderPlaced",
        b"created_at": b"2024-05-01T12:00:00+00:00",
        b"headers": b'{"h":"v"}',
        b"payload": b'{"order_id": 1}',
    }
    back = Envelope.from_redis("orders", old)
    assert (back.id, back.seq, back.key, back.event_type, back.headers, back.json()) == (
        event_id,
        7,
        "order-1",
        "OrderPlaced",
        {"h": "v"},
        {"order_id": 1},
    )
    assert back.created_at == datetime(2024, 5, 1, 12, tzinfo=UTC)
    message = json.dumps({k.decode(): v.decode() for k, v in old.items()}).encode()
    assert Envelope.from_redis_message("orders", message).id == event_id  # old pub/sub


@pytest.mark.unit
@pytest.mark.parametrize(
    ("mode", "spoofed"),
    [
        ("plain", ["outbox-id", "Content-Type"]),
        ("faststream", ["message_id", "content-type", "outbox-seq"]),
        ("cloudevents-binary", ["ce_id", "CE_TYPE", "content-type", "data"]),
        ("cloudevents-structured", ["ce_specversion", "content-type", "data"]),
    ],
)
def test_the_relays_names_win_over_the_applications(mode: EnvelopeMode, spoofed: list[str]) -> None:
    event = envelope(headers=dict.fromkeys(spoofed, "spoofed") | {"h": "v"})
    value, headers = Encoder(mode).kafka(event)
    names = [name.lower() for name, _ in headers]
    assert len(names) == len(set(names))
    assert b"spoofed" not in [v for _, v in headers]
    assert b"spoofed" not in value
    back = Envelope.from_kafka("orders", b"order-1", value, headers)
    assert (back.id, back.headers) == (event.id, {"h": "v"})


@pytest.mark.unit
def test_not_an_outbox_record_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an event of the outbox relay"):
        Envelope.from_kafka("orders", None, b"{}", [("content-type", b"application/json")])


# -- faststream --------------------------------------------------------------------------------


@pytest.mark.unit
def test_faststream_redis_message_is_faststreams_binary_format() -> None:
    event = envelope()
    entry = stream_entry(Encoder("faststream").stream_fields(event))
    assert list(entry) == [b"__data__"]
    data, headers = BinaryMessageFormatV1.parse(entry[b"__data__"])  # FastStream's own parser
    assert data == event.payload
    assert headers["message_id"] == str(event.id)
    assert headers["correlation_id"] == "checkout-7"
    assert headers["content-type"] == "application/json"
    assert (headers["outbox-seq"], headers["outbox-key"], headers["h"]) == ("42", "order-1", "v")
    untraced = envelope(headers={})
    data, headers = BinaryMessageFormatV1.parse(Encoder("faststream").pubsub_message(untraced))
    assert headers["correlation_id"] == headers["message_id"] == str(untraced.id)


@pytest.mark.unit
def test_faststream_header_too_long_for_the_binary_format_goes_as_json() -> None:
    event = envelope(headers={"big": "é" * 40_000})  # 80,000 bytes: over a u16 length
    message = Encoder("faststream").pubsub_message(event)
    data, headers = BinaryMessageFormatV1.parse(message)
    assert (data, headers["big"], headers["message_id"]) == (
        event.payload,
        "é" * 40_000,
        str(event.id),
    )
    assert Envelope.from_redis_message("orders", message).headers["big"] == "é" * 40_000


@pytest.mark.unit
@settings(max_examples=200, deadline=None)
@given(
    key=st.none() | st.text(max_size=40) | st.just("k" * 70_000),
    event_type=st.none() | st.text(max_size=20),
    created=st.booleans(),
    payload=st.text(max_size=20).map(lambda t: json.dumps(t).encode()),  # JSON, as stored
)
def test_faststream_message_without_headers_is_the_general_one(
    key: str | None, event_type: str | None, created: bool, payload: bytes
) -> None:
    """The fast path (no headers of the event's own) builds the bytes of the general one, and
    FastStream's parser reads them; a key too long for the binary format goes as JSON."""
    framing = _FastStream()
    event = envelope(
        key=key,
        event_type=event_type,
        payload=payload,
        headers={},
        created_at=datetime(2024, 5, 1, 12, tzinfo=UTC) if created else None,
    )
    message = framing.message(event)
    assert message == framing._message(event)
    data, headers = BinaryMessageFormatV1.parse(message)
    assert data == payload
    assert headers.get("outbox-key") == key


# -- CloudEvents -------------------------------------------------------------------------------


def expected_attributes(
    event_id: uuid.UUID,
    seq: int,
    key: str | None,
    event_type: str | None,
    topic: str,
    created_at: datetime,
    headers: Mapping[str, str],
) -> dict[str, Any]:
    expected: dict[str, Any] = {
        "specversion": "1.0",
        "id": str(event_id),
        "source": SOURCE,
        "type": event_type or topic,
        "time": created_at,
        "datacontenttype": "application/json",
        "outboxseq": str(seq),
    }
    if key is not None:
        expected["subject"] = expected["partitionkey"] = key  # the SDK adds the record key
    if "correlation_id" in headers:
        expected["correlationid"] = headers["correlation_id"]
    if "traceparent" in headers:
        expected["traceparent"] = headers["traceparent"]
    return expected


def parse_with_sdk(
    mode: EnvelopeMode, key: bytes | None, value: bytes, headers: Mapping[str, bytes]
) -> list[tuple[dict[str, Any], Any]]:
    """The attributes and data by each SDK decoder: 2.x's Kafka binding (the mode's own
    function and auto-detection), and the 1.x API kept as cloudevents.v1."""
    message = ce_kafka.KafkaMessage(headers=dict(headers), key=key, value=value)
    own = ce_kafka.from_binary if mode == "cloudevents-binary" else ce_kafka.from_structured
    parsed: list[BaseCloudEvent] = [
        own(message, JSONFormat()),
        ce_kafka.from_kafka_event(message),
    ]
    out = [(event.get_attributes(), event.get_data()) for event in parsed]
    old = ce_kafka_v1.KafkaMessage(dict(headers), key, value)
    if mode == "cloudevents-binary":
        v1 = ce_kafka_v1.from_binary(old)
        attributes = dict(v1.get_attributes())
    else:
        v1 = ce_kafka_v1.from_structured(old)
        attributes = dict(v1.get_attributes())
        # The 1.x API also copies every Kafka header into the attributes, the content-type
        # header (application/cloudevents+json) over the document's datacontenttype.
        document = json.loads(value)
        for name in headers:
            if name not in document:
                attributes.pop(name, None)
        attributes["datacontenttype"] = document["datacontenttype"]
    attributes["time"] = datetime.fromisoformat(attributes["time"])
    if isinstance(attributes.get("partitionkey"), bytes):
        attributes["partitionkey"] = attributes["partitionkey"].decode()
    out.append((attributes, v1.get_data()))
    return out


@pytest.mark.unit
@pytest.mark.parametrize("mode", CE_MODES)
def test_cloudevents_sdk_reads_every_attribute(mode: EnvelopeMode) -> None:
    for event in (envelope(), envelope(key=None, event_type=None, headers={})):
        value, headers = Encoder(mode, source=SOURCE).kafka(event)
        key = event.key.encode() if event.key is not None else None
        assert event.created_at is not None
        expected = expected_attributes(
            event.id,
            event.seq,
            event.key,
            event.event_type,
            "orders",
            event.created_at,
            event.headers,
        )
        for attributes, data in parse_with_sdk(mode, key, value, dict(headers)):
            assert attributes == expected
            assert data == event.json()


@pytest.mark.unit
def test_structured_value_is_the_payloads_own_text() -> None:
    event = envelope(key='a "quoted" key\n', event_type="Ordér")
    value, headers = Encoder("cloudevents-structured", source='/s "q"').kafka(event)
    assert headers == [
        ("content-type", b"application/cloudevents+json"),
        ("correlation_id", b"checkout-7"),
        ("traceparent", TRACEPARENT.encode()),
        ("h", b"v"),
    ]
    assert value.endswith(b',"data":' + event.payload + b"}")
    document = json.loads(value)
    assert (document["subject"], document["type"], document["source"]) == (
        'a "quoted" key\n',
        "Ordér",
        '/s "q"',
    )


# -- settings ----------------------------------------------------------------------------------


@pytest.mark.unit
@pytest.mark.parametrize(
    "given",
    [
        "orders=cloudevents-binary, payments = faststream",
        '{"orders": "cloudevents-binary", "payments": "faststream"}',
    ],
)
def test_envelope_topics_take_both_forms(given: str, monkeypatch: pytest.MonkeyPatch) -> None:
    expected = {"orders": "cloudevents-binary", "payments": "faststream"}
    settings = RelaySettings(database_url="sqlite:///x.db", envelope_topics=given)
    assert settings.envelope_topics == expected
    monkeypatch.setenv("OUTBOX_ENVELOPE_TOPICS", given)
    assert RelaySettings(database_url="sqlite:///x.db").envelope_topics == expected


@pytest.mark.unit
def test_envelope_per_topic_over_the_global_one() -> None:
    encoder = Encoder("faststream", {"orders": "cloudevents-binary"})
    assert dict(encoder.kafka(envelope(topic="orders"))[1])["ce_specversion"] == b"1.0"
    assert "message_id" in dict(encoder.kafka(envelope(topic="other"))[1])


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "env", "message"),
    [
        (("--envelope", "cloudevents"), {}, "'--envelope'"),
        (("--envelope-topics", "orders"), {}, "envelope_topics: 'orders': expected topic=mode"),
        (("--envelope-topics", "orders=binary"), {}, "envelope_topics.orders: Input should be"),
        ((), {"OUTBOX_ENVELOPE_TOPICS": '{"orders": 1'}, "envelope_topics: not a JSON object"),
        ((), {"OUTBOX_ENVELOPE_TOPICS": "a=plain,a=faststream"}, "'a' is given twice"),
        (("--source", "a b"), {}, "source: must be a non-empty URI reference"),
    ],
)
def test_bad_envelope_settings_are_one_line_naming_the_field(
    args: tuple[str, ...], env: dict[str, str], message: str
) -> None:
    done = cli("run", "--database-url", "sqlite:///x.db", *args, **env)
    assert done.returncode == 2
    assert done.stderr.count("\n") == 1, done.stderr
    assert message in done.stderr


@pytest.mark.unit
def test_the_default_source_is_the_databases_name() -> None:
    assert default_source("postgresql://u:secret@db.internal:5432/shop?sslmode=require") == (
        "/outbox/shop"
    )
    assert default_source("sqlite:////var/lib/outbox/demo.db") == "/outbox/demo"
    settings = RelaySettings(database_url="postgresql://u@h/shop")
    assert settings.event_source() == "/outbox/shop"
    assert RelaySettings(database_url="postgresql://u@h/shop", source="/x").event_source() == "/x"
    with pytest.raises(ValidationError):
        RelaySettings(database_url="postgresql://u@h/shop", envelope="json")


# -- through the real relay --------------------------------------------------------------------


async def pending_rows(pg: asyncpg.Connection) -> dict[uuid.UUID, asyncpg.Record]:
    """The events as the database holds them, before the relay sends (and deletes) them;
    the first one made five hours old, as a replayed event is."""
    await pg.execute(
        "UPDATE outbox_events SET created_at = created_at - interval '5 hours' "
        "WHERE seq = (SELECT min(seq) FROM outbox_events)"
    )
    rows = await pg.fetch("SELECT id, seq, key, event_type, headers, created_at FROM outbox_events")
    return {row["id"]: row for row in rows}


async def read_records(bootstrap: str, topic: str, count: int) -> list[ConsumerRecord[Any, Any]]:
    consumer = AIOKafkaConsumer(
        topic, bootstrap_servers=bootstrap, auto_offset_reset="earliest", group_id=None
    )
    await consumer.start()
    out: list[ConsumerRecord[Any, Any]] = []
    try:
        async with asyncio.timeout(60):
            while len(out) < count:
                batches = await consumer.getmany(timeout_ms=1000)
                out += [record for records in batches.values() for record in records]
    finally:
        await consumer.stop()
    return out


def check_envelope(back: Envelope, row: asyncpg.Record, topic: str, mode: EnvelopeMode) -> None:
    event_type = row["event_type"]
    if mode.startswith("cloudevents"):
        event_type = event_type or topic
    assert (back.seq, back.key, back.event_type, back.created_at) == (
        row["seq"],
        row["key"],
        event_type,
        row["created_at"],
    )
    assert back.headers == json.loads(row["headers"])


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.parametrize("mode", MODES)
async def test_kafka_records_in_each_mode(
    database_url: str, kafka_bootstrap: str, topic: str, pg: asyncpg.Connection, mode: EnvelopeMode
) -> None:
    events = sample_events(topic)
    await commit_events(database_url, events)
    rows = await pending_rows(pg)
    publisher = KafkaPublisher(kafka_bootstrap, encoder=Encoder(mode, source=SOURCE))
    assert (await pg_relay(database_url, publisher).drain()).delivered == len(events)
    records = await read_records(kafka_bootstrap, topic, len(events))
    assert len(records) == len(events)
    for record in records:
        back = Envelope.from_kafka(record.topic, record.key, record.value, record.headers)
        row = rows[back.id]
        check_envelope(back, row, topic, mode)
        # The record's time is the event's, not the relay's (five hours apart for the first).
        assert record.timestamp == (row["created_at"] - datetime(1970, 1, 1, tzinfo=UTC)) // (
            timedelta(milliseconds=1)
        )
        headers = dict(record.headers)
        assert headers["content-type"] == (
            b"application/cloudevents+json"
            if mode == "cloudevents-structured"
            else b"application/json"
        )
        if mode == "faststream":
            assert headers["message_id"] == str(row["id"]).encode()
            assert headers["correlation_id"] == (
                json.loads(row["headers"]).get("correlation_id", str(row["id"])).encode()
            )
        if mode in CE_MODES:
            expected = expected_attributes(
                row["id"],
                row["seq"],
                row["key"],
                row["event_type"],
                topic,
                row["created_at"],
                json.loads(row["headers"]),
            )
            for attributes, data in parse_with_sdk(mode, record.key, record.value, headers):
                assert attributes == expected
                assert data == back.json()


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("mode", MODES)
async def test_redis_entries_in_each_mode(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection, mode: EnvelopeMode
) -> None:
    events = sample_events(topic)
    await commit_events(database_url, events)
    rows = await pending_rows(pg)
    publisher = RedisPublisher(redis_url, encoder=Encoder(mode, source=SOURCE))
    assert (await pg_relay(database_url, publisher).drain()).delivered == len(events)
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: Entries = await client.xrange(topic)  # type: ignore[assignment]
    finally:
        await client.aclose()
    assert len(entries) == len(events)
    for _, fields in entries:
        back = Envelope.from_redis(topic, fields)
        check_envelope(back, rows[back.id], topic, mode)


@pytest.mark.redis
@pytest.mark.postgres
async def test_envelope_settings_reach_the_publisher(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    """`envelope`, `envelope_topics` and `source` through RelaySettings and the factory."""
    other = f"{topic}-other"
    await commit_events(
        database_url,
        [OutboxEvent(topic=t, key="k", payload={"order_id": 1}) for t in (topic, other)],
    )
    settings = RelaySettings(
        database_url=database_url,
        broker="redis",
        redis_url=redis_url,
        envelope="faststream",
        envelope_topics=f"{topic}=cloudevents-binary",
        source="/shop/checkout",
    )
    assert (await build_relay(settings).drain()).delivered == 2
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: Entries = await client.xrange(topic)  # type: ignore[assignment]
        [(_, binary)] = entries
        entries = await client.xrange(other)  # type: ignore[assignment]
        [(_, faststream)] = entries
        await client.delete(other)
    finally:
        await client.aclose()
    assert (binary[b"ce_source"], binary[b"ce_type"]) == (b"/shop/checkout", topic.encode())
    assert list(faststream) == [b"__data__"]


@pytest.mark.unit
def test_not_an_outbox_entry_is_a_value_error() -> None:
    with pytest.raises(ValueError, match="not an event of the outbox relay"):
        Envelope.from_redis("orders", {b"seq": b"1", b"other": b"x"})


# -- the Redis protocol bytes: the fast path is the generic one --------------------------------
_text = st.text(st.characters(codec="utf-8", exclude_categories=["Cs"]), max_size=20)
_events = st.builds(
    Envelope,
    seq=st.integers(1, 2**62),
    id=st.uuids(),
    topic=st.sampled_from(["orders", "payments"]),
    key=st.none() | _text,
    payload=st.binary(max_size=60),
    headers=st.dictionaries(_text.filter(bool), _text, max_size=3),
    event_type=st.none() | _text,
    created_at=st.none()
    | st.datetimes(timezones=st.sampled_from([UTC, timezone(timedelta(hours=5, minutes=30))])),
)


@pytest.mark.unit
@settings(max_examples=300, deadline=None)
@given(event=_events, mode=st.sampled_from(MODES), maxlen=st.none() | st.integers(1, 10**6))
def test_the_xadd_bytes_are_the_fields_in_the_redis_protocol(
    event: Envelope, mode: EnvelopeMode, maxlen: int | None
) -> None:
    """`stream_resp` (and plain mode's own, built straight from the event) and the publisher's
    XADD give the bytes of `stream_fields` encoded the general way."""
    encoder = Encoder(mode)
    fields = encoder.stream_fields(event)
    assert encoder.stream_resp(event) == (len(fields), resp_bulk(fields))
    publisher = RedisPublisher("redis://127.0.0.1:1/0", maxlen=maxlen, encoder=encoder)
    trim = [b"MAXLEN", b"~", str(maxlen).encode()] if maxlen else []
    expected = resp_command([b"XADD", b"s", *trim, b"*", *fields])
    assert publisher._command(event, b"s") == expected
