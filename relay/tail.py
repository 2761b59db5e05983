"""`outbox-relay tail TOPIC`: print what the relay published to one Kafka topic or Redis
stream, one line per event, decoded from any envelope mode (`Envelope.from_kafka`,
`from_redis`, `from_redis_message`). A tool for people, not a consumer: no group, no commits.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable
from typing import Any

from outbox.envelope import Envelope
from outbox.extras import requires_extra
from outbox.relay.seams import ConfigurationError
from outbox.relay.settings import RelaySettings
from outbox.urls import redact

#: How long one read waits before it looks at the stop event again.
POLL_SECONDS = 0.5


def render(event: Envelope, *, as_json: bool) -> str:
    """One line: `id seq key type payload`, or one JSON document."""
    text = event.payload.decode("utf-8", errors="replace")
    if as_json:
        try:
            payload: Any = json.loads(text)
        except ValueError:
            payload = text
        return json.dumps(
            {
                "id": str(event.id),
                "seq": event.seq,
                "topic": event.topic,
                "key": event.key,
                "type": event.event_type,
                "created_at": event.created_at.isoformat() if event.created_at else None,
                "headers": dict(event.headers),
                "payload": payload,
            },
            ensure_ascii=False,
        )
    one_line = text.replace("\n", "\\n").replace("\r", "\\r")  # JSON has none but between tokens
    return f"{event.id} seq={event.seq} key={event.key} type={event.event_type} {one_line}"


async def tail(
    settings: RelaySettings,
    topic: str,
    *,
    from_beginning: bool,
    max_events: int | None,
    as_json: bool,
    stop: asyncio.Event,
    emit: Callable[[str], None],
    ready: Callable[[str], None],
    warn: Callable[[str], None],
) -> int:
    """Call `emit` with each event of `topic` (with the relay's topic prefix) until `stop` is
    set or `max_events` were seen; `ready` once reading has begun, `warn` with each record the
    relay did not write (skipped). Returns the count."""
    name = settings.topic_prefix + topic
    if settings.broker == "kafka":
        events = _kafka(settings, name, from_beginning, stop, ready)
    elif settings.broker == "redis":
        events = _redis(settings, name, from_beginning, stop, ready)
    else:
        raise ConfigurationError("broker: tail reads kafka or redis; stdout writes jsonl_path")
    seen = 0
    async for event in events:
        if isinstance(event, str):  # not written by the relay: said on stderr, skipped
            warn(event)
            continue
        emit(render(event, as_json=as_json))
        seen += 1
        if max_events is not None and seen >= max_events:
            break
    return seen


async def _kafka(
    settings: RelaySettings,
    name: str,
    from_beginning: bool,
    stop: asyncio.Event,
    ready: Callable[[str], None],
) -> AsyncIterator[Envelope | str]:
    with requires_extra("broker=kafka"):
        from aiokafka import AIOKafkaConsumer, TopicPartition

    from outbox.relay.factory import kafka_security

    consumer = AIOKafkaConsumer(
        bootstrap_servers=settings.kafka_bootstrap,
        group_id=None,
        enable_auto_commit=False,
        auto_offset_reset="earliest" if from_beginning else "latest",
        **kafka_security(settings).producer_options(),
    )
    await consumer.start()
    try:
        partitions: set[int] | None = None
        while not partitions:  # a topic nobody wrote yet: wait until it exists
            await consumer._client.force_metadata_update()  # no public call does it
            partitions = consumer.partitions_for_topic(name)
            if not partitions and await _stopped(stop, POLL_SECONDS):
                return
        assigned = [TopicPartition(name, p) for p in sorted(partitions)]
        consumer.assign(assigned)
        for tp in assigned:  # resolve "from now" before saying ready: nothing is missed
            await consumer.position(tp)
        ready(f"kafka topic {name}")
        while not stop.is_set():
            batches = await consumer.getmany(timeout_ms=int(POLL_SECONDS * 1000))
            for records in batches.values():
                for r in records:
                    where = f"{r.topic}[{r.partition}]@{r.offset}"
                    yield _decoded(where, Envelope.from_kafka, r.topic, r.key, r.value, r.headers)
    finally:
        await consumer.stop()


async def _redis(
    settings: RelaySettings,
    name: str,
    from_beginning: bool,
    stop: asyncio.Event,
    ready: Callable[[str], None],
) -> AsyncIterator[Envelope | str]:
    with requires_extra("broker=redis"):
        import redis.asyncio as aioredis

    # Any: redis-py's annotations of xread/xrevrange cover every protocol version at once.
    try:
        client: Any = aioredis.Redis.from_url(settings.redis_url, socket_connect_timeout=5)
    except ValueError as exc:  # a scheme or a query value redis-py cannot parse
        raise ConfigurationError(f"redis_url: {redact(settings.redis_url)}: {exc}") from exc
    try:
        if settings.redis_mode == "pubsub":
            if from_beginning:
                raise ConfigurationError(
                    "--from-beginning: redis pub/sub keeps no history (redis_mode is pubsub)"
                )
            async for event in _redis_pubsub(client, name, stop, ready):
                yield event
            return
        last = await client.xrevrange(name, count=1)
        after: bytes | str = "0-0" if from_beginning or not last else last[0][0]
        ready(f"redis stream {name}")
        block = int(POLL_SECONDS * 1000)
        while not stop.is_set():
            found = await client.xread({name: after}, count=100, block=block)
            for _, entries in found:
                for entry_id, fields in entries:
                    after = entry_id
                    yield _decoded(f"{name} {entry_id!r}", Envelope.from_redis, name, fields)
    finally:
        await client.aclose()


async def _redis_pubsub(
    client: Any, name: str, stop: asyncio.Event, ready: Callable[[str], None]
) -> AsyncIterator[Envelope | str]:
    pubsub = client.pubsub()
    await pubsub.subscribe(name)
    try:
        ready(f"redis channel {name}")
        while not stop.is_set():
            message = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL_SECONDS)
            if message is not None:
                data = message["data"]
                yield _decoded(name, Envelope.from_redis_message, name, data)
    finally:
        await pubsub.aclose()


def _decoded(where: str, decode: Callable[..., Envelope], *args: Any) -> Envelope | str:
    """The event, or a one-line warning for a record the relay did not write."""
    try:
        return decode(*args)
    except (ValueError, KeyError, TypeError) as exc:
        return f"skipped {where}: {str(exc).splitlines()[0] if str(exc) else type(exc).__name__}"


async def _stopped(stop: asyncio.Event, seconds: float) -> bool:
    """Wait up to `seconds` for `stop`; True if it is set."""
    try:
        async with asyncio.timeout(seconds):
            await stop.wait()
    except TimeoutError:
        return False
    return True
