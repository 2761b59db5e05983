"""The relay loop: claim → publish → delete, retry or dead-letter. Imports only the seams.

Embeddable: it never installs signal handlers or exits the process. The CLI and the FastAPI
lifespan both drive a `Relay` and call `request_stop()`.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import structlog

from outbox.envelope import Envelope
from relay.retry import CircuitBreaker, RetryPolicy
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
        await self._start()
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

    async def _wait_for_work(self) -> None:
        """A NOTIFY, the jittered poll interval, or stop, whichever comes first."""
        timeout = self.poll_interval * (0.8 + 0.4 * self._rand())
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._wake.wait(), timeout)

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
        store_backoff = CircuitBreaker(rand=self._rand)
        loop = asyncio.get_running_loop()
        while not self._stopping.is_set():
            try:
                if loop.time() >= self._next_rebalance:
                    self.stats.owned_buckets = await self.store.maintain_leases(rebalance=True)
                    self._next_rebalance = loop.time() + self.lease_seconds / 3
                self._wake.clear()
                batch = await self.store.claim(self.batch_size)
                if batch:
                    await self._process(batch)
                store_backoff.record_success()
            except StoreUnavailableError as exc:
                self.stats.store_failures += 1
                await self._notify()
                pause = store_backoff.record_failure()
                log.warning("store_unavailable", error=str(exc), retry_in=round(pause, 2))
                await self._sleep(pause)
                continue
            self.stats.idle = not batch
            await self._notify()
            if len(batch) < self.batch_size and not self._stopping.is_set():
                await self._wait_for_work()

    async def _mark_stopped(self) -> None:
        self.stats.stopped = True
        await self._notify()

    async def _notify(self) -> None:
        async with self._changed:
            self._changed.notify_all()

    async def _process(self, batch: list[Envelope]) -> None:
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
            return
        if self._breaker.is_open:
            log.info("broker_recovered", after_failures=self._breaker.failures)
        self._breaker.record_success()
        await self._settle(batch, results)

    async def _settle(self, batch: Sequence[Envelope], results: Sequence[PublishResult]) -> None:
        if len(results) != len(batch):
            raise RuntimeError(
                f"{self.publisher.name} returned {len(results)} results for {len(batch)} events"
            )
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
