"""The relay loop: claim → publish → delete, retry or dead-letter. Imports only the seams.

Embeddable: it never installs signal handlers or exits the process. The CLI and the FastAPI
lifespan both drive a `Relay` and call `request_stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from outbox.envelope import Envelope
from outbox.relay.floor import ClaimFloor
from outbox.relay.logs import relay_logger
from outbox.relay.metrics import RelayMetrics
from outbox.relay.ordering import KeyGate, PoisonPolicy, Settlement, sort_results
from outbox.relay.retry import CircuitBreaker, PollPacer, RetryPolicy
from outbox.relay.seams import (
    BatchesPerPartition,
    BrokerUnavailableError,
    Claim,
    Dead,
    Position,
    Publisher,
    PublishResult,
    RecordsPositions,
    Store,
    StoreUnavailableError,
)

log = relay_logger("relay")


def event_loop_name() -> str:
    """The running loop's package: "uvloop" or "asyncio"."""
    return type(asyncio.get_running_loop()).__module__.partition(".")[0]


@dataclass(slots=True)
class RelayStats:
    """Counters since start. Tests and health checks wait on them (`Relay.wait_for`)."""

    batches: int = 0
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    #: Of the dead-lettered: events parked behind the poison event of their key.
    parked: int = 0
    held_back: int = 0
    broker_failures: int = 0
    store_failures: int = 0
    fenced_off: int = 0
    owned_buckets: int = 0
    idle: bool = False
    stopped: bool = False


#: A claim grows while its events spread over many topics, for a publisher that sends one record
#: batch per partition (seams.BatchesPerPartition: Kafka). Each batch costs aiokafka ~35 us of
#: CPU whatever it holds (building it, its part of the produce request and of the response, its
#: future), against ~1.5-5 us per record. 500 events over 500 topics went out as 500 one-record
#: batches (docs/benchmarks.md, "Many topics"). After a full claim whose events were mostly on a
#: topic of their own, the next claim is as big as a claim may grow (a small claim cannot tell
#: 500 topics from 5,000). After a full claim over so many topics that a claim of `batch_size`
#: would give them fewer than this many events each on average, the next claim takes ...
SPREAD_EVENTS_PER_TOPIC = 4
#: ... this many events per topic it saw, at most SPREAD_GROWTH times `batch_size` and at most
#: MAX_CLAIM events. Bytes stay capped by the store's `max_batch_bytes`.
SPREAD_TARGET_PER_TOPIC = 50
SPREAD_GROWTH = 100
MAX_CLAIM = 50_000
#: Seconds the deletes of a batch that was all delivered, from a claim that was not full (the
#: relay keeps up), wait for those of the next batches, to go to Postgres as one statement. At
#: 1,000 events/s a claim holds one event: a delete each cost a round trip, the relay's CPU
#: and its backend's (docs/benchmarks.md). Claims meanwhile leave them out; stopping, a claim
#: that comes back empty or one that cannot run beside them ends the wait at once.
SETTLE_LINGER = 0.005


class Relay:
    def __init__(
        self,
        store: Store,
        publisher: Publisher,
        *,
        relay_id: str,
        batch_size: int = 500,
        poll_interval: float = 1.0,
        lease_seconds: float = 15.0,
        retry_policy: RetryPolicy | None = None,
        poison_policy: PoisonPolicy = PoisonPolicy.QUARANTINE,
        shutdown_timeout: float = 10.0,
        backlog_interval: float = 5.0,
        rand: Callable[[], float] = random.random,
        record_positions: bool = False,
        settle_linger: float = SETTLE_LINGER,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.relay_id = relay_id
        self.batch_size = batch_size
        #: The most a claim may grow to when its events spread over many topics: no more than
        #: `batch_size` for a publisher whose cost does not grow with the topics.
        spreads = isinstance(publisher, BatchesPerPartition) and publisher.batches_per_partition
        self.max_claim = (
            max(batch_size, min(batch_size * SPREAD_GROWTH, MAX_CLAIM)) if spreads else batch_size
        )
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.retry_policy = retry_policy or RetryPolicy()
        self.poison_policy = poison_policy
        self.shutdown_timeout = shutdown_timeout
        self.stats = RelayStats()
        #: Counts for Prometheus (relay/metrics.py); kept whether or not anything scrapes.
        self.metrics = RelayMetrics()
        self.backlog_interval = backlog_interval
        self.settle_linger = settle_linger
        self._rand = rand
        self._breaker = CircuitBreaker(rand=rand)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._next_rebalance = 0.0
        #: `record_positions` (history on): the publisher that says where the broker stored
        #: each event; the positions go with the deletes into outbox_delivered.
        self._recorder: RecordsPositions | None = None
        if record_positions and isinstance(publisher, RecordsPositions):
            self._recorder = publisher
            publisher.positions = {}

    # -- control -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop claiming; `run()` finishes the in-flight batch, releases leases and returns."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """New events may be there: claim now instead of at the next poll."""
        self._wake.set()

    @property
    def breaker_open(self) -> bool:
        """Whether the broker circuit breaker is open (the broker is unavailable)."""
        return self._breaker.is_open

    async def wait_for(self, predicate: Callable[[RelayStats], bool], timeout: float) -> None:
        """Wait until `predicate(stats)` holds (checked after every batch); TimeoutError if not."""
        async with asyncio.timeout(timeout), self._changed:
            await self._changed.wait_for(lambda: predicate(self.stats))

    async def run(self) -> None:
        """Run until `request_stop()`. Always releases leases and stops the publisher.

        If the loop dies of an unexpected error, the relay stops and `run()` re-raises it, so
        a supervisor sees it instead of a relay that renews leases but publishes nothing."""
        if not await self._start():  # asked to stop while store or broker was unreachable
            log.info("relay_stopped", relay_id=self.relay_id, delivered=0, dead_lettered=0)
            await self._mark_stopped()
            return
        log.info(
            "relay_started",
            relay_id=self.relay_id,
            publisher=self.publisher.name,
            batch_size=self.batch_size,
            owned_buckets=self.stats.owned_buckets,
            event_loop=event_loop_name(),
        )
        work = asyncio.create_task(self._loop(), name="outbox-relay-loop")
        leases = asyncio.create_task(self._renew_leases(), name="outbox-relay-leases")
        backlog = asyncio.create_task(self._sample_backlog(), name="outbox-relay-backlog")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({work, leases, stopping}, return_when=asyncio.FIRST_COMPLETED)
            self._stopping.set()
            if not work.done():
                try:
                    async with asyncio.timeout(self.shutdown_timeout):
                        await asyncio.shield(work)
                except TimeoutError:
                    log.warning(
                        "shutdown_timeout", relay_id=self.relay_id, seconds=self.shutdown_timeout
                    )
        finally:
            self._stopping.set()
            for task in (work, leases, backlog, stopping):
                task.cancel()
            await asyncio.gather(work, leases, backlog, stopping, return_exceptions=True)
            await self._shutdown()
            log.info(
                "relay_stopped",
                relay_id=self.relay_id,
                delivered=self.stats.delivered,
                dead_lettered=self.stats.dead_lettered,
            )
            await self._mark_stopped()
        for task in (work, leases):
            if not task.cancelled() and task.exception() is not None:
                log.error("relay_crashed", error=repr(task.exception()))
                raise task.exception()  # type: ignore[misc]

    async def drain(self) -> RelayStats:
        """Run until no event is claimable right now, then stop. For tests and one-shot jobs."""
        task = asyncio.create_task(self.run())
        try:
            await self.wait_for(lambda s: s.idle or s.stopped, timeout=3600)
        finally:
            self.request_stop()
            await task
        return self.stats

    # -- internals -----------------------------------------------------------------------------

    async def _start(self) -> bool:
        """Connect the store and the publisher, retrying while they are unreachable.
        False when asked to stop before both were up (then nothing is left open)."""
        backoff = CircuitBreaker(rand=self._rand)
        while True:
            try:
                await self.store.start(self.relay_id)
                self.stats.owned_buckets = await self.store.maintain_leases(rebalance=True)
                break
            except StoreUnavailableError as exc:
                self.stats.store_failures += 1
                await self._notify()
                pause = backoff.record_failure()
                log.warning("store_unavailable", error=str(exc), retry_in=round(pause, 2))
                if await self._sleep(pause):
                    await self.store.stop()
                    return False
        self._next_rebalance = asyncio.get_running_loop().time() + self.lease_seconds / 3
        self.store.on_new_events(self.wake)
        try:
            while True:
                try:
                    await self.publisher.start()
                except BrokerUnavailableError as exc:
                    self.stats.broker_failures += 1
                    await self._notify()
                    pause = self._breaker.record_failure()
                    log.warning("broker_unavailable", error=str(exc), retry_in=round(pause, 2))
                    if await self._sleep(pause):
                        await self.store.stop()
                        return False
                else:
                    return True
        except BaseException:
            await self.store.stop()  # give the leases back at once
            raise

    async def _shutdown(self) -> None:
        with contextlib.suppress(Exception):
            await self.publisher.stop()
        try:
            await self.store.stop()
        except Exception as exc:  # noqa: BLE001 - leases then expire by themselves
            log.warning("lease_release_failed", error=str(exc))

    async def _sleep(self, seconds: float) -> bool:
        """Sleep unless asked to stop first; True when stopping."""
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(seconds):
                await self._stopping.wait()
        return self._stopping.is_set()

    async def _wait_for_work(self, delay: float) -> bool:
        """A NOTIFY (True), the jittered delay, or stop (True), whichever comes first."""
        try:
            async with asyncio.timeout(delay * (0.8 + 0.4 * self._rand())):
                await self._wake.wait()
        except TimeoutError:
            return False
        return True

    async def _renew_leases(self) -> None:
        # Renewal runs beside the loop so a long publish (broker outage) keeps the leases.
        while not self._stopping.is_set():
            if await self._sleep(self.lease_seconds / 3):
                return
            try:
                await self.store.maintain_leases(rebalance=False)
            except StoreUnavailableError as exc:
                log.warning("store_unavailable", error=str(exc), during="lease_renewal")
            # Any other error ends this task, which stops the relay (see run()).

    async def _sample_backlog(self) -> None:
        """Pending events and the oldest one's age for the gauges: one cheap query every
        `backlog_interval` seconds, never per batch."""
        while True:
            try:
                self.metrics.backlog = await self.store.backlog()
            except Exception as exc:  # noqa: BLE001 - a gauge never stops the relay
                self.metrics.backlog = None  # the gauges vanish rather than lie
                if not isinstance(exc, StoreUnavailableError):
                    log.warning("backlog_sample_failed", error=repr(exc))
            if await self._sleep(self.backlog_interval):
                return

    async def _loop(self) -> None:
        """Claim → publish → settle, pipelined: while a batch is published, the next full
        batch is already being claimed, and the previous batch's deletes are being written.

        Per-key order survives the overlap: a prefetched batch never holds an event in flight
        (the claim excludes them), and it leaves out every key that had an undelivered event
        in a batch published before it (`pipe.gate`; those events wait for the next fresh
        claim, which sees the settled retries and quarantines). See relay/ordering.py."""
        store_backoff = CircuitBreaker(rand=self._rand)
        pacer = PollPacer(self.poll_interval)
        polled = False  # whether this claim follows a wait the timer ended
        pipe = _Pipeline()
        floor = ClaimFloor()  # where claims start (relay/floor.py)
        clock = asyncio.get_running_loop().time
        fenced = 0  # stats.fenced_off when the floor last moved
        size = self.batch_size  # the next claim's (see _next_claim_size)
        held: list[int] = []  # claimed since the last fresh claim, and left in the outbox
        try:
            while not self._stopping.is_set():
                fresh = pipe.prefetch is None
                try:
                    if fresh:
                        # If the last batch was all delivered and its deletes are still being
                        # written, claim beside them (leaving them out) instead of waiting.
                        beside = not held and pipe.can_claim_beside() and not self._rebalance_due()
                        if not beside:
                            await pipe.finish_settling()  # a fresh claim sees every change
                            pipe.gate.clear()
                            pipe.passed_over.clear()
                            if await self._rebalance_if_due():
                                floor.reset()  # new buckets: their events may lie below it
                            held.clear()  # a fresh claim sees them again
                        self._wake.clear()
                        horizon, after = self.store.horizon(), floor.current(clock())
                        exclude = pipe.settling_seqs if beside else []
                        claim = await self.store.claim(size, exclude=exclude, after=after)
                        if polled:
                            self.metrics.record_missed_wakeups(claim.events)
                            polled = False
                    else:
                        horizon, claim = pipe.prefetch_horizon, await pipe.take_prefetch()
                    # Parked events wait behind the gate too: they go to the dead letters in order.
                    batch = [e for e in claim.events if pipe.gate.admits(e)]
                    parked = [d for d in claim.parked if pipe.gate.admits(d)]
                    pipe.pass_over(claim, len(batch) + len(parked))
                    size = self._next_claim_size(claim)
                    if claim.full and not self._stopping.is_set():
                        in_flight = [e.seq for e in batch] + [d.seq for d in parked]
                        exclude = in_flight + pipe.settling_seqs + pipe.passed_over
                        pipe.prefetch_horizon = self.store.horizon()
                        after = floor.current(clock())
                        pipe.prefetch = asyncio.create_task(
                            self.store.claim(size, exclude=exclude, after=after)
                        )
                    if batch or parked:
                        # Let the prefetch and the last batch's settle send their statements
                        # before the publish takes the CPU: else they waited for its first
                        # await, and the settle was the loop's critical path.
                        await asyncio.sleep(0)
                        results = await self._publish(batch) if batch else []
                        if results is None:  # broker down: nothing moves, nothing skips ahead
                            await pipe.drop_prefetch()
                            continue
                        where = self._take_positions()
                        plan = sort_results(
                            batch,
                            results,
                            policy=self.poison_policy,
                            retry_policy=self.retry_policy,
                            rand=self._rand,
                        )
                        plan.dead.extend(parked)
                        held += plan.pending(batch)
                        pipe.gate.close_all(plan.gate)
                        clean = len(plan.delivered) == len(batch) and not parked
                        linger = self.settle_linger if clean and not claim.full else 0.0
                        if not (linger and pipe.join_lingering(plan.delivered, where)):
                            await pipe.finish_settling()
                            work = self._settle(plan, len(parked), where)
                            if linger:
                                pipe.settle_after(linger, batch, work, plan, where)
                            else:
                                pipe.settle(batch, parked, work)
                            pipe.settling_clean = clean
                        if plan.broker_refusal is not None:
                            await pipe.drop_prefetch()
                            await self._broker_down(str(plan.broker_refusal), len(batch))
                            continue
                        if batch:
                            self._broker_up()
                    if pipe.prefetch is None:
                        if not claim:  # else the next claim waits for the settle, or runs beside
                            await pipe.finish_settling()  # its errors are the store's, handled here
                        self.stats.idle = fresh and not claim
                    if self.stats.fenced_off > fenced:
                        floor.reset()  # a lease was lost: what was fenced off is pending
                        fenced = self.stats.fenced_off
                    else:
                        floor.advance(horizon, claim.boundary(horizon), [*held, *pipe.passed_over])
                    store_backoff.record_success()
                except StoreUnavailableError as exc:
                    await pipe.reset()
                    floor.reset()
                    self.stats.store_failures += 1
                    await self._notify()
                    pause = store_backoff.record_failure()
                    log.warning("store_unavailable", error=str(exc), retry_in=round(pause, 2))
                    await self._sleep(pause)
                    continue
                await self._notify()
                # Only a fresh claim tells that the work ran out: a prefetched one left out
                # what was in flight or passed over, so a fresh claim follows it at once.
                if fresh and not claim.full and not self._stopping.is_set():
                    delay = pacer.after_claim(found=bool(claim))
                    polled = not await self._wait_for_work(delay)  # the timer ended it
            try:
                await pipe.finish_settling()  # stopping: what was published gets recorded
            except StoreUnavailableError as exc:  # then it is published again later
                log.warning("store_unavailable", error=str(exc), during="shutdown")
        finally:
            await pipe.reset()

    def _rebalance_due(self) -> bool:
        return asyncio.get_running_loop().time() >= self._next_rebalance

    def _next_claim_size(self, claim: Claim) -> int:
        """After a full claim whose events spread over many topics, enough for
        SPREAD_TARGET_PER_TOPIC events per topic (at most `max_claim`), so that each partition
        gets more than a few records per request; else `batch_size`. One topic, or a backlog
        that ran out, claims as configured. The spread is measured against `batch_size`, not
        the claim's own size: a grown claim stays grown while the spread lasts (else every
        other claim was small again)."""
        if not claim.full or self.max_claim == self.batch_size:
            return self.batch_size
        topics = len({e.topic for e in claim.events})
        if topics * 2 > len(claim.events) > 1:
            return self.max_claim  # the spread is wider than this claim could show
        if topics * SPREAD_EVENTS_PER_TOPIC <= self.batch_size:
            return self.batch_size
        return max(self.batch_size, min(self.max_claim, topics * SPREAD_TARGET_PER_TOPIC))

    async def _rebalance_if_due(self) -> bool:
        """Rebalance the buckets if it is time; True if this relay gained buckets."""
        # Only between batches: a bucket given back must have nothing of it in flight.
        now = asyncio.get_running_loop().time()
        if now < self._next_rebalance:
            return False
        before = self.stats.owned_buckets
        self.stats.owned_buckets = await self.store.maintain_leases(rebalance=True)
        self._next_rebalance = now + self.lease_seconds / 3
        return self.stats.owned_buckets > before

    async def _mark_stopped(self) -> None:
        self.stats.stopped = True
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _publish(self, batch: list[Envelope]) -> list[PublishResult] | None:
        """The publisher's results, or None when the broker as a whole is unavailable."""
        self.stats.batches += 1
        self.stats.claimed += len(batch)
        log.debug("batch_claimed", size=len(batch), first_seq=batch[0].seq)
        started = time.perf_counter()
        try:
            results = await self.publisher.publish(batch)
        except BrokerUnavailableError as exc:
            # Not the events' fault: nothing is marked; the leases keep them ours.
            self.metrics.record_outage(type(exc).__name__, len(batch))
            await self._broker_down(str(exc), len(batch))
            return None
        if len(results) != len(batch):
            raise RuntimeError(
                f"{self.publisher.name} returned {len(results)} results for {len(batch)} events"
            )
        self.metrics.record_batch(batch, results, time.perf_counter() - started)
        return results

    async def _broker_down(self, error: str, batch: int) -> None:
        """Open the circuit breaker and wait (or stop) before the next probe."""
        self.stats.broker_failures += 1
        await self._notify()
        pause = self._breaker.record_failure()
        log.warning(
            "broker_unavailable",
            error=error,
            batch=batch,
            retry_in=round(pause, 2),
            failures=self._breaker.failures,
        )
        await self._sleep(pause)

    def _broker_up(self) -> None:
        if self._breaker.is_open:
            log.info("broker_recovered", after_failures=self._breaker.failures)
        self._breaker.record_success()

    def _take_positions(self) -> dict[int, Position] | None:
        """Where the broker stored the events of the last publish (None: not recorded). The
        publisher gets a fresh dict, so the next publish cannot change these."""
        recorder = self._recorder
        if recorder is None or not recorder.positions:
            return None
        taken, recorder.positions = recorder.positions, {}
        return taken

    async def _settle(
        self, plan: Settlement, parked: int, where: dict[int, Position] | None = None
    ) -> None:
        """Record a published batch: delete what was acked, schedule retries, dead-letter."""
        self.stats.held_back += plan.held
        expected = len(plan.delivered) + len(plan.retries) + len(plan.dead)
        changed = 0
        if plan.delivered:
            if where:
                positions = [where.get(seq) for seq in plan.delivered]
                changed += await self.store.mark_delivered(plan.delivered, positions)
            else:
                changed += await self.store.mark_delivered(plan.delivered)
            self.stats.delivered += len(plan.delivered)
            log.debug("batch_published", delivered=len(plan.delivered))
        if plan.retries:
            changed += await self.store.schedule_retries(plan.retries)
            self.stats.retried += len(plan.retries)
        if plan.dead:
            changed += await self.store.move_to_dead_letters(plan.dead)
            self.stats.dead_lettered += len(plan.dead)
            for dead in plan.dead:
                self.metrics.dead_lettered[dead.error_class] += 1
            self.stats.parked += parked
            log.warning(
                "moved_to_dead_letters",
                count=len(plan.dead),
                parked=parked,
                seqs=[d.seq for d in plan.dead][:20],
            )
        if changed < expected:
            # Our lease on some bucket expired (the new owner will (re)publish those events),
            # or a parked event's quarantine was lifted meanwhile (it stays pending).
            self.stats.fenced_off += expected - changed
            log.warning("lease_lost", expected=expected, changed=changed)
        await self._notify()  # the loop may be waiting for work meanwhile (claims beside us)


class _Pipeline:
    """The loop's overlap state: the next claim in flight and the previous batch's settle."""

    def __init__(self) -> None:
        self.prefetch: asyncio.Task[Claim] | None = None
        #: The store's horizon when the prefetch was sent (relay/floor.py).
        self.prefetch_horizon = 0
        self.settling: asyncio.Task[None] | None = None
        self.settling_seqs: list[int] = []
        #: Whether the batch being settled was all delivered (nothing of it stays pending).
        self.settling_clean = False
        #: Keys with an undelivered event in a batch published since the last fresh claim.
        self.gate = KeyGate()
        #: Seqs the gate left out since the last fresh claim: later prefetches skip them too
        #: (else a prefetch chain could claim and drop them again and again).
        self.passed_over: list[int] = []
        #: The plan of the settle that waits for more deliveries (`settle_after`),
        #: and where the broker stored them; `_flush` ends the wait.
        self._lingering: Settlement | None = None
        self._lingering_where: dict[int, Position] | None = None
        self._flush = asyncio.Event()

    def pass_over(self, claim: Claim, admitted: int) -> None:
        if admitted < len(claim):
            self.passed_over += [e.seq for e in claim.events if not self.gate.admits(e)]
            self.passed_over += [d.seq for d in claim.parked if not self.gate.admits(d)]

    async def take_prefetch(self) -> Claim:
        task, self.prefetch = self.prefetch, None
        assert task is not None
        return await task

    def settle(
        self, batch: Sequence[Envelope], parked: Sequence[Dead], work: Coroutine[Any, Any, None]
    ) -> None:
        self.settling = asyncio.create_task(work)
        self.settling_seqs = [e.seq for e in batch] + [d.seq for d in parked]

    def settle_after(
        self,
        linger: float,
        batch: Sequence[Envelope],
        work: Coroutine[Any, Any, None],
        plan: Settlement,
        where: dict[int, Position] | None,
    ) -> None:
        """Run `work`, the settle of a batch that was all delivered (`plan`), after up to
        `linger` seconds, with the deliveries `join_lingering` adds to its plan meanwhile."""
        self._lingering, self._lingering_where = plan, where
        self._flush.clear()
        self.settle(batch, (), self._after_linger(linger, work))

    def join_lingering(self, delivered: list[int], where: dict[int, Position] | None) -> bool:
        """Add a batch that was all delivered to the settle still waiting, if there is one."""
        plan, into = self._lingering, self._lingering_where
        if plan is None or (where is None) != (into is None):
            return False
        plan.delivered += delivered
        self.settling_seqs += delivered
        if into is not None and where is not None:
            into.update(where)
        return True

    async def _after_linger(self, seconds: float, work: Coroutine[Any, Any, None]) -> None:
        try:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(seconds):
                    await self._flush.wait()
        except BaseException:  # cancelled: the settle never runs
            work.close()
            raise
        finally:
            self._lingering = self._lingering_where = None
        await work

    def can_claim_beside(self) -> bool:
        """Whether a claim that leaves out the seqs being settled is as good as a fresh one:
        the settle is still running, its batch was all delivered (its seqs are only being
        deleted), and nothing was held back or passed over since the last fresh claim."""
        task = self.settling
        return (
            task is not None
            and not task.done()
            and self.settling_clean
            and not self.gate
            and not self.passed_over
        )

    async def finish_settling(self) -> None:
        task, self.settling = self.settling, None
        self.settling_seqs = []
        self._flush.set()
        if task is not None:
            await task  # its errors (StoreUnavailableError) surface in the loop

    async def drop_prefetch(self) -> None:
        task, self.prefetch = self.prefetch, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)

    async def reset(self) -> None:
        await self.drop_prefetch()
        task, self.settling = self.settling, None
        self.settling_seqs = []
        self._flush.set()
        self.gate.clear()
        self.passed_over.clear()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
