"""Checks applied to every `OutboxEvent` field before it can reach the table."""

from __future__ import annotations

import json
import os
import re
from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from pydantic import BaseModel

from outbox.envelope import RESERVED_PREFIX
from outbox.errors import OutboxValidationError

#: Kafka's legal topic characters and length limit (also applied to Redis stream names).
TOPIC_PATTERN = re.compile(r"[A-Za-z0-9._-]+")
MAX_TOPIC_LENGTH = 249
#: Longest accepted key, in characters. Keys are hashed for ordering, not meant to carry data.
MAX_KEY_LENGTH = 1024
MAX_EVENT_TYPE_LENGTH = 255
#: Longest consumer name of the inbox (`outbox.inbox.once`).
MAX_CONSUMER_LENGTH = 255
MAX_HEADER_COUNT = 64
MAX_HEADER_NAME_LENGTH = 255
#: Names and values of all headers together, in UTF-8 bytes (Kafka headers ride in the record).
MAX_HEADERS_BYTES = 64 * 1024
#: The latest `available_at` accepted: a delayed event holds back its key's later events.
MAX_DELAY = timedelta(days=366)
#: Header names the relay writes itself; applications may not set them.
RESERVED_HEADER_PREFIX = RESERVED_PREFIX
#: Default payload limit (1 MiB of UTF-8 JSON); override with OUTBOX_MAX_PAYLOAD_BYTES.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
#: Keys are hashed into this many buckets (by Postgres, migration 0004); a relay leases
#: buckets, so one key has one owner.
BUCKETS = 64
#: A JSON-escaped NUL (\u0000) not itself escaped: Postgres jsonb cannot store it.
_ESCAPED_NUL = re.compile(r"(?<!\\)(?:\\\\)*\\u0000")
#: A float that Python's JSON writes with an exponent (1e+300); maybe in a string, too.
_EXPONENT = re.compile(r"\de[+-]\d")


def max_payload_bytes() -> int:
    raw = os.environ.get("OUTBOX_MAX_PAYLOAD_BYTES")
    if raw is None:
        return DEFAULT_MAX_PAYLOAD_BYTES
    try:
        value = int(raw)
    except ValueError:
        raise OutboxValidationError(
            "OUTBOX_MAX_PAYLOAD_BYTES", f"must be a positive integer, got {raw!r}"
        ) from None
    if value <= 0:
        raise OutboxValidationError("OUTBOX_MAX_PAYLOAD_BYTES", f"must be positive, got {value}")
    return value


def check_topic(topic: object) -> str:
    if not isinstance(topic, str):
        raise OutboxValidationError("topic", f"must be a str, got {type(topic).__name__}")
    if not topic:
        raise OutboxValidationError("topic", "must not be empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise OutboxValidationError(
            "topic", f"is {len(topic)} characters long, the limit is {MAX_TOPIC_LENGTH}"
        )
    if topic in (".", ".."):
        raise OutboxValidationError("topic", f"{topic!r} is not a legal topic name")
    if not TOPIC_PATTERN.fullmatch(topic):
        raise OutboxValidationError(
            "topic", f"{topic!r} may contain only ASCII letters, digits, '.', '_' and '-'"
        )
    return topic


def check_key(key: object) -> str | None:
    if key is None:
        return None
    if not isinstance(key, str):
        raise OutboxValidationError("key", f"must be a str or None, got {type(key).__name__}")
    if not key:
        raise OutboxValidationError("key", "must not be empty (use None for no ordering key)")
    if len(key) > MAX_KEY_LENGTH:
        raise OutboxValidationError(
            "key", f"is {len(key)} characters long, the limit is {MAX_KEY_LENGTH}"
        )
    _check_text("key", key)
    return key


def check_event_type(event_type: object) -> str | None:
    if event_type is None:
        return None
    if not isinstance(event_type, str) or not event_type:
        raise OutboxValidationError("event_type", "must be a non-empty str or None")
    if len(event_type) > MAX_EVENT_TYPE_LENGTH:
        raise OutboxValidationError(
            "event_type",
            f"is {len(event_type)} characters long, the limit is {MAX_EVENT_TYPE_LENGTH}",
        )
    _check_text("event_type", event_type)
    return event_type


def check_headers(headers: object) -> dict[str, str]:
    if headers is None:
        return {}
    if not isinstance(headers, Mapping):
        raise OutboxValidationError("headers", f"must be a mapping, got {type(headers).__name__}")
    if len(headers) > MAX_HEADER_COUNT:
        raise OutboxValidationError(
            "headers", f"has {len(headers)} entries, the limit is {MAX_HEADER_COUNT}"
        )
    checked: dict[str, str] = {}
    size = 0
    for name, value in headers.items():
        if not isinstance(name, str) or not name:
            raise OutboxValidationError("headers", f"name {name!r} must be a non-empty str")
        if len(name) > MAX_HEADER_NAME_LENGTH:
            raise OutboxValidationError("headers", f"name {name[:40]!r}... is too long")
        if name.lower().startswith(RESERVED_HEADER_PREFIX):
            raise OutboxValidationError(
                "headers", f"name {name!r} uses the reserved prefix {RESERVED_HEADER_PREFIX!r}"
            )
        if not isinstance(value, str):
            raise OutboxValidationError(
                "headers", f"value of {name!r} must be a str, got {type(value).__name__}"
            )
        _check_text(f"headers[{name!r}]", name + value)
        size += (
            len(name) + len(value)
            if (name + value).isascii()
            else len((name + value).encode("utf-8"))
        )
        checked[name] = value
    if size > MAX_HEADERS_BYTES:
        raise OutboxValidationError(
            "headers", f"are {size} bytes in all, the limit is {MAX_HEADERS_BYTES}"
        )
    return checked


def check_payload(payload: object) -> tuple[Any, str]:
    """Return the JSON-ready payload and its JSON text, spaced as Postgres renders jsonb
    (`{"a": [1, 2]}`): that text, not a compact one, is what the relay publishes, so it is
    what the size limit counts, numbers written in full included (`_numbers_in_full`)."""
    if isinstance(payload, BaseModel):
        payload = payload.model_dump(mode="json")
    if not isinstance(payload, dict | list):
        raise OutboxValidationError(
            "payload", f"must be a dict, a list or a pydantic model, got {type(payload).__name__}"
        )
    try:
        encoded = json.dumps(payload, allow_nan=False, ensure_ascii=False)
    except (TypeError, ValueError) as exc:
        raise OutboxValidationError("payload", f"is not JSON-serialisable: {exc}") from None
    except RecursionError:
        raise OutboxValidationError("payload", "is nested too deeply to encode") from None
    # The substring test first: the regex (is that \u0000 itself escaped?) is the slow part.
    if "\\u0000" in encoded and _ESCAPED_NUL.search(encoded):
        raise OutboxValidationError("payload", "contains a NUL character, which Postgres rejects")
    if encoded.isascii():  # O(1) in CPython; an ASCII str is its own UTF-8
        size = len(encoded)
    else:
        try:
            size = len(encoded.encode("utf-8"))
        except UnicodeEncodeError:
            raise OutboxValidationError(
                "payload", "contains a lone surrogate; not valid UTF-8"
            ) from None
    if "-0.0" in encoded or _EXPONENT.search(encoded):
        size += _numbers_in_full(payload)
    limit = max_payload_bytes()
    if size > limit:
        raise OutboxValidationError(
            "payload",
            f"is {size} bytes as JSON (as published), the limit is {limit} "
            "(OUTBOX_MAX_PAYLOAD_BYTES)",
        )
    return payload, encoded


def _numbers_in_full(value: object) -> int:
    """How many more bytes jsonb's text has than Python's JSON for the floats in `value`:
    jsonb keeps numbers as `numeric`, written without exponent (1e+300 is 301 digits, 1.5e-07
    is 0.00000015), and it has no negative zero (-0.0 is 0.0)."""
    extra = 0
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.values())
        elif isinstance(item, list | tuple):
            stack.extend(item)
        elif isinstance(item, float):
            text = repr(item)
            if "e" in text:
                extra += len(format(Decimal(text), "f")) - len(text)
            elif item == 0 and text[0] == "-":
                extra -= 1
    return extra


def check_available_at(value: object) -> datetime:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise OutboxValidationError("available_at", "must be a timezone-aware datetime")
    latest = datetime.now(UTC) + MAX_DELAY
    if value > latest:
        raise OutboxValidationError(
            "available_at",
            f"{value.isoformat()} is later than now + {MAX_DELAY.days} days; a delayed event "
            "holds back the later events of its key until then",
        )
    return value


def _is_utf8(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _check_text(field: str, text: str) -> None:
    if "\x00" in text:
        raise OutboxValidationError(field, "contains a NUL character, which Postgres rejects")
    if not _is_utf8(text):
        raise OutboxValidationError(field, "contains a lone surrogate; it is not valid UTF-8")
