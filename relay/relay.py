"""The relay loop: claim → publish → delete, retry or dead-letter. Imports only the seams.

Embeddable: it never installs signal handlers or exits the process. The CLI and the FastAPI
lifespan both drive a `Relay` and call `request_stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

import structlog

from outbox.envelope import Envelope
from relay.retry import CircuitBreaker, PollPacer, RetryPolicy
from relay.seams import (
    BrokerUnavailableError,
    Dead,
    Publisher,
    PublishResult,
    Retry,
    Store,
    StoreUnavailableError,
)

log = structlog.get_logger("relay")


@dataclass(slots=True)
class RelayStats:
    """Counters since start. Tests and health checks wait on them (`Relay.wait_for`)."""

    batches: int = 0
    claimed: int = 0
    delivered: int = 0
    retried: int = 0
    dead_lettered: int = 0
    held_back: int = 0
    broker_failures: int = 0
    store_failures: int = 0
    fenced_off: int = 0
    owned_buckets: int = 0
    idle: bool = False
    stopped: bool = False


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
        shutdown_timeout: float = 10.0,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.store = store
        self.publisher = publisher
        self.relay_id = relay_id
        self.batch_size = batch_size
        self.poll_interval = poll_interval
        self.lease_seconds = lease_seconds
        self.retry_policy = retry_policy or RetryPolicy()
        self.shutdown_timeout = shutdown_timeout
        self.stats = RelayStats()
        self._rand = rand
        self._breaker = CircuitBreaker(rand=rand)
        self._wake = asyncio.Event()
        self._stopping = asyncio.Event()
        self._changed = asyncio.Condition()
        self._next_rebalance = 0.0

    # -- control -------------------------------------------------------------------------------

    def request_stop(self) -> None:
        """Stop claiming; `run()` finishes the in-flight batch, releases leases and returns."""
        self._stopping.set()
        self._wake.set()

    def wake(self) -> None:
        """New events may be there: claim now instead of at the next poll."""
        self._wake.set()

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
        )
        work = asyncio.create_task(self._loop(), name="outbox-relay-loop")
        leases = asyncio.create_task(self._renew_leases(), name="outbox-relay-leases")
        stopping = asyncio.create_task(self._stopping.wait())
        try:
            await asyncio.wait({work, leases, stopping}, return_when=asyncio.FIRST_COMPLETED)
            self._stopping.set()
            if not work.done():
                try:
                    await asyncio.wait_for(asyncio.shield(work), self.shutdown_timeout)
                except TimeoutError:
                    log.warning(
                        "shutdown_timeout", relay_id=self.relay_id, seconds=self.shutdown_timeout
                    )
        finally:
            self._stopping.set()
            for task in (work, leases, stopping):
                task.cancel()
            await asyncio.gather(work, leases, stopping, return_exceptions=True)
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
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _wait_for_work(self, delay: float) -> bool:
        """A NOTIFY (True), the jittered delay, or stop (True), whichever comes first."""
        try:
            await asyncio.wait_for(self._wake.wait(), delay * (0.8 + 0.4 * self._rand()))
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

    async def _loop(self) -> None:
        """Claim → publish → settle, pipelined: while a batch is published, the next full
        batch is already being claimed, and the previous batch's deletes are being written.

        Per-key order survives the overlap: a prefetched batch never holds an event in flight
        (the claim excludes them), and it drops every event whose key had an undelivered event
        in a batch published before it (those wait for the next fresh claim, which sees the
        retry's new available_at)."""
        store_backoff = CircuitBreaker(rand=self._rand)
        pacer = PollPacer(self.poll_interval)
        announced = True  # whether a NOTIFY (not the timer) ended the last wait
        pipe = _Pipeline()
        try:
            while not self._stopping.is_set():
                try:
                    if pipe.prefetch is None:
                        await pipe.finish_settling()  # a fresh claim sees every settled change
                        pipe.waiting_keys.clear()
                        await self._rebalance_if_due()
                        self._wake.clear()
                        claimed = await self.store.claim(self.batch_size)
                    else:
                        claimed = await pipe.take_prefetch()
                    batch = [e for e in claimed if e.key is None or e.key not in pipe.waiting_keys]
                    if len(claimed) == self.batch_size and not self._stopping.is_set():
                        in_flight = [e.seq for e in claimed] + pipe.settling_seqs
                        pipe.prefetch = asyncio.create_task(
                            self.store.claim(self.batch_size, exclude=in_flight)
                        )
                    if batch:
                        results = await self._publish(batch)
                        if results is None:  # broker down: nothing moves, nothing skips ahead
                            await pipe.drop_prefetch()
                            continue
                        pipe.waiting_keys |= _undelivered_keys(batch, results)
                        await pipe.finish_settling()
                        pipe.settle(batch, self._settle(batch, results))
                    store_backoff.record_success()
                except StoreUnavailableError as exc:
                    await pipe.reset()
                    self.stats.store_failures += 1
                    await self._notify()
                    pause = store_backoff.record_failure()
                    log.warning("store_unavailable", error=str(exc), retry_in=round(pause, 2))
                    await self._sleep(pause)
                    continue
                if pipe.prefetch is None:
                    await pipe.finish_settling()
                    self.stats.idle = not claimed
                await self._notify()
                if len(claimed) < self.batch_size and not self._stopping.is_set():
                    delay = pacer.after_claim(found=bool(claimed), announced=announced)
                    announced = await self._wait_for_work(delay)
            await pipe.finish_settling()  # stopping: what was published gets recorded
        finally:
            await pipe.reset()

    async def _rebalance_if_due(self) -> None:
        # Only between batches: a bucket given back must have nothing of it in flight.
        now = asyncio.get_running_loop().time()
        if now >= self._next_rebalance:
            self.stats.owned_buckets = await self.store.maintain_leases(rebalance=True)
            self._next_rebalance = now + self.lease_seconds / 3

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
        try:
            results = await self.publisher.publish(batch)
        except BrokerUnavailableError as exc:
            # Not the events' fault: nothing is marked; the leases keep them ours.
            self.stats.broker_failures += 1
            await self._notify()
            pause = self._breaker.record_failure()
            log.warning(
                "broker_unavailable",
                error=str(exc),
                batch=len(batch),
                retry_in=round(pause, 2),
                failures=self._breaker.failures,
            )
            await self._sleep(pause)
            return None
        if len(results) != len(batch):
            raise RuntimeError(
                f"{self.publisher.name} returned {len(results)} results for {len(batch)} events"
            )
        if self._breaker.is_open:
            log.info("broker_recovered", after_failures=self._breaker.failures)
        self._breaker.record_success()
        return results

    async def _settle(self, batch: Sequence[Envelope], results: Sequence[PublishResult]) -> None:
        """Record a published batch: delete what was acked, schedule retries, dead-letter."""
        delivered: list[int] = []
        retries: list[Retry] = []
        dead: list[Dead] = []
        blocked_keys: set[str] = set()
        for event, result in zip(batch, results, strict=True):
            if result is None:
                delivered.append(event.seq)
                continue
            if not result.counted or (result.retriable and event.key in blocked_keys):
                self.stats.held_back += 1  # waits behind an earlier event of its key
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
                retriable=result.retriable,
            )
            if result.retriable and not self.retry_policy.exhausted(attempt):
                delay = self.retry_policy.delay(attempt, self._rand)
                retries.append(Retry(event.seq, delay, f"{result.error_class}: {result.message}"))
                if event.key is not None:
                    blocked_keys.add(event.key)
                log.info(
                    "retry_scheduled",
                    event_id=str(event.id),
                    attempt=attempt,
                    delay=round(delay, 3),
                )
            else:
                dead.append(Dead(event.seq, result.error_class, result.message))
        expected = len(delivered) + len(retries) + len(dead)
        changed = 0
        if delivered:
            changed += await self.store.mark_delivered(delivered)
            self.stats.delivered += len(delivered)
            log.debug("batch_published", delivered=len(delivered))
        if retries:
            changed += await self.store.schedule_retries(retries)
            self.stats.retried += len(retries)
        if dead:
            changed += await self.store.move_to_dead_letters(dead)
            self.stats.dead_lettered += len(dead)
            log.warning("moved_to_dead_letters", count=len(dead), seqs=[d.seq for d in dead][:20])
        if changed < expected:
            # Our lease on some bucket expired: the new owner will (re)publish those events.
            self.stats.fenced_off += expected - changed
            log.warning("lease_lost", expected=expected, changed=changed)


def _undelivered_keys(batch: Sequence[Envelope], results: Sequence[PublishResult]) -> set[str]:
    """Keys whose later events must wait: an event of theirs is retried or was held back.
    (A poison event goes to the dead letters and holds nothing up.)"""
    return {
        e.key
        for e, r in zip(batch, results, strict=True)
        if r is not None and e.key is not None and (r.retriable or not r.counted)
    }


class _Pipeline:
    """The loop's overlap state: the next claim in flight and the previous batch's settle."""

    def __init__(self) -> None:
        self.prefetch: asyncio.Task[list[Envelope]] | None = None
        self.settling: asyncio.Task[None] | None = None
        self.settling_seqs: list[int] = []
        #: Keys with an undelivered event in a batch published since the last fresh claim.
        self.waiting_keys: set[str] = set()

    async def take_prefetch(self) -> list[Envelope]:
        task, self.prefetch = self.prefetch, None
        assert task is not None
        return await task

    def settle(self, batch: Sequence[Envelope], work: Coroutine[Any, Any, None]) -> None:
        self.settling = asyncio.create_task(work)
        self.settling_seqs = [e.seq for e in batch]

    async def finish_settling(self) -> None:
        task, self.settling = self.settling, None
        self.settling_seqs = []
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
        self.waiting_keys.clear()
        if task is not None:
            await asyncio.gather(task, return_exceptions=True)
