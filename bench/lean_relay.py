"""The lean ceiling: the naive floor's claim and delete, with records sent the cheapest way we
know per broker. No order across processes, no retries, no leases, no envelope beyond the naive
floor's own (Kafka: outbox-id and outbox-seq headers; Redis: id, seq, key, payload fields), so
the gap to the naive floor is the transport alone.

- Kafka: one aiokafka `create_batch` per partition (the default partitioner's choice, so keys
  land where `send` would put them), filled with `append` and sent with `send_batch`.
- Redis: every XADD of the batch packed into one socket write; the replies parsed by hiredis.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import hiredis
from aiokafka import AIOKafkaProducer

from bench.naive_relay import Publish


def kafka_publisher(producer: AIOKafkaProducer) -> Publish:
    partitions: dict[str, list[int]] = {}

    async def partitions_of(topic: str) -> list[int]:
        known = partitions.get(topic)
        if known is None:
            known = partitions[topic] = sorted(await producer.partitions_for(topic))
        return known

    async def publish(rows: Sequence[asyncpg.Record]) -> None:
        batches: dict[tuple[str, int], Any] = {}
        sent: list[Any] = []
        for r in rows:
            topic, key = r["topic"], r["key"].encode()
            every = await partitions_of(topic)
            partition = producer._partitioner(key, every, every)
            batch = batches.get((topic, partition))
            if batch is None:
                batch = batches[(topic, partition)] = producer.create_batch()
            record = {
                "timestamp": None,
                "key": key,
                "value": r["payload"].encode(),
                "headers": [("outbox-id", str(r["id"]).encode()), ("outbox-seq", b"%d" % r["seq"])],
            }
            if batch.append(**record) is None:  # full: send it, start the next
                sent.append(await producer.send_batch(batch, topic, partition=partition))
                batch = batches[(topic, partition)] = producer.create_batch()
                batch.append(**record)
        for (topic, partition), batch in batches.items():
            sent.append(await producer.send_batch(batch, topic, partition=partition))
        await asyncio.gather(*sent)

    return publish


def _command(*args: bytes) -> bytes:
    return b"*%d\r\n" % len(args) + b"".join(b"$%d\r\n%s\r\n" % (len(a), a) for a in args)


class RawRedis:
    """A Redis connection that writes packed commands and reads replies with hiredis."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader()

    @classmethod
    async def connect(cls, url: str) -> RawRedis:
        parts = urlsplit(url)
        reader, writer = await asyncio.open_connection(parts.hostname, parts.port or 6379)
        conn = cls(reader, writer)
        db = parts.path.strip("/") or "0"
        if db != "0":
            await conn.execute([_command(b"SELECT", db.encode())])
        return conn

    async def execute(self, commands: list[bytes]) -> list[Any]:
        self.writer.write(b"".join(commands))
        await self.writer.drain()
        replies: list[Any] = []
        while len(replies) < len(commands):
            reply = self.parser.gets()
            if reply is False:
                data = await self.reader.read(1 << 16)
                if not data:
                    raise ConnectionError("redis closed the connection")
                self.parser.feed(data)
            elif isinstance(reply, hiredis.ReplyError):
                raise reply
            else:
                replies.append(reply)
        return replies

    async def close(self) -> None:
        self.writer.close()
        await self.writer.wait_closed()


def redis_publisher(conn: RawRedis) -> Publish:
    async def publish(rows: Sequence[asyncpg.Record]) -> None:
        await conn.execute(
            [
                _command(
                    b"XADD",
                    r["topic"].encode(),
                    b"*",
                    b"outbox-id",
                    str(r["id"]).encode(),
                    b"outbox-seq",
                    b"%d" % r["seq"],
                    b"outbox-key",
                    r["key"].encode(),
                    b"outbox-payload",
                    r["payload"].encode(),
                )
                for r in rows
            ]
        )

    return publish
