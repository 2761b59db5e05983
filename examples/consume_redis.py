"""Read the relay's Redis stream entries with redis-py, in any envelope mode.

A consumer group (`XREADGROUP`, `XACK`): each entry goes to one consumer of the group, and an
entry not acknowledged stays pending for it. `Envelope.from_redis` reads every mode, and the
fields of earlier versions. Deduplicate on `event.id`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.exceptions import ResponseError

from outbox import Envelope


async def consume(
    url: str, stream: str, group: str, name: str, handle: Callable[[Envelope], Awaitable[None]]
) -> None:
    client = aioredis.Redis.from_url(url)  # bytes replies: what from_redis takes
    try:
        try:
            await client.xgroup_create(stream, group, id="0", mkstream=True)
        except ResponseError as exc:
            if "BUSYGROUP" not in str(exc):  # the group exists already
                raise
        while True:
            reply: Any = await client.xreadgroup(group, name, {stream: ">"}, count=100, block=5000)
            for _, entries in reply or []:
                for entry_id, fields in entries:
                    await handle(Envelope.from_redis(stream, fields))
                    await client.xack(stream, group, entry_id)
    finally:
        await client.aclose()
