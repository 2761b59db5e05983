"""Kafka publisher: an idempotent aiokafka producer with acks=all; only acked events count."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from typing import Any

import structlog
from aiokafka import AIOKafkaProducer
from aiokafka.errors import (
    KafkaConnectionError,
    KafkaError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
)
from aiokafka.partitioner import murmur2

from outbox.envelope import Envelope
from relay.seams import HELD_BACK, BrokerUnavailableError, Failure, PublishResult, Verdict

log = structlog.get_logger("relay.kafka")

#: Failures that say "the broker is not there", not "this event is bad".
BROKER_DOWN = (
    KafkaConnectionError,
    KafkaTimeoutError,
    NodeNotReadyError,
    RequestTimedOutError,
    ConnectionError,
    TimeoutError,
)


def classify(exc: BaseException) -> Failure:
    """Retriable Kafka errors are retried with backoff; anything else is poison."""
    retriable = isinstance(exc, KafkaError) and bool(getattr(exc, "retriable", False))
    retriable = retriable or isinstance(exc, BROKER_DOWN)
    return Failure.of(exc, Verdict.RETRY if retriable else Verdict.POISON)


class _NotStarted:
    """Stands in for the producer before start(): a clear error instead of None checks."""

    async def send(self, *_: Any, **__: Any) -> Any:
        raise RuntimeError("KafkaPublisher.start() was not called")

    async def stop(self) -> None:
        return None

    async def partitions_for(self, _: str) -> set[int]:
        raise RuntimeError("KafkaPublisher.start() was not called")


class _KeyPartitions:
    """Kafka's default key → partition mapping (murmur2, as the Java client), memoised.

    aiokafka hashes every message in pure Python (an eighth of the relay's CPU in profiles);
    keys repeat, so each is hashed once per partition count. Counts are re-read every 30 s."""

    REFRESH_SECONDS = 30.0
    MAX_KEYS = 100_000

    def __init__(self) -> None:
        self._counts: dict[str, tuple[int, float]] = {}
        self._by_key: dict[tuple[bytes, int], int] = {}

    async def partition(self, producer: Any, topic: str, key: bytes) -> int:
        now = asyncio.get_running_loop().time()
        count, read_at = self._counts.get(topic, (0, 0.0))
        if not count or now - read_at > self.REFRESH_SECONDS:
            count = len(await producer.partitions_for(topic))
            self._counts[topic] = (count, now)
        found = self._by_key.get((key, count))
        if found is None:
            if len(self._by_key) >= self.MAX_KEYS:
                self._by_key.clear()
            found = self._by_key[(key, count)] = (murmur2(key) & 0x7FFFFFFF) % count
        return found


class KafkaPublisher:
    name = "kafka"

    def __init__(
        self,
        bootstrap_servers: str,
        *,
        topic_prefix: str = "",
        request_timeout_ms: int = 15_000,
        **producer_options: Any,
    ) -> None:
        self.bootstrap_servers = bootstrap_servers
        self.topic_prefix = topic_prefix
        self._options: dict[str, Any] = {
            "enable_idempotence": True,
            "acks": "all",
            "linger_ms": 0,
            "max_batch_size": 512 * 1024,
            "max_request_size": 2 * 1024 * 1024,
            "request_timeout_ms": request_timeout_ms,
            "client_id": "outbox-relay",
            **producer_options,
        }
        self._ack_timeout = request_timeout_ms / 1000 + 5
        self._producer: AIOKafkaProducer | _NotStarted = _NotStarted()
        self._broken = False
        self._partitions = _KeyPartitions()

    async def start(self) -> None:
        producer = AIOKafkaProducer(bootstrap_servers=self.bootstrap_servers, **self._options)
        try:
            await producer.start()
        except BROKER_DOWN as exc:
            with contextlib.suppress(Exception):
                await producer.stop()
            raise BrokerUnavailableError(f"kafka {self.bootstrap_servers}: {exc!r}") from exc
        self._producer = producer
        self._broken = False

    async def stop(self) -> None:
        producer, self._producer = self._producer, _NotStarted()
        await producer.stop()  # flushes what is still buffered

    async def _restart(self) -> None:
        old, self._producer = self._producer, _NotStarted()
        with contextlib.suppress(Exception):
            await asyncio.wait_for(old.stop(), 5)
        await self.start()

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        if self._broken:
            await self._restart()  # after an outage a fresh producer resets its sequences
        results: list[PublishResult] = [None] * len(batch)
        pending: list[tuple[int, asyncio.Future[Any]]] = []
        blocked: set[str] = set()
        for i, event in enumerate(batch):
            if event.key is not None and event.key in blocked:
                results[i] = HELD_BACK
                continue
            topic = self.topic_prefix + event.topic
            key = event.key.encode() if event.key is not None else None
            try:
                partition = (
                    await self._partitions.partition(self._producer, topic, key)
                    if key is not None
                    else None
                )
                future = await self._producer.send(
                    topic,
                    value=event.payload,
                    key=key,
                    headers=event.kafka_headers(),
                    partition=partition,
                )
            except BROKER_DOWN as exc:
                self._broken = True
                raise BrokerUnavailableError(f"kafka {self.bootstrap_servers}: {exc!r}") from exc
            except Exception as exc:  # noqa: BLE001 - any send error is that event's result
                results[i] = classify(exc)
                if event.key is not None:
                    blocked.add(event.key)
            else:
                pending.append((i, future))
        try:
            # aiokafka can keep retrying a dead broker for long; our own deadline ends that.
            outcomes = await asyncio.wait_for(
                asyncio.gather(*(f for _, f in pending), return_exceptions=True),
                self._ack_timeout,
            )
        except TimeoutError as exc:
            self._broken = True
            raise BrokerUnavailableError(
                f"kafka {self.bootstrap_servers}: no ack within {self._ack_timeout:.0f}s"
            ) from exc
        failures = 0
        down = 0
        for (i, _), outcome in zip(pending, outcomes, strict=True):
            if isinstance(outcome, BaseException):
                failures += 1
                down += isinstance(outcome, BROKER_DOWN)
                results[i] = classify(outcome)
        if pending and down == len(pending):
            self._broken = True
            raise BrokerUnavailableError(f"kafka {self.bootstrap_servers}: every send timed out")
        return results
