"""The envelope: what the relay publishes, and how it maps onto Kafka records and Redis stream
entries in each envelope mode (docs/consumers.md has the tables and a consumer per stack).

- `plain` (the default): the value is the payload; the metadata rides in `outbox-*` headers
  and `content-type`.
- `faststream`: the framing FastStream itself writes (`content-type`, `message_id`,
  `correlation_id` headers; on Redis one `__data__` field in FastStream's binary message
  format), so that a typed FastStream subscriber reads the payload as its body.
- `cloudevents-binary`: CloudEvents 1.0, Kafka protocol binding, binary content mode: `ce_*`
  headers, the payload as the value.
- `cloudevents-structured`: the value is the event as `application/cloudevents+json`.

A Redis stream entry has the Kafka record's headers as its fields, with the same names, plus
the value (`outbox-payload` in plain mode, `data` in the CloudEvents modes) and, in plain mode,
the key (`outbox-key`); in faststream mode it is FastStream's one `__data__` field. Every mode
passes the application's headers on, except names the mode writes itself: the relay's win.

`Encoder` runs in the relay's hot path, once per event: bytes and string work only. Consumers
read every mode back with `Envelope.from_kafka`, `Envelope.from_redis` and
`Envelope.from_redis_message` (pub/sub).
"""

from __future__ import annotations

import json
import struct
import typing
import uuid
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, tzinfo
from json.encoder import encode_basestring  # in C; keeps non-ASCII text as it is
from typing import Any, Literal

#: The envelope modes (the relay's `envelope` setting).
EnvelopeMode = Literal["plain", "faststream", "cloudevents-binary", "cloudevents-structured"]
MODES: tuple[EnvelopeMode, ...] = typing.get_args(EnvelopeMode)

#: Header names (Redis field names) of the plain mode, besides the application's headers.
HEADER_ID = "outbox-id"
HEADER_SEQ = "outbox-seq"
HEADER_EVENT_TYPE = "outbox-event-type"
HEADER_CREATED_AT = "outbox-created-at"
#: Set on an event that `outbox-relay republish` put back into the outbox (every envelope
#: mode): when it was republished, ISO-8601. A first delivery never has it.
HEADER_REPUBLISHED_AT = "outbox-republished-at"
#: Redis only: what Kafka carries as the record's key and value.
FIELD_KEY = "outbox-key"
FIELD_PAYLOAD = "outbox-payload"
#: The prefix of the relay's own header names: applications may not use it.
RESERVED_PREFIX = "outbox-"

CONTENT_TYPE = "content-type"
JSON_TYPE = "application/json"
CLOUDEVENTS_JSON = "application/cloudevents+json"

#: FastStream's header names, and its Redis stream field.
FASTSTREAM_MESSAGE_ID = "message_id"
FASTSTREAM_CORRELATION_ID = "correlation_id"
FASTSTREAM_DATA = "__data__"
#: FastStream's binary message format, version 1: this prefix, the version (u16), the offsets
#: of the header count and of the data (u32), the header count (u16), then per header its
#: name and its value, each as a u16 length and UTF-8 bytes, then the data. Big-endian.
FASTSTREAM_MAGIC = b"\x89BIN\r\n\x1a\n"

#: CloudEvents: the Kafka binding's attribute prefix, the version, the relay's extension.
CE_PREFIX = "ce_"
CE_SPECVERSION = "1.0"
CE_SEQ = "outboxseq"
#: The application's headers that also become extension attributes (they stay headers).
CE_EXTENSIONS = {
    "correlation_id": "correlationid",
    "traceparent": "traceparent",
    "tracestate": "tracestate",
}
#: The Redis field with the data (binary mode) or the whole event (structured mode).
CE_DATA_FIELD = "data"

#: The CloudEvents `source` when none is given.
DEFAULT_SOURCE = "/outbox"

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_MS = timedelta(milliseconds=1)
_U16 = struct.Struct(">H")
_FASTSTREAM_HEAD = struct.Struct(">8sHIIH")
_FASTSTREAM_HEADERS_AT = 18  # the magic, the version and the two offsets come first


@dataclass(slots=True)
class Envelope:
    """One claimed event, ready to publish. `payload` is the UTF-8 JSON text as bytes.

    Treat it as read-only. (Not `frozen`: a frozen dataclass builds through object.__setattr__,
    and building envelopes was a sixth of the relay's CPU in profiles.)"""

    seq: int
    id: uuid.UUID
    topic: str
    key: str | None
    payload: bytes
    headers: Mapping[str, str] = field(default_factory=dict)
    event_type: str | None = None
    created_at: datetime | None = None
    attempts: int = 0

    def json(self) -> Any:
        return json.loads(self.payload)

    def kafka_headers(self) -> list[tuple[str, bytes]]:
        """The Kafka headers of the plain mode."""
        return _PLAIN.headers(self)

    def redis_fields(self) -> dict[str, bytes]:
        """The Redis stream fields of the plain mode."""
        flat = _PLAIN.stream(self)
        return {flat[i].decode(): flat[i + 1] for i in range(0, len(flat), 2)}

    @classmethod
    def from_kafka(
        cls,
        topic: str,
        key: bytes | None,
        value: bytes | None,
        headers: Sequence[tuple[str, bytes | None]],
    ) -> Envelope:
        """The event of a record the relay wrote, in any envelope mode. ValueError if the
        record is none of them. A header name given twice: the first (the relay's) wins."""
        meta: dict[str, str] = {}
        for name, raw in headers:
            meta.setdefault(name, raw.decode() if raw is not None else "")
        return _decode(topic, key.decode() if key is not None else None, value or b"", meta)

    @classmethod
    def from_redis(cls, stream: str, fields: Mapping[bytes, bytes] | Mapping[str, str]) -> Envelope:
        """The event of a stream entry the relay wrote, in any envelope mode, and in the plain
        fields of earlier versions (`id`, `seq`, `key`, `type`, `created_at`, `headers`,
        `payload`). Takes bytes (redis-py's default) or str (`decode_responses=True`)."""
        raw = {
            (name.decode() if isinstance(name, bytes) else name): (
                value if isinstance(value, bytes) else value.encode()
            )
            for name, value in fields.items()
        }
        if FASTSTREAM_DATA in raw:
            return _from_faststream(stream, raw[FASTSTREAM_DATA])
        if CONTENT_TYPE not in raw:  # every mode writes one, but the fields of before
            return _from_old_fields(stream, raw)
        value = raw.pop(FIELD_PAYLOAD, None)
        if value is None:
            value = raw.pop(CE_DATA_FIELD, b"")
        meta = {name: text.decode() for name, text in raw.items()}
        return _decode(stream, None, value, meta, key_from_subject=True)

    @classmethod
    def from_redis_message(cls, channel: str, message: bytes | str) -> Envelope:
        """The event of a pub/sub message the relay published, in any envelope mode."""
        data = message.encode() if isinstance(message, str) else message
        if data.startswith(FASTSTREAM_MAGIC):
            return _from_faststream(channel, data)
        document = json.loads(data)
        if isinstance(document.get("headers"), dict) and "data" in document:  # FastStream's JSON
            return _from_faststream(channel, data)
        return cls.from_redis(channel, document)


def kafka_timestamp(event: Envelope) -> int | None:
    """The record's timestamp: `created_at` in milliseconds since the epoch (exact)."""
    created = event.created_at
    return None if created is None else _instant(created)[1]


def epoch_seconds(when: datetime) -> float:
    """`when.timestamp()`, a naive `when` read as UTC (as the envelope's timestamps are)."""
    return (when if when.tzinfo is not None else when.replace(tzinfo=UTC)).timestamp()


async def faststream_parser(message: Any, parse: Callable[[Any], Awaitable[Any]]) -> Any:
    """A FastStream `parser=` that takes `message_id` from the `message_id` header.

    FastStream's Kafka parser makes it "offset-timestamp" whatever the headers say (the same
    for records of two partitions); its Redis parser reads the header already. Pass it to the
    broker (`KafkaBroker(..., parser=faststream_parser)`) or to a subscriber."""
    parsed = await parse(message)
    parsed.message_id = parsed.headers.get(FASTSTREAM_MESSAGE_ID, parsed.message_id)
    return parsed


# -- encoding: the relay's side ----------------------------------------------------------------


_JSON_HEADER = (CONTENT_TYPE, JSON_TYPE.encode())


class _Framing:
    """One envelope mode: an event's Kafka headers and value, its Redis stream fields and its
    pub/sub message."""

    #: Header names (lower case) the mode writes itself: the application's are not passed on.
    taken: frozenset[str] = frozenset({CONTENT_TYPE})
    #: Prefixes (lower case) that the application's header names may not have.
    reserved: tuple[str, ...] = (RESERVED_PREFIX,)
    #: Redis fields of the value, and of the key (None: the key is in the headers already).
    value_field = FIELD_PAYLOAD.encode()
    key_field: bytes | None = None

    def __init__(self, source: str = DEFAULT_SOURCE) -> None:
        self.source = source

    def headers(self, event: Envelope) -> list[tuple[str, bytes]]:
        raise NotImplementedError

    def value(self, event: Envelope) -> bytes:
        return event.payload

    def user_headers(self, headers: Mapping[str, str]) -> list[tuple[str, bytes]]:
        taken, reserved = self.taken, self.reserved
        return [
            (name, value.encode())
            for name, value in headers.items()
            if (low := name.lower()) not in taken
            and (not low.startswith(reserved) or low == HEADER_REPUBLISHED_AT)
        ]

    def stream(self, event: Envelope) -> list[bytes]:
        flat: list[bytes] = []
        for name, value in self.headers(event):
            flat += (name.encode(), value)
        if self.key_field is not None and event.key is not None:
            flat += (self.key_field, event.key.encode())
        flat += (self.value_field, self.value(event))
        return flat

    def stream_resp(self, event: Envelope) -> tuple[int, bytes]:
        """`stream(event)` in the Redis protocol, for XADD: how many bulk strings, and them.
        Built from the headers, with each field name's bulk string made once."""
        bulk = b"$%d\r\n%s\r\n"
        parts: list[bytes] = []
        headers = self.headers(event)
        for name, value in headers:
            parts += (_resp_field(name), bulk % (len(value), value))
        count = 2 * len(headers) + 2
        if self.key_field is not None and event.key is not None:
            key = event.key.encode()
            field = self.key_field
            parts += (bulk % (len(field), field), bulk % (len(key), key))
            count += 2
        value = self.value(event)
        field = self.value_field
        parts += (bulk % (len(field), field), bulk % (len(value), value))
        return count, b"".join(parts)

    def pubsub(self, event: Envelope) -> bytes:
        """The stream entry's fields as one JSON object of strings."""
        flat = self.stream(event)
        document = {flat[i].decode(): flat[i + 1].decode() for i in range(0, len(flat), 2)}
        return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


def iso_bytes(when: datetime) -> bytes:
    """`when` in ISO 8601, encoded."""
    return _instant(when)[0]


#: The last `created_at` converted, and its ISO 8601 bytes and epoch milliseconds. A claim
#: is in commit order, so the events of one transaction (they share `created_at`) come
#: together: one conversion per transaction. (A datetime's hash, which an lru_cache needs,
#: cost more than the conversion.)
_last_instant: tuple[datetime, bytes, int] = (_EPOCH, _EPOCH.isoformat().encode(), 0)
#: The ISO 8601 bytes of the last second converted, around the fraction: (tzinfo, fold, epoch
#: second, bytes up to the seconds, the offset). Events committed within one second differ
#: only in their fraction: `isoformat` cost 0.7 of the 1.2 us an event took when every
#: event had a `created_at` of its own (one event per transaction).
_last_second: tuple[tzinfo | None, int, int, bytes, bytes] = (UTC, 0, 0, b"", b"")


def _instant(when: datetime) -> tuple[bytes, int]:
    global _last_instant, _last_second  # one-entry caches
    last = _last_instant
    zone = when.tzinfo
    # Same tzinfo object: equal values print alike (no offset of their own to compare).
    if zone is last[0].tzinfo and when == last[0] and when.fold == last[0].fold:
        return last[1], last[2]
    ms = ((when if zone is not None else when.replace(tzinfo=UTC)) - _EPOCH) // _MS
    second, fraction = ms // 1000, when.microsecond
    head = _last_second
    if zone is not head[0] or second != head[2] or when.fold != head[1]:
        # Same zone, same instant to the second: the same wall time and offset.
        text = when.isoformat().encode()
        head = (zone, when.fold, second, text[:19], text[26:] if fraction else text[19:])
        _last_second = head
    iso = head[3] + b".%06d" % fraction + head[4] if fraction else head[3] + head[4]
    _last_instant = (when, iso, ms)
    return iso, ms


def resp_bulk(args: Sequence[bytes]) -> bytes:
    """`args` as Redis protocol bulk strings (the elements of a command's array)."""
    parts: list[bytes] = []
    add = parts.append
    for arg in args:
        add(b"$%d\r\n" % len(arg))
        add(arg)
        add(b"\r\n")
    return b"".join(parts)


def _resp_name(name: str) -> bytes:
    return resp_bulk([name.encode()])


#: Field names as Redis bulk strings. Bounded: applications choose header names.
_RESP_FIELDS: dict[str, bytes] = {}


def _resp_field(name: str) -> bytes:
    found = _RESP_FIELDS.get(name)
    if found is None:
        if len(_RESP_FIELDS) >= 4096:
            _RESP_FIELDS.clear()
        found = _RESP_FIELDS[name] = _resp_name(name)
    return found


class _Plain(_Framing):
    key_field = FIELD_KEY.encode()
    #: The fields' names and the content type, in the Redis protocol once (`stream_resp`).
    _ID = _resp_name(HEADER_ID)
    _SEQ = _resp_name(HEADER_SEQ)
    _JSON = resp_bulk([_JSON_HEADER[0].encode(), _JSON_HEADER[1]])
    _TYPE = _resp_name(HEADER_EVENT_TYPE)
    _CREATED = _resp_name(HEADER_CREATED_AT)
    _KEY = _resp_name(FIELD_KEY)
    _PAYLOAD = _resp_name(FIELD_PAYLOAD)

    def stream_resp(self, event: Envelope) -> tuple[int, bytes]:
        """As `_Framing.stream_resp`, built straight from the event (the default mode's hot
        path: a third of the Redis publisher's time per event went to building the fields and
        then encoding them)."""
        bulk = b"$%d\r\n%s\r\n"
        seq = b"%d" % event.seq
        parts = [self._ID, b"$36\r\n%s\r\n" % str(event.id).encode()]
        parts += (self._SEQ, bulk % (len(seq), seq), self._JSON)
        count = 6
        if event.event_type is not None:
            value = event.event_type.encode()
            parts += (self._TYPE, bulk % (len(value), value))
            count += 2
        if event.created_at is not None:
            value = iso_bytes(event.created_at)
            parts += (self._CREATED, bulk % (len(value), value))
            count += 2
        if event.headers:
            for name, value in self.user_headers(event.headers):
                parts.append(resp_bulk([name.encode(), value]))
                count += 2
        if event.key is not None:
            value = event.key.encode()
            parts += (self._KEY, bulk % (len(value), value))
            count += 2
        parts += (self._PAYLOAD, bulk % (len(event.payload), event.payload))
        return count + 2, b"".join(parts)

    def headers(self, event: Envelope) -> list[tuple[str, bytes]]:
        out = [(HEADER_ID, str(event.id).encode()), (HEADER_SEQ, b"%d" % event.seq), _JSON_HEADER]
        if event.event_type is not None:
            out.append((HEADER_EVENT_TYPE, event.event_type.encode()))
        if event.created_at is not None:
            out.append((HEADER_CREATED_AT, iso_bytes(event.created_at)))
        if event.headers:
            out += self.user_headers(event.headers)
        return out


_FASTSTREAM_DATA_RESP = resp_bulk([FASTSTREAM_DATA.encode()])


class _FastStream(_Framing):
    taken = frozenset({CONTENT_TYPE, FASTSTREAM_MESSAGE_ID, FASTSTREAM_CORRELATION_ID})

    def headers(self, event: Envelope) -> list[tuple[str, bytes]]:
        event_id = str(event.id).encode()
        given = event.headers.get(FASTSTREAM_CORRELATION_ID) if event.headers else None
        out = [
            _JSON_HEADER,
            (FASTSTREAM_MESSAGE_ID, event_id),
            (FASTSTREAM_CORRELATION_ID, given.encode() if given else event_id),
            (HEADER_SEQ, b"%d" % event.seq),
        ]
        if event.event_type is not None:
            out.append((HEADER_EVENT_TYPE, event.event_type.encode()))
        if event.created_at is not None:
            out.append((HEADER_CREATED_AT, iso_bytes(event.created_at)))
        if event.headers:
            out += self.user_headers(event.headers)
        return out

    @staticmethod
    def _packed(name: str) -> bytes:
        encoded = name.encode()
        return _U16.pack(len(encoded)) + encoded

    _CONSTANT = _packed(CONTENT_TYPE) + _packed(JSON_TYPE)
    _MESSAGE_ID = _packed(FASTSTREAM_MESSAGE_ID) + _U16.pack(36)
    _CORRELATION_ID = _packed(FASTSTREAM_CORRELATION_ID) + _U16.pack(36)
    _SEQ = _packed(HEADER_SEQ)
    _TYPE = _packed(HEADER_EVENT_TYPE)
    _CREATED = _packed(HEADER_CREATED_AT)
    _KEY = _packed(FIELD_KEY)

    def message(self, event: Envelope) -> bytes:
        """FastStream's binary message: the headers (and `outbox-key`) and the payload."""
        if not event.headers:  # the hot path: the constant parts packed once
            fast = self._message_without_headers(event)
            if fast is not None:
                return fast
        return self._message(event)

    def _message_without_headers(self, event: Envelope) -> bytes | None:
        """`_message` for an event without headers of its own; None: a value is too long
        for the binary format."""
        pack = _U16.pack
        event_id = str(event.id).encode()
        seq = b"%d" % event.seq
        parts = [self._CONSTANT, self._MESSAGE_ID, event_id, self._CORRELATION_ID, event_id]
        parts += (self._SEQ, pack(len(seq)), seq)
        optional = (
            (self._TYPE, event.event_type.encode() if event.event_type is not None else None),
            (self._CREATED, iso_bytes(event.created_at) if event.created_at else None),
            (self._KEY, event.key.encode() if event.key is not None else None),
        )
        count = 4
        for name, value in optional:
            if value is not None:
                if len(value) > 0xFFFF:
                    return None
                parts += (name, pack(len(value)), value)
                count += 1
        blob = b"".join(parts)
        data_at = _FASTSTREAM_HEADERS_AT + 2 + len(blob)
        head = _FASTSTREAM_HEAD.pack(FASTSTREAM_MAGIC, 1, _FASTSTREAM_HEADERS_AT, data_at, count)
        return b"".join((head, blob, event.payload))

    def _message(self, event: Envelope) -> bytes:
        headers = self.headers(event)
        if event.key is not None:
            headers.append((FIELD_KEY, event.key.encode()))
        parts: list[bytes] = []
        pack = _U16.pack
        for name, value in headers:
            encoded = name.encode()
            if len(value) > 0xFFFF or len(encoded) > 0xFFFF:
                return _faststream_json(headers, event.payload)  # too long for the format
            parts += (pack(len(encoded)), encoded, pack(len(value)), value)
        blob = b"".join(parts)
        data_at = _FASTSTREAM_HEADERS_AT + 2 + len(blob)
        head = _FASTSTREAM_HEAD.pack(
            FASTSTREAM_MAGIC, 1, _FASTSTREAM_HEADERS_AT, data_at, len(headers)
        )
        return b"".join((head, blob, event.payload))

    def stream(self, event: Envelope) -> list[bytes]:
        return [FASTSTREAM_DATA.encode(), self.message(event)]

    def stream_resp(self, event: Envelope) -> tuple[int, bytes]:
        message = self.message(event)
        return 2, b"".join((_FASTSTREAM_DATA_RESP, b"$%d\r\n" % len(message), message, b"\r\n"))

    def pubsub(self, event: Envelope) -> bytes:
        return self.message(event)


def _faststream_json(headers: list[tuple[str, bytes]], payload: bytes) -> bytes:
    """FastStream's JSON message format (it reads both): no length limit on a header."""
    document = {
        "data": payload.decode(),
        "headers": {name: value.decode() for name, value in headers},
    }
    return json.dumps(document, separators=(",", ":"), ensure_ascii=False).encode()


class _CloudEventsBinary(_Framing):
    taken = frozenset({CONTENT_TYPE, CE_DATA_FIELD})
    reserved = (RESERVED_PREFIX, CE_PREFIX)
    value_field = CE_DATA_FIELD.encode()

    def __init__(self, source: str = DEFAULT_SOURCE) -> None:
        super().__init__(source)
        self._constant = [
            (CE_PREFIX + "specversion", CE_SPECVERSION.encode()),
            (CE_PREFIX + "source", source.encode()),
            _JSON_HEADER,  # the binding's datacontenttype
        ]
        self._constant_resp = resp_bulk([p for n, v in self._constant for p in (n.encode(), v)])

    def stream_resp(self, event: Envelope) -> tuple[int, bytes]:
        """As `_Framing.stream_resp`, with the constant attributes encoded once (the mode's
        hot path on Redis, as plain mode's own)."""
        if event.headers:
            return super().stream_resp(event)  # extensions and the application's headers
        bulk = b"$%d\r\n%s\r\n"
        kind = (event.event_type or event.topic).encode()
        seq = b"%d" % event.seq
        parts = [
            self._ID_RESP,
            b"$36\r\n%s\r\n" % str(event.id).encode(),
            self._constant_resp,
            self._TYPE_RESP,
            bulk % (len(kind), kind),
            self._SEQ_RESP,
            bulk % (len(seq), seq),
        ]
        count = 2 * (len(self._constant) + 3) + 2
        if event.created_at is not None:
            value = iso_bytes(event.created_at)
            parts += (self._TIME_RESP, bulk % (len(value), value))
            count += 2
        if event.key is not None:
            value = event.key.encode()
            parts += (self._SUBJECT_RESP, bulk % (len(value), value))
            count += 2
        parts += (self._DATA_RESP, bulk % (len(event.payload), event.payload))
        return count, b"".join(parts)

    _ID_RESP = _resp_name("ce_id")
    _TYPE_RESP = _resp_name("ce_type")
    _SEQ_RESP = _resp_name("ce_outboxseq")
    _TIME_RESP = _resp_name("ce_time")
    _SUBJECT_RESP = _resp_name("ce_subject")
    _DATA_RESP = _resp_name(CE_DATA_FIELD)

    def headers(self, event: Envelope) -> list[tuple[str, bytes]]:
        out = [
            ("ce_id", str(event.id).encode()),
            *self._constant,
            ("ce_type", (event.event_type or event.topic).encode()),
            ("ce_outboxseq", b"%d" % event.seq),
        ]
        if event.created_at is not None:
            out.append(("ce_time", iso_bytes(event.created_at)))
        if event.key is not None:
            out.append(("ce_subject", event.key.encode()))
        if event.headers:
            for header, attribute in CE_EXTENSIONS.items():
                value = event.headers.get(header)
                if value:
                    out.append((CE_PREFIX + attribute, value.encode()))
            out += self.user_headers(event.headers)
        return out


class _CloudEventsStructured(_Framing):
    taken = frozenset({CONTENT_TYPE, CE_DATA_FIELD})
    reserved = (RESERVED_PREFIX, CE_PREFIX)
    value_field = CE_DATA_FIELD.encode()

    def __init__(self, source: str = DEFAULT_SOURCE) -> None:
        super().__init__(source)
        self._header = [(CONTENT_TYPE, CLOUDEVENTS_JSON.encode())]
        self._start = (
            '{"specversion":"1.0","source":'
            + encode_basestring(source)
            + ',"datacontenttype":"application/json","id":"'
        ).encode()

    def headers(self, event: Envelope) -> list[tuple[str, bytes]]:
        if event.headers:
            return self._header + self.user_headers(event.headers)
        return self._header

    def value(self, event: Envelope) -> bytes:
        """The event as JSON, built around the payload's own text (never parsed)."""
        parts = [
            str(event.id),
            '","type":',
            encode_basestring(event.event_type or event.topic),
            ',"outboxseq":"',
            str(event.seq),
            '"',
        ]
        if event.created_at is not None:
            parts += (',"time":"', iso_bytes(event.created_at).decode(), '"')
        if event.key is not None:
            parts += (',"subject":', encode_basestring(event.key))
        if event.headers:
            for header, attribute in CE_EXTENSIONS.items():
                value = event.headers.get(header)
                if value:
                    parts += (',"', attribute, '":', encode_basestring(value))
        parts.append(',"data":')
        return b"".join((self._start, "".join(parts).encode(), event.payload, b"}"))


_FRAMINGS: dict[EnvelopeMode, type[_Framing]] = {
    "plain": _Plain,
    "faststream": _FastStream,
    "cloudevents-binary": _CloudEventsBinary,
    "cloudevents-structured": _CloudEventsStructured,
}
_PLAIN = _Plain()


class Encoder:
    """What the relay publishes for each event: in the envelope mode of its topic (`topics`,
    by the event's topic, without the relay's topic prefix), else in `mode`. `source` is the
    CloudEvents source."""

    def __init__(
        self,
        mode: EnvelopeMode = "plain",
        topics: Mapping[str, EnvelopeMode] | None = None,
        source: str = DEFAULT_SOURCE,
    ) -> None:
        self.mode = mode
        self.source = source
        self._default = _FRAMINGS[mode](source)
        self._topics = {topic: _FRAMINGS[m](source) for topic, m in (topics or {}).items()}

    def _framing(self, topic: str) -> _Framing:
        if self._topics:
            return self._topics.get(topic, self._default)
        return self._default

    def kafka(self, event: Envelope) -> tuple[bytes, list[tuple[str, bytes]]]:
        """The record's value and headers (its timestamp: `kafka_timestamp`)."""
        framing = self._framing(event.topic)
        return framing.value(event), framing.headers(event)

    def stream_fields(self, event: Envelope) -> list[bytes]:
        """The stream entry's fields and values, flat, for XADD."""
        return self._framing(event.topic).stream(event)

    def stream_resp(self, event: Envelope) -> tuple[int, bytes]:
        """`stream_fields` in the Redis protocol: how many bulk strings, and them."""
        return self._framing(event.topic).stream_resp(event)

    def pubsub_message(self, event: Envelope) -> bytes:
        return self._framing(event.topic).pubsub(event)


# -- decoding: the consumers' side -------------------------------------------------------------


def _created(text: str | None) -> datetime | None:
    return datetime.fromisoformat(text) if text else None


def _decode(
    topic: str,
    key: str | None,
    value: bytes,
    meta: dict[str, str],
    *,
    key_from_subject: bool = False,
) -> Envelope:
    """The event of a record or entry: `meta` holds its headers (fields), and keeps the
    application's. `key_from_subject`: the key is the `subject` (Redis, CloudEvents)."""
    content_type = meta.pop(CONTENT_TYPE, "")
    if HEADER_ID in meta:
        return _from_meta(topic, key, value, meta, uuid.UUID(meta.pop(HEADER_ID)))
    if CE_PREFIX + "specversion" in meta:
        attributes = {
            name[len(CE_PREFIX) :]: meta.pop(name)
            for name in [n for n in meta if n.startswith(CE_PREFIX)]
        }
        return _from_cloudevent(topic, key, value, meta, attributes, key_from_subject)
    if content_type.startswith(CLOUDEVENTS_JSON):
        document = json.loads(value)
        payload = json.dumps(document.pop("data", None), ensure_ascii=False).encode()
        return _from_cloudevent(topic, key, payload, meta, document, key_from_subject)
    if FASTSTREAM_MESSAGE_ID in meta:
        event_id = meta.pop(FASTSTREAM_MESSAGE_ID)
        if meta.get(FASTSTREAM_CORRELATION_ID) == event_id:
            del meta[FASTSTREAM_CORRELATION_ID]  # the default: not one of the application's
        return _from_meta(topic, key, value, meta, uuid.UUID(event_id))
    raise ValueError(
        f"{topic}: not an event of the outbox relay (no {HEADER_ID}, {FASTSTREAM_MESSAGE_ID} "
        f"or {CE_PREFIX}specversion header, and not {CLOUDEVENTS_JSON})"
    )


def _from_meta(
    topic: str, key: str | None, value: bytes, meta: dict[str, str], event_id: uuid.UUID
) -> Envelope:
    """Plain and faststream: the relay's `outbox-*` headers; the rest are the application's."""
    if key is None:
        key = meta.pop(FIELD_KEY, None)
    return Envelope(
        seq=int(meta.pop(HEADER_SEQ)),
        id=event_id,
        topic=topic,
        key=key,
        payload=value,
        event_type=meta.pop(HEADER_EVENT_TYPE, None),
        created_at=_created(meta.pop(HEADER_CREATED_AT, None)),
        headers=meta,
    )


def _from_cloudevent(
    topic: str,
    key: str | None,
    payload: bytes,
    headers: dict[str, str],
    attributes: Mapping[str, Any],
    key_from_subject: bool,
) -> Envelope:
    if key_from_subject and key is None:
        key = attributes.get("subject")
    return Envelope(
        seq=int(attributes[CE_SEQ]),
        id=uuid.UUID(attributes["id"]),
        topic=topic,
        key=key,
        payload=payload,
        event_type=attributes.get("type"),
        created_at=_created(attributes.get("time")),
        headers=headers,
    )


def parse_faststream_message(message: bytes) -> tuple[bytes, dict[str, str]]:
    """The data and headers of a FastStream message (binary format, or JSON)."""
    if not message.startswith(FASTSTREAM_MAGIC):
        document = json.loads(message)
        return document["data"].encode(), dict(document["headers"])
    _, version, headers_at, data_at, count = _FASTSTREAM_HEAD.unpack_from(message)
    if version != 1:
        raise ValueError(f"FastStream binary message version {version}: only 1 is known")
    headers: dict[str, str] = {}
    at = headers_at + 2
    for _ in range(count):
        texts = []
        for _ in range(2):
            (size,) = _U16.unpack_from(message, at)
            texts.append(message[at + 2 : at + 2 + size].decode())
            at += 2 + size
        headers[texts[0]] = texts[1]
    return message[data_at:], headers


def _from_faststream(stream: str, message: bytes) -> Envelope:
    payload, headers = parse_faststream_message(message)
    return _decode(stream, None, payload, headers)


def _from_old_fields(stream: str, raw: Mapping[str, bytes]) -> Envelope:
    """The plain stream fields of earlier versions."""
    if not {"id", "seq", "payload"} <= raw.keys():
        raise ValueError(f"{stream}: not an event of the outbox relay (no content-type field)")
    created = raw.get("created_at")
    headers = raw.get("headers")
    key = raw.get("key")
    event_type = raw.get("type")
    return Envelope(
        seq=int(raw["seq"]),
        id=uuid.UUID(raw["id"].decode()),
        topic=stream,
        key=key.decode() if key is not None else None,
        payload=raw["payload"],
        headers=json.loads(headers) if headers is not None else {},
        event_type=event_type.decode() if event_type is not None else None,
        created_at=_created(created.decode()) if created else None,
    )
