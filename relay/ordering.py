"""Per-key order: the rule, and the one place in the relay process that applies it.

The rule: an event is published only after every earlier event (lower seq) of its key was
delivered. Events without a key are not ordered.

A dead-lettered event breaks the chain of its key. What happens next is the poison policy:
- `quarantine` (the default): the dead letter holds its key. Every later event of the key is
  parked behind it in the dead letters, in order, until an operator replays the chain
  (`outbox-relay dlq replay --key K`, which restores the events with their original seq) or
  discards it. Other keys flow on.
- `skip`: the key moves on without the dead event, which breaks the key's order for it.

Where the rule is kept:
1. In the database, by the claim (`claim_batch` in relay/queries.sql and in
   relay/queries_sqlite.sql): it never returns an event whose key has an earlier event waiting
   (a retry backoff or a delayed delivery), and it returns the events of quarantined keys
   (keys with a dead letter whose `holds_key` is true) as `Claim.parked`.
2. In the process, by `KeyGate`, the one type that says "this key may not move on now":
   - publishers (Kafka, Redis, relay.testing's FaultInjector) send nothing of a key after one of
     its events failed in the batch, and `hold_back_after_failures` answers HELD_BACK for later
     events of a key whose earlier event failed only with its ack;
   - the loop leaves out of a prefetched batch every key whose event was not delivered in the
     batch before (that batch's settle may not be written yet), parked events included.
3. When a batch is settled, by `sort_results`: what each publisher answer means for its event.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from outbox.envelope import Envelope
from outbox.relay.logs import relay_logger
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import HELD_BACK, Dead, Failure, PublishResult, Retry, Verdict

log = relay_logger("relay")


class PoisonPolicy(enum.StrEnum):
    """What a dead-lettered event does to the later events of its key (see the module doc)."""

    QUARANTINE = "quarantine"
    SKIP = "skip"


class KeyGate:
    """The keys that may not move on now, because an earlier event of theirs is not delivered."""

    __slots__ = ("_closed",)

    def __init__(self) -> None:
        self._closed: set[str] = set()

    def admits(self, event: Envelope | Dead) -> bool:
        return event.key is None or event.key not in self._closed

    def close(self, event: Envelope | Dead) -> None:
        if event.key is not None:
            self._closed.add(event.key)

    def close_all(self, other: KeyGate) -> None:
        self._closed |= other._closed

    def clear(self) -> None:
        self._closed.clear()

    def __bool__(self) -> bool:
        return bool(self._closed)


def hold_back_after_failures(batch: Sequence[Envelope], results: list[PublishResult]) -> int:
    """The publisher contract on a finished batch, for publishers that learn of failures
    only with the acks: once an event of a key is not delivered, no later event of the key
    counts as delivered. Such events become HELD_BACK (sent again after the earlier one).
    Returns how many the broker had acked all the same (they will arrive twice)."""
    if results.count(None) == len(results):
        return 0  # all delivered: the usual case, checked in C
    gate = KeyGate()
    violations = 0
    for i, event in enumerate(batch):
        if not gate.admits(event):
            if results[i] is None:
                violations += 1
                results[i] = HELD_BACK
        elif results[i] is not None:
            gate.close(event)
    return violations


@dataclass(slots=True)
class Settlement:
    """What to record for a published batch."""

    delivered: list[int] = field(default_factory=list)
    retries: list[Retry] = field(default_factory=list)
    dead: list[Dead] = field(default_factory=list)
    #: Events left pending at no cost to them (held back, producer reset, broker refusal).
    held: int = 0
    #: The first broker-wide refusal, if any: the loop then opens its circuit breaker.
    broker_refusal: Failure | None = None
    #: Keys whose later events must wait: an event of theirs was not delivered.
    gate: KeyGate = field(default_factory=KeyGate)

    def pending(self, batch: Sequence[Envelope]) -> list[int]:
        """Seqs of the batch left in the outbox as they were (held back, refused with the
        whole broker): neither delivered, nor retried, nor dead."""
        done = {*self.delivered, *(r.seq for r in self.retries), *(d.seq for d in self.dead)}
        return [e.seq for e in batch if e.seq not in done]


def sort_results(
    batch: Sequence[Envelope],
    results: Sequence[PublishResult],
    *,
    policy: PoisonPolicy,
    retry_policy: RetryPolicy,
    rand: Callable[[], float],
) -> Settlement:
    """Decide, event by event in seq order, what the publisher's answers mean."""
    out = Settlement()
    gate = out.gate
    for event, result in zip(batch, results, strict=True):
        if result is None:
            if not gate.admits(event):  # the publisher broke its contract; it is out already
                log.error("order_violated", event_id=str(event.id), key=event.key)
            out.delivered.append(event.seq)
            continue
        if not gate.admits(event) or result.verdict is Verdict.HELD:
            out.held += 1  # waits behind an earlier event of its key, or is simply resent
            gate.close(event)
            continue
        if result.verdict is Verdict.BROKER:
            out.held += 1
            out.broker_refusal = out.broker_refusal or result
            gate.close(event)
            continue
        attempt = event.attempts + 1
        log.warning(
            "publish_failed",
            event_id=str(event.id),
            topic=event.topic,
            key=event.key,
            attempt=attempt,
            error_class=result.error_class,
            error=result.message,
            verdict=result.verdict.value,
        )
        if result.verdict is Verdict.RETRY and not retry_policy.exhausted(attempt):
            delay = retry_policy.delay(attempt, rand)
            out.retries.append(Retry(event.seq, delay, f"{result.error_class}: {result.message}"))
            gate.close(event)
            log.info(
                "retry_scheduled", event_id=str(event.id), attempt=attempt, delay=round(delay, 3)
            )
            continue
        quarantine = policy is PoisonPolicy.QUARANTINE and event.key is not None
        out.dead.append(Dead(event.seq, result.error_class, result.message, holds_key=quarantine))
        if quarantine:
            # Later events of the key wait; the next claim parks them behind this one.
            gate.close(event)
    return out
