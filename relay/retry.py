"""Backoff for failed events and the circuit breaker for broker-wide outages."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Exponential backoff with jitter: attempt n waits base * factor**(n-1), capped, then
    scaled by a random factor in [1 - jitter, 1]. After `max_attempts` the event is dead."""

    base_seconds: float = 1.0
    factor: float = 2.0
    max_seconds: float = 300.0
    max_attempts: int = 10
    jitter: float = 0.2

    def delay(self, attempt: int, rand: Callable[[], float] = random.random) -> float:
        """Seconds to wait after failed attempt number `attempt` (1-based)."""
        raw = min(self.max_seconds, self.base_seconds * self.factor ** max(0, attempt - 1))
        return raw * (1.0 - self.jitter * rand())

    def exhausted(self, attempt: int) -> bool:
        return attempt >= self.max_attempts


@dataclass(slots=True)
class CircuitBreaker:
    """Closed while the broker answers. Each broker-wide failure opens it for a growing,
    jittered pause; the next batch after the pause is the probe. One success closes it."""

    base_seconds: float = 0.5
    max_seconds: float = 30.0
    rand: Callable[[], float] = random.random
    failures: int = field(default=0, init=False)

    @property
    def is_open(self) -> bool:
        return self.failures > 0

    def record_failure(self) -> float:
        """Count a broker-wide failure; return how long to wait before the probe."""
        self.failures += 1
        pause = min(self.max_seconds, self.base_seconds * 2.0 ** (self.failures - 1))
        return pause * (0.5 + 0.5 * self.rand())

    def record_success(self) -> None:
        self.failures = 0


@dataclass(slots=True)
class PollPacer:
    """How long an idle relay waits before it claims again; a NOTIFY ends the wait sooner.

    After a claim that found events, the relay claims again after `fast`, and doubles the
    wait on each empty claim, back up to `interval`. Events can be committed without a NOTIFY
    of their own: the insert trigger notifies for at most two transactions at a time
    (migration 0005), writers may turn it off (`outbox.notify = off`), and the LISTEN
    connection may be down. The quick claims after a find pick those events up, instead of
    leaving them for the next full `interval`: the events committed beside one that notified
    come within about twice their own commit delay. An idle relay makes about seven empty
    claims after each burst of events, then waits `interval`."""

    interval: float
    fast: float = 0.01
    current: float = field(init=False)

    def __post_init__(self) -> None:
        self.current = self.interval

    def after_claim(self, *, found: bool) -> float:
        """The wait after a claim that found events (or not)."""
        if found:
            self.current = min(self.fast, self.interval)
        else:
            self.current = min(self.current * 2, self.interval)
        return self.current
