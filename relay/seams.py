"""The two seams of the relay. The loop (relay/relay.py) imports only these.

A `Store` holds the pending events (Postgres in production, SQLite for demos and fast tests).
A `Publisher` hands a batch to a broker (Kafka, Redis, stdout/JSON lines).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from outbox.envelope import Envelope


class RelayError(Exception):
    """Base of the relay's own errors."""


class BrokerUnavailableError(RelayError):
    """The broker as a whole cannot take the batch now (down, unreachable, timing out).

    Not the events' fault: the loop opens its circuit breaker and burns no attempts.
    """


class StoreUnavailableError(RelayError):
    """The database cannot be reached now; the loop backs off and reconnects."""


@dataclass(frozen=True, slots=True)
class Failure:
    """Why one event was not delivered.

    `retriable=False` sends it to the dead letters at once. `counted=False` means the publisher
    held the event back (an earlier event of its key failed) and it costs no attempt.
    """

    error_class: str
    message: str
    retriable: bool = True
    counted: bool = True

    @classmethod
    def of(cls, exc: BaseException, *, retriable: bool) -> Failure:
        return cls(type(exc).__name__, str(exc) or repr(exc), retriable)


#: A publisher's answer for one event: None when the broker acknowledged it.
PublishResult = Failure | None


@dataclass(frozen=True, slots=True)
class Retry:
    seq: int
    delay_seconds: float
    error: str


@dataclass(frozen=True, slots=True)
class Dead:
    seq: int
    error_class: str
    error_message: str


class Store(Protocol):
    """Where pending events live. Every method that changes events is fenced by the relay's
    leases: it changes only events of buckets the relay still owns, and says how many it changed."""

    async def start(self, relay_id: str) -> None: ...

    async def stop(self) -> None:
        """Release every lease and close connections."""

    async def claim(self, limit: int, exclude: Sequence[int] = ()) -> list[Envelope]:
        """Oldest available events of owned buckets, in sequence order, per-key order kept,
        leaving out the events whose seq is in `exclude` (they are in flight)."""

    async def mark_delivered(self, seqs: Sequence[int]) -> int: ...

    async def schedule_retries(self, retries: Sequence[Retry]) -> int: ...

    async def move_to_dead_letters(self, dead: Sequence[Dead]) -> int: ...

    async def maintain_leases(self, *, rebalance: bool) -> int:
        """Heartbeat and renew leases; with `rebalance`, also take or give back buckets so live
        relays share them fairly. Returns the number of buckets owned."""

    def on_new_events(self, wake: Callable[[], None]) -> None:
        """Call `wake` when new events may have been committed (NOTIFY); optional."""


class Publisher(Protocol):
    """Hands batches to a broker and reports, per event, whether the broker acknowledged it.

    Contract: events come in sequence order; if an event fails with a retriable error, later
    events of the same key in the batch must not be delivered (fail them with counted=False).
    Raise BrokerUnavailableError when the broker as a whole is unreachable.
    """

    name: str

    async def start(self) -> None: ...

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]: ...

    async def stop(self) -> None: ...
