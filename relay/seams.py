"""The two seams of the relay. The loop (relay/relay.py) imports only these.

A `Store` holds the pending events (Postgres in production, SQLite for demos and fast tests).
A `Publisher` hands a batch to a broker (Kafka, Redis, stdout/JSON lines).
"""

from __future__ import annotations

import enum
import shlex
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol, runtime_checkable

from outbox.envelope import Envelope


class RelayError(Exception):
    """Base of the relay's own errors."""


class BrokerUnavailableError(RelayError):
    """The broker as a whole cannot take the batch now (down, unreachable, timing out).

    Not the events' fault: the loop opens its circuit breaker and burns no attempts.
    """


class ConfigurationError(RelayError):
    """The relay's setup is wrong (credentials, permissions), found when it starts: retrying
    cannot help. `outbox-relay run` exits 2 with this one line."""


class StoreUnavailableError(RelayError):
    """The database cannot be reached now; the loop backs off and reconnects."""


class Verdict(enum.Enum):
    """What a failed event's failure says, and so what the loop does with the event."""

    #: This event failed, perhaps transiently: retry it with backoff; the attempt counts.
    RETRY = "retry"
    #: This event can never be delivered as it is: dead-letter it (and quarantine its key).
    POISON = "poison"
    #: Not this event's fault (an earlier event of its key failed, or the producer had to be
    #: reset): it stays pending and is sent again soon; no attempt is counted.
    HELD = "held"
    #: The broker as a whole refused (out of memory, read-only, loading): no attempt is
    #: counted, and the loop opens its circuit breaker as for an outage.
    BROKER = "broker"


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one event was not delivered, and what that means for it (`verdict`)."""

    error_class: str
    message: str
    verdict: Verdict = Verdict.RETRY


#: Later events of a key whose earlier event in the batch was not delivered.
HELD_BACK = Failure("HeldBack", "an earlier event of its key was not delivered", Verdict.HELD)


#: A publisher's answer for one event: None when the broker acknowledged it.
PublishResult = Failure | None


class Position(NamedTuple):
    """Where the broker stored an event: Kafka's partition and offset, or a Redis stream's
    entry id. Recorded only with `history = on` (see `RecordsPositions`). A tuple: one is
    made per event, and a tuple is made in half the time of a frozen dataclass."""

    partition: int | None = None
    offset: int | None = None
    entry_id: str | None = None


@dataclass(frozen=True, slots=True)
class Retry:
    seq: int
    delay_seconds: float
    error: str


@dataclass(frozen=True, slots=True)
class Dead:
    """An event to move to the dead letters. `holds_key`: the dead letter quarantines its key
    (later events of the key are parked behind it until it is replayed or discarded);
    `held_behind`: the poison event this one was parked behind."""

    seq: int
    error_class: str
    error_message: str
    holds_key: bool = False
    held_behind: uuid.UUID | None = None
    #: The event's key, for the loop's key gate (not stored).
    key: str | None = None


def park(seq: int, key: str, poison: uuid.UUID) -> Dead:
    """An event of a quarantined key, to dead-letter behind the key's poison event."""
    return Dead(
        seq,
        "Quarantined",
        f"key {key!r} is quarantined behind poison event {poison}; replay the chain with "
        f"`outbox-relay dlq replay --key {shlex.quote(key)}`",
        holds_key=True,
        held_behind=poison,
        key=key,
    )


@dataclass(slots=True)
class Claim:
    """One claim: the events to publish, and events of quarantined keys to park (`parked`)."""

    events: list[Envelope] = field(default_factory=list)
    parked: list[Dead] = field(default_factory=list)
    #: The claim stopped at its event limit or its byte budget: more may be waiting.
    full: bool = False

    def __len__(self) -> int:
        return len(self.events) + len(self.parked)

    def boundary(self, horizon: int) -> int:
        """The highest seq up to which this claim returned every claimable event: its last
        seq when it was full (there are more), else everything (`horizon`)."""
        if not self.full:
            return horizon
        return max(
            max((e.seq for e in self.events), default=0),
            max(d.seq for d in self.parked) if self.parked else 0,
        )


@dataclass(slots=True)
class Backlog:
    """What one cheap query tells about the outbox table (see `Store.backlog`)."""

    #: Rows in outbox_events: counted up to 1,000, Postgres's running estimate above.
    pending: int
    #: Seconds since the oldest pending event was written; None when there is none.
    oldest_age: float | None
    #: Key buckets that no live relay holds a lease on: their events wait.
    unowned_buckets: int = 0
    #: Seconds the oldest open transaction (with a snapshot) of the database has run: while
    #: it lives, Postgres cannot clean up deleted rows. None when there is none.
    oldest_snapshot_age: float | None = None


class Store(Protocol):
    """Where pending events live. Every method that changes events is fenced by the relay's
    leases: it changes only events of buckets the relay still owns, and says how many it changed."""

    async def start(self, relay_id: str) -> None: ...

    async def stop(self) -> None:
        """Release every lease and close connections."""

    async def claim(self, limit: int, exclude: Sequence[int] = (), after: int = 0) -> Claim:
        """Oldest available events of owned buckets, in sequence order, per-key order kept
        (see relay/ordering.py), leaving out the events whose seq is in `exclude` (they are in
        flight). Events of a quarantined key come back in `parked`, ready to dead-letter.
        `after`: the claim's floor (relay/floor.py); only seqs above it, and waiting events."""

    def horizon(self) -> int:
        """A seq up to which every writer has committed or rolled back (relay/floor.py); 0
        when unknown (then the claims have no floor)."""

    async def mark_delivered(
        self, seqs: Sequence[int], positions: Sequence[Position | None] = ()
    ) -> int:
        """Delete the delivered events (with `history = on`, move them to outbox_delivered).
        `positions`: where the broker stored each, index for index (empty: unknown)."""

    async def schedule_retries(self, retries: Sequence[Retry]) -> int: ...

    async def move_to_dead_letters(self, dead: Sequence[Dead]) -> int: ...

    async def maintain_leases(self, *, rebalance: bool) -> int:
        """Heartbeat and renew leases; with `rebalance`, also take or give back buckets so live
        relays share them fairly. Returns the number of buckets owned."""

    def on_new_events(self, wake: Callable[[], None]) -> None:
        """Call `wake` when new events may have been committed (NOTIFY); optional."""

    async def backlog(self) -> Backlog:
        """Pending events and the age of the oldest, cheaply (sampled for the gauges)."""


class Publisher(Protocol):
    """Hands batches to a broker and reports, per event, whether the broker acknowledged it.

    Contract: events come in sequence order; once an event is not delivered, no later event of
    its key in the batch may be delivered (answer them with HELD_BACK; see relay/ordering.py).
    Raise BrokerUnavailableError when the broker as a whole is unreachable, and answer
    Verdict.BROKER for events that the broker refused for its own state.
    """

    name: str

    async def start(self) -> None: ...

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]: ...

    async def stop(self) -> None: ...


@runtime_checkable
class BatchesPerPartition(Protocol):
    """A publisher that sends one record batch per topic partition (Kafka). A batch costs
    the client a fixed ~35 us whatever it holds, so the relay claims more while a claim's
    events spread over many topics (Relay._next_claim_size). A publisher whose cost is per
    event (Redis) is not one: a bigger claim only delays its first write."""

    batches_per_partition: bool


@runtime_checkable
class RecordsPositions(Protocol):
    """A publisher that can tell where the broker stored each event (Kafka, Redis)."""

    #: seq -> Position of the events the broker acknowledged in the last `publish()`. None
    #: (the default): nothing is recorded, at no cost; the relay sets a dict (history on),
    #: and takes the positions after each publish.
    positions: dict[int, Position] | None
