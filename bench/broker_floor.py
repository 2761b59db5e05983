"""The broker floor of the latency runs: records written straight to the broker, with no
database and no relay, at a steady rate, one at a time, each awaited as the relay awaits its
acks at low rates. The harness's consumer times them as it times the relay's events, so the
floor is what the broker and the consumer alone add to a commit -> consumer latency.

The relay's client libraries and settings (aiokafka: idempotent, acks=all, linger 0; Redis:
XADD on redis-py's asyncio client), the same payload and keys. Writes
`{"sent": {bench id: monotonic time before the send}, "started": ..., "ended": ...}` to --out.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis
from aiokafka import AIOKafkaProducer

from bench.seed import key_of, new_bench_id, payload
from outbox.relay.cli import run_async

KAFKA_OPTIONS: dict[str, Any] = {"enable_idempotence": True, "acks": "all", "linger_ms": 0}


class Sender:
    """`send(key, value)` returns once the broker has the record."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.topic = args.topic
        self.kafka: AIOKafkaProducer | None = None
        self.redis: aioredis.Redis | None = None
        if args.broker == "kafka":
            self.kafka = AIOKafkaProducer(bootstrap_servers=args.kafka_bootstrap, **KAFKA_OPTIONS)
        else:
            self.redis = aioredis.Redis.from_url(args.redis_url)

    async def start(self) -> None:
        if self.kafka is not None:
            await self.kafka.start()

    async def send(self, key: str, value: str) -> None:
        if self.kafka is not None:
            await (await self.kafka.send(self.topic, value.encode(), key=key.encode()))
        elif self.redis is not None:
            await self.redis.xadd(self.topic, {"key": key, "payload": value})

    async def close(self) -> None:
        if self.kafka is not None:
            await self.kafka.stop()
        if self.redis is not None:
            await self.redis.aclose()


async def produce(args: argparse.Namespace) -> dict[str, Any]:
    sender = Sender(args)
    await sender.start()
    try:
        sent: dict[str, float] = {}
        total = int(args.rate * (args.lead_in + args.seconds))
        begun = time.monotonic()
        started = begun + args.lead_in
        for n in range(total):
            delay = begun + n / args.rate - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            bench_id = new_bench_id()
            at = time.monotonic()
            await sender.send(key_of(n, args.keys), payload(n, bench_id))
            if at >= started:
                sent[bench_id] = at
        return {"sent": sent, "started": started, "ended": time.monotonic()}
    finally:
        await sender.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--broker", choices=("kafka", "redis"), required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--rate", type=float, required=True, help="records/s")
    parser.add_argument("--seconds", type=float, required=True)
    parser.add_argument("--lead-in", type=float, default=0.0, help="seconds sent, unmeasured")
    parser.add_argument("--keys", type=int, default=1000)
    parser.add_argument("--kafka-bootstrap", default="127.0.0.1:9092")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    result = run_async(produce(args), "auto")
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
