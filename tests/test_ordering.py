"""relay.ordering.sort_results, by property: whatever the publisher answers, the settlement keeps
the per-key order rule (relay/ordering.py) and the meaning of each verdict."""

from __future__ import annotations

import uuid
from dataclasses import dataclass

import pytest
import structlog.testing
from hypothesis import given, settings
from hypothesis import strategies as st

from outbox.envelope import Envelope
from outbox.relay.ordering import PoisonPolicy, sort_results
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import HELD_BACK, Failure, PublishResult, Verdict

pytestmark = pytest.mark.unit

KEYS = (None, "a", "b", "c")

failures = st.one_of(
    st.just(HELD_BACK),
    st.builds(Failure, st.sampled_from(["E1", "E2"]), st.just("boom"), st.sampled_from(Verdict)),
)


@dataclass(frozen=True)
class Case:
    batch: list[Envelope]
    results: list[PublishResult]
    #: Whether the answers keep the Publisher contract: nothing of a key is delivered after an
    #: event of the key was not delivered in the batch.
    compliant: bool
    policy: PoisonPolicy
    retry_policy: RetryPolicy


@st.composite
def cases(draw: st.DrawFn) -> Case:
    size = draw(st.integers(0, 30))
    gaps = draw(st.lists(st.integers(1, 3), min_size=size, max_size=size))
    keys = draw(st.lists(st.sampled_from(KEYS), min_size=size, max_size=size))
    attempts = draw(st.lists(st.integers(0, 4), min_size=size, max_size=size))
    results: list[PublishResult] = draw(
        st.lists(st.one_of(st.none(), failures), min_size=size, max_size=size)
    )
    compliant = draw(st.booleans())
    batch: list[Envelope] = []
    seq = 0
    for gap, key, tries in zip(gaps, keys, attempts, strict=True):
        seq += gap
        batch.append(Envelope(seq, uuid.UUID(int=seq), "t", key, b"{}", attempts=tries))
    if compliant:  # as a real publisher: after a failure of a key, its later events are held
        failed: set[str] = set()
        for i, event in enumerate(batch):
            if event.key is None:
                continue
            if event.key in failed and results[i] is None:
                results[i] = HELD_BACK
            if results[i] is not None:
                failed.add(event.key)
    return Case(
        batch,
        results,
        compliant,
        draw(st.sampled_from(PoisonPolicy)),
        RetryPolicy(base_seconds=1, max_attempts=draw(st.integers(1, 4)), jitter=0.0),
    )


@settings(max_examples=500)
@given(cases())
def test_no_event_is_settled_past_an_undelivered_earlier_event_of_its_key(case: Case) -> None:
    with structlog.testing.capture_logs() as logs:
        plan = sort_results(
            case.batch,
            case.results,
            policy=case.policy,
            retry_policy=case.retry_policy,
            rand=lambda: 0.5,
        )
    delivered = set(plan.delivered)
    retried = {r.seq for r in plan.retries}
    dead = {d.seq: d for d in plan.dead}

    # Every event has exactly one outcome, and each list is in seq order.
    assert len(delivered) + len(retried) + len(dead) + plan.held == len(case.batch)
    assert not delivered & retried
    assert not delivered & dead.keys()
    assert not retried & dead.keys()
    assert plan.delivered == sorted(delivered)
    assert [r.seq for r in plan.retries] == sorted(retried)
    assert [d.seq for d in plan.dead] == sorted(dead)

    blocked: set[str] = set()  # keys with an earlier event not delivered in this batch
    refusals: list[Failure] = []
    violated = False
    for event, result in zip(case.batch, case.results, strict=True):
        admitted = event.key is None or event.key not in blocked
        if not admitted:
            assert event.seq not in retried, f"{event} retried behind an undelivered event"
            assert event.seq not in dead, f"{event} dead-lettered behind an undelivered event"
            if result is None:
                violated = True  # it is out already: recorded as delivered, and logged
            elif case.compliant:
                assert event.seq not in delivered
        if result is not None and result.verdict in (Verdict.HELD, Verdict.BROKER):
            assert event.seq not in retried
            assert event.seq not in dead

        # The whole rule, event by event, from the inputs alone.
        expected = outcome(case, event, result, admitted=admitted)
        actual = (
            "delivered"
            if event.seq in delivered
            else "retried"
            if event.seq in retried
            else "dead"
            if event.seq in dead
            else "held"
        )
        assert actual == expected, (event, result)
        if expected == "dead":
            assert result is not None
            d = dead[event.seq]
            quarantined = case.policy is PoisonPolicy.QUARANTINE and event.key is not None
            assert (d.holds_key, d.held_behind) == (quarantined, None)
            assert (d.error_class, d.error_message) == (result.error_class, result.message)
        if result is not None and result.verdict is Verdict.BROKER and admitted:
            refusals.append(result)
        # Not delivered: later events of the key wait, unless it was dead-lettered under skip.
        skipped = case.policy is PoisonPolicy.SKIP and expected == "dead"
        if event.key is not None and result is not None and not skipped:
            blocked.add(event.key)

    # Held: what the publisher held back or the broker refused, and what waits behind its key.
    assert plan.held == len(case.batch) - len(delivered) - len(retried) - len(dead)
    assert violated == any(entry["event"] == "order_violated" for entry in logs)
    if case.compliant:
        assert not violated
    # The loop keeps these keys out of the batch it prefetched meanwhile.
    closed = {k for k in KEYS if k is not None and not plan.gate.admits(keyed(k))}
    assert closed == blocked
    # The first broker-wide refusal of an event not held behind its key opens the breaker.
    assert plan.broker_refusal == (refusals[0] if refusals else None)


def outcome(case: Case, event: Envelope, result: PublishResult, *, admitted: bool) -> str:
    if result is None:
        return "delivered"  # acknowledged (if not admitted, the publisher broke its contract)
    if not admitted or result.verdict in (Verdict.HELD, Verdict.BROKER):
        return "held"
    if result.verdict is Verdict.RETRY and not case.retry_policy.exhausted(event.attempts + 1):
        return "retried"
    return "dead"  # poison, or out of attempts


def keyed(key: str) -> Envelope:
    return Envelope(0, uuid.UUID(int=0), "t", key, b"{}")
