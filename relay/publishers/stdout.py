"""A publisher with no broker: JSON lines to stdout or to a file. For demos and development."""

from __future__ import annotations

import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from outbox.envelope import Envelope
from outbox.relay.seams import PublishResult


def to_json_line(event: Envelope) -> str:
    return json.dumps(
        {
            "id": str(event.id),
            "seq": event.seq,
            "topic": event.topic,
            "key": event.key,
            "type": event.event_type,
            "headers": dict(event.headers),
            "created_at": event.created_at.isoformat() if event.created_at else None,
            "payload": json.loads(event.payload),
        },
        separators=(",", ":"),
        ensure_ascii=False,
    )


class JsonLinesPublisher:
    name = "stdout"

    def __init__(self, path: str | Path | None = None) -> None:
        self.path = Path(path) if path is not None else None
        self._out: IO[str] | None = None

    async def start(self) -> None:
        self._out = self.path.open("a", encoding="utf-8") if self.path else sys.stdout

    async def stop(self) -> None:
        if self._out is not None:
            self._out.flush()
            if self.path is not None:
                self._out.close()
        self._out = None

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        if self._out is None:
            raise RuntimeError("JsonLinesPublisher.start() was not called")
        self._out.write("".join(to_json_line(e) + "\n" for e in batch))
        self._out.flush()
        return [None] * len(batch)
