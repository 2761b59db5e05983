"""Test doubles behind the two seams: an in-memory store and a fault-injecting publisher."""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime, timedelta

from outbox.envelope import Envelope
from relay.seams import BrokerUnavailableError, Dead, PublishResult, Retry


class FakeClock:
    def __init__(self) -> None:
        self.now = datetime(2026, 1, 1, tzinfo=UTC)

    def __call__(self) -> datetime:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += timedelta(seconds=seconds)


@dataclass
class Row:
    event: Envelope
    available_at: datetime
    last_error: str | None = None


@dataclass
class MemoryStore:
    """The Store seam in memory, same claim rules as Postgres, time from an injected clock."""

    clock: FakeClock = field(default_factory=FakeClock)
    rows: dict[int, Row] = field(default_factory=dict)
    dead: list[tuple[Envelope, Dead]] = field(default_factory=list)
    delays: list[float] = field(default_factory=list)
    stopped: bool = False
    _seq: int = 0

    def add(self, topic: str = "t", key: str | None = None, payload: bytes = b"{}") -> Envelope:
        self._seq += 1
        event = Envelope(self._seq, uuid.uuid4(), topic, key, payload)
        self.rows[event.seq] = Row(event, self.clock())
        return event

    async def start(self, relay_id: str) -> None:
        del relay_id

    async def stop(self) -> None:
        self.stopped = True

    async def claim(self, limit: int, exclude: Sequence[int] = ()) -> list[Envelope]:
        now = self.clock()
        skip = set(exclude)
        waiting: dict[str, int] = {}
        for seq in sorted(self.rows):
            row = self.rows[seq]
            if row.available_at > now and row.event.key is not None:
                waiting.setdefault(row.event.key, seq)
        out = [
            r.event
            for s, r in sorted(self.rows.items())
            if s not in skip
            and r.available_at <= now
            and (r.event.key is None or waiting.get(r.event.key, s) >= s)
        ]
        return out[:limit]

    async def mark_delivered(self, seqs: Sequence[int]) -> int:
        return sum(self.rows.pop(s, None) is not None for s in seqs)

    async def schedule_retries(self, retries: Sequence[Retry]) -> int:
        for r in retries:
            row = self.rows[r.seq]
            row.event = replace(row.event, attempts=row.event.attempts + 1)
            row.available_at = self.clock() + timedelta(seconds=r.delay_seconds)
            row.last_error = r.error
            self.delays.append(r.delay_seconds)
        return len(retries)

    async def move_to_dead_letters(self, dead: Sequence[Dead]) -> int:
        for d in dead:
            self.dead.append((self.rows.pop(d.seq).event, d))
        return len(dead)

    async def maintain_leases(self, *, rebalance: bool) -> int:
        del rebalance
        return 64

    def on_new_events(self, wake: Callable[[], None]) -> None:
        del wake


class RecordingPublisher:
    """Accepts everything and remembers it, in order."""

    name = "recording"

    def __init__(self) -> None:
        self.published: list[Envelope] = []
        self.down = False

    async def start(self) -> None:
        if self.down:
            raise BrokerUnavailableError("broker is down (test)")

    async def stop(self) -> None:
        return None

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        if self.down:
            raise BrokerUnavailableError("broker is down (test)")
        self.published.extend(batch)
        return [None] * len(batch)
