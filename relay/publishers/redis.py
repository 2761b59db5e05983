"""Redis publisher: XADD to one stream per topic, pipelined (default), or PUBLISH (opt-in)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Literal

import redis.asyncio as aioredis
import structlog
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from outbox.envelope import Envelope
from outbox.urls import redact
from relay.seams import BrokerUnavailableError, Failure, PublishResult

log = structlog.get_logger("relay.redis")

BROKER_DOWN = (RedisConnectionError, RedisTimeoutError, ConnectionError, TimeoutError, OSError)
#: Server replies that pass by themselves (memory, loading, busy script); others are poison.
RETRIABLE_REPLIES = ("OOM", "LOADING", "BUSY", "TRYAGAIN", "MASTERDOWN", "READONLY")


def classify(exc: BaseException) -> Failure:
    if isinstance(exc, ResponseError):
        return Failure.of(exc, retriable=str(exc).startswith(RETRIABLE_REPLIES))
    return Failure.of(exc, retriable=isinstance(exc, BROKER_DOWN))


def pubsub_message(event: Envelope) -> str:
    return json.dumps(
        {k: v.decode() if isinstance(v, bytes) else v for k, v in event.redis_fields().items()},
        separators=(",", ":"),
    )


class RedisPublisher:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        mode: Literal["streams", "pubsub"] = "streams",
        maxlen: int | None = None,
        topic_prefix: str = "",
    ) -> None:
        self.url = url
        self.mode = mode
        self.maxlen = maxlen
        self.topic_prefix = topic_prefix
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
        )

    async def start(self) -> None:
        if self.mode == "pubsub":
            log.warning(
                "redis_pubsub_at_most_once",
                detail="PUBLISH reaches only subscribers connected right now; events "
                "published while nobody listens are lost. Use streams for "
                "at-least-once.",
            )
        try:
            await self._client.ping()
        except BROKER_DOWN as exc:
            raise BrokerUnavailableError(f"redis {redact(self.url)}: {exc!r}") from exc

    async def stop(self) -> None:
        await self._client.aclose()

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        pipe = self._client.pipeline(transaction=False)
        for event in batch:
            name = self.topic_prefix + event.topic
            if self.mode == "streams":
                pipe.xadd(
                    name,
                    event.redis_fields(),  # type: ignore[arg-type]
                    maxlen=self.maxlen,
                    approximate=True,
                )
            else:
                pipe.publish(name, pubsub_message(event))
        try:
            replies = await pipe.execute(raise_on_error=False)
        except BROKER_DOWN as exc:
            raise BrokerUnavailableError(f"redis {redact(self.url)}: {exc!r}") from exc
        results: list[PublishResult] = []
        blocked: set[str] = set()
        for event, reply in zip(batch, replies, strict=True):
            if not isinstance(reply, BaseException):
                results.append(None)  # a stream entry id (streams) or a receiver count (pubsub)
                continue
            failure = classify(reply)
            if event.key is not None and event.key in blocked:
                failure = Failure(failure.error_class, failure.message, True, counted=False)
            elif failure.retriable and event.key is not None:
                blocked.add(event.key)
            results.append(failure)
        return results
