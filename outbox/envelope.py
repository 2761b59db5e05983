"""The envelope: what the relay publishes, and how it maps onto Kafka records and Redis fields.

Consumers can use `Envelope.from_kafka` / `Envelope.from_redis` to read what the relay wrote.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

#: Kafka header names / Redis field names the relay sets besides the user's headers.
HEADER_ID = "outbox-id"
HEADER_SEQ = "outbox-seq"
HEADER_EVENT_TYPE = "outbox-event-type"
HEADER_CREATED_AT = "outbox-created-at"
#: The prefix of the relay's own header names: applications may not use it.
RESERVED_PREFIX = "outbox-"


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
        out = [(HEADER_ID, str(self.id).encode()), (HEADER_SEQ, str(self.seq).encode())]
        if self.event_type is not None:
            out.append((HEADER_EVENT_TYPE, self.event_type.encode()))
        if self.created_at is not None:
            out.append((HEADER_CREATED_AT, self.created_at.isoformat().encode()))
        # A relay header name in the row (written by raw SQL) never shadows the relay's own.
        out.extend(
            (name, value.encode())
            for name, value in self.headers.items()
            if not name.startswith(RESERVED_PREFIX)
        )
        return out

    def redis_fields(self) -> dict[str, bytes | str]:
        fields: dict[str, bytes | str] = {"id": str(self.id), "seq": str(self.seq)}
        if self.key is not None:
            fields["key"] = self.key
        if self.event_type is not None:
            fields["type"] = self.event_type
        if self.created_at is not None:
            fields["created_at"] = self.created_at.isoformat()
        if self.headers:
            fields["headers"] = json.dumps(self.headers, separators=(",", ":"))
        fields["payload"] = self.payload
        return fields

    @classmethod
    def from_kafka(
        cls,
        topic: str,
        key: bytes | None,
        value: bytes,
        headers: Sequence[tuple[str, bytes]],
    ) -> Envelope:
        meta: dict[str, str] = {}
        for name, raw in headers:
            meta.setdefault(name, raw.decode())  # the first one, the relay's, wins
        created = meta.pop(HEADER_CREATED_AT, None)
        return cls(
            seq=int(meta.pop(HEADER_SEQ)),
            id=uuid.UUID(meta.pop(HEADER_ID)),
            topic=topic,
            key=key.decode() if key is not None else None,
            payload=value,
            event_type=meta.pop(HEADER_EVENT_TYPE, None),
            created_at=datetime.fromisoformat(created) if created else None,
            headers=meta,
        )

    @classmethod
    def from_redis(cls, stream: str, fields: Mapping[bytes, bytes]) -> Envelope:
        text = {k.decode(): v for k, v in fields.items()}
        created = text.get("created_at")
        headers = text.get("headers")
        key = text.get("key")
        event_type = text.get("type")
        return cls(
            seq=int(text["seq"]),
            id=uuid.UUID(text["id"].decode()),
            topic=stream,
            key=key.decode() if key is not None else None,
            payload=text["payload"],
            headers=json.loads(headers) if headers is not None else {},
            event_type=event_type.decode() if event_type is not None else None,
            created_at=datetime.fromisoformat(created.decode()) if created else None,
        )
