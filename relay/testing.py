"""Helpers for testing code around the relay: a publisher wrapper that injects failures.

Used by the project's own tests and by `outbox-relay demo`; applications can use it to test
how their consumers see retries and dead letters.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Sequence

from outbox.envelope import Envelope
from outbox.relay.ordering import KeyGate
from outbox.relay.seams import HELD_BACK, Failure, Publisher, PublishResult, Verdict

#: Decides, per event, whether it fails this time (a Failure) or goes to the real publisher.
Fault = Callable[[Envelope], Failure | None]


class FaultInjector:
    """Wraps a real publisher and fails the events `fault` picks.

    Honours the publisher contract: once an event of a key fails retriably, later events of
    that key in the batch are held back (HELD_BACK) and never reach the inner publisher.
    `published` records what the inner publisher acknowledged, in order.
    """

    name = "fault-injector"

    def __init__(self, inner: Publisher, fault: Fault) -> None:
        self.inner = inner
        self.fault = fault
        self.published: list[Envelope] = []

    @classmethod
    def scripted(
        cls,
        inner: Publisher,
        *,
        failures: dict[uuid.UUID, int] | None = None,
        poison: set[uuid.UUID] | None = None,
    ) -> FaultInjector:
        """Fail event ids `failures[id]` times (retriable), and `poison` ids for good.
        The `failures` dict is consumed in place, so relays sharing it share the script."""
        remaining = failures if failures is not None else {}
        refused = set(poison or ())

        def fault(event: Envelope) -> Failure | None:
            if event.id in refused:
                return Failure("MessageRejected", "refused by the test", Verdict.POISON)
            if remaining.get(event.id, 0) > 0:
                remaining[event.id] -= 1
                return Failure("InjectedError", "transient failure (test)")
            return None

        return cls(inner, fault)

    async def start(self) -> None:
        await self.inner.start()

    async def stop(self) -> None:
        await self.inner.stop()

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        results: list[PublishResult] = [None] * len(batch)
        blocked = KeyGate()
        passed: list[int] = []
        for i, event in enumerate(batch):
            if not blocked.admits(event):
                results[i] = HELD_BACK
                continue
            failure = self.fault(event)
            if failure is None:
                passed.append(i)
                continue
            results[i] = failure
            blocked.close(event)
        acks = await self.inner.publish([batch[i] for i in passed]) if passed else []
        for i, ack in zip(passed, acks, strict=True):
            results[i] = ack
            if ack is None:
                self.published.append(batch[i])
        return results
