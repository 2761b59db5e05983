"""docs/consumers.md: the consumers under examples/ (aiokafka, redis-py, the CloudEvents SDK,
FastStream) run against events the real relay sent to real Kafka and Redis, in each envelope
mode; the code the doc shows is theirs, and its commands run."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import re
import shlex
import signal
import sys
import uuid
from collections.abc import Awaitable, Callable, Coroutine
from pathlib import Path
from types import ModuleType
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from outbox import Envelope
from outbox.envelope import MODES, Encoder, EnvelopeMode
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from tests.helpers import commit_events, pg_relay, relay_process
from tests.test_envelopes import SOURCE, sample_events

ROOT = Path(__file__).resolve().parent.parent
DOC = ROOT / "docs" / "consumers.md"
TIMEOUT = 60.0


def load_example(name: str) -> ModuleType:
    """examples/NAME.py, loaded from its file (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location(
        f"outbox_example_{name}", ROOT / "examples" / f"{name}.py"
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic and FastStream resolve annotations through it
    spec.loader.exec_module(module)
    return module


consume_kafka = load_example("consume_kafka")
consume_redis = load_example("consume_redis")
consume_cloudevents = load_example("consume_cloudevents")
consume_faststream = load_example("consume_faststream")


async def collect(
    count: int, run: Callable[[Callable[[Any], Awaitable[None]]], Coroutine[Any, Any, None]]
) -> list[Any]:
    """Run a consumer until its handler has been called `count` times; what it was given."""
    got: list[Any] = []
    enough = asyncio.Event()

    async def handle(item: Any) -> None:
        got.append(item)
        if len(got) >= count:
            enough.set()

    task = asyncio.create_task(run(handle))
    try:
        async with asyncio.timeout(TIMEOUT):
            done, _ = await asyncio.wait(
                [task, asyncio.create_task(enough.wait())], return_when=asyncio.FIRST_COMPLETED
            )
            if task in done:
                task.result()  # the consumer failed: its error
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    return got


async def relay_sample(
    database_url: str, topic: str, mode: EnvelopeMode, publisher: KafkaPublisher | RedisPublisher
) -> dict[uuid.UUID, Any]:
    """The sample events, sent by the real relay; their payloads by id."""
    events = sample_events(topic)
    await commit_events(database_url, events)
    assert (await pg_relay(database_url, publisher).drain()).delivered == len(events)
    return {e.id: e.payload for e in events}


# -- aiokafka, redis-py: every mode ------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.postgres
@pytest.mark.parametrize("mode", MODES)
async def test_aiokafka_consumer_reads_every_mode(
    database_url: str, kafka_bootstrap: str, topic: str, mode: EnvelopeMode
) -> None:
    encoder = Encoder(mode, source=SOURCE)
    sent = await relay_sample(
        database_url, topic, mode, KafkaPublisher(kafka_bootstrap, encoder=encoder)
    )
    got: list[Envelope] = await collect(
        len(sent), lambda handle: consume_kafka.consume(kafka_bootstrap, topic, "g1", handle)
    )
    assert {e.id: e.json() for e in got} == sent


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("mode", MODES)
async def test_redis_consumer_reads_every_mode(
    database_url: str, redis_url: str, topic: str, mode: EnvelopeMode
) -> None:
    encoder = Encoder(mode, source=SOURCE)
    sent = await relay_sample(database_url, topic, mode, RedisPublisher(redis_url, encoder=encoder))
    got: list[Envelope] = await collect(
        len(sent), lambda handle: consume_redis.consume(redis_url, topic, "g1", "c1", handle)
    )
    assert {e.id: e.json() for e in got} == sent
    assert [e.seq for e in got] == sorted(e.seq for e in got)


# -- the CloudEvents SDK -----------------------------------------------------------------------


@pytest.mark.kafka
@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.parametrize("mode", ["cloudevents-binary", "cloudevents-structured"])
async def test_cloudevents_sdk_consumer_reads_kafka_and_redis(
    database_url: str, kafka_bootstrap: str, redis_url: str, topic: str, mode: EnvelopeMode
) -> None:
    encoder = Encoder(mode, source=SOURCE)
    sent = await relay_sample(
        database_url, topic, mode, KafkaPublisher(kafka_bootstrap, encoder=encoder)
    )
    got = await collect(
        len(sent), lambda handle: consume_cloudevents.consume(kafka_bootstrap, topic, "g", handle)
    )
    assert {uuid.UUID(e.get_id()): e.get_data() for e in got} == sent
    assert {e.get_source() for e in got} == {SOURCE}

    sent = await relay_sample(database_url, topic, mode, RedisPublisher(redis_url, encoder=encoder))
    client = aioredis.Redis.from_url(redis_url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client.xrange(topic)  # type: ignore[assignment]
    finally:
        await client.aclose()
    events = [consume_cloudevents.from_stream_entry(fields) for _, fields in entries]
    assert {uuid.UUID(e.get_id()): e.get_data() for e in events} == sent
    keyed = next(e for e in events if e.get_type() == "OrderPlaced")
    assert keyed.get_subject() == "order-1"
    assert keyed.get_extension("correlationid") == "checkout-7"
    assert int(keyed.get_extension("outboxseq")) > 0


# -- FastStream --------------------------------------------------------------------------------


class Orders:
    """What a FastStream handler was given: (order, message_id, correlation_id)."""

    def __init__(self, count: int) -> None:
        self.got: list[tuple[Any, str, str]] = []
        self.count = count
        self.enough = asyncio.Event()

    async def on_order(self, order: Any, message_id: str, correlation_id: str) -> None:
        self.got.append((order, message_id, correlation_id))
        if len(self.got) >= self.count:
            self.enough.set()

    async def run(self, broker: Any) -> list[tuple[Any, str, str]]:
        async with asyncio.timeout(TIMEOUT):
            await broker.start()
            try:
                await self.enough.wait()
            finally:
                await broker.stop()
        return self.got


def check_faststream(got: list[tuple[Any, str, str]], sent: dict[uuid.UUID, Any]) -> None:
    model = consume_faststream.OrderPlaced
    assert {uuid.UUID(message_id): order for order, message_id, _ in got} == {
        event_id: model(**payload) for event_id, payload in sent.items()
    }
    correlation = {uuid.UUID(message_id): c for _, message_id, c in got}
    first = next(i for i, p in sent.items() if p["order_id"] == 1)
    assert correlation.pop(first) == "checkout-7"  # the event's correlation_id header
    assert all(c == str(i) for i, c in correlation.items())  # else the event id


@pytest.mark.kafka
@pytest.mark.postgres
async def test_faststream_kafka_subscriber_typed_with_the_payloads_model(
    database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    publisher = KafkaPublisher(kafka_bootstrap, encoder=Encoder("faststream"))
    sent = await relay_sample(database_url, topic, "faststream", publisher)
    orders = Orders(len(sent))
    broker = consume_faststream.kafka_broker(kafka_bootstrap, topic, "g", orders.on_order)
    check_faststream(await orders.run(broker), sent)


@pytest.mark.redis
@pytest.mark.postgres
async def test_faststream_redis_subscriber_typed_with_the_payloads_model(
    database_url: str, redis_url: str, topic: str
) -> None:
    publisher = RedisPublisher(redis_url, encoder=Encoder("faststream"))
    sent = await relay_sample(database_url, topic, "faststream", publisher)
    orders = Orders(len(sent))
    broker = consume_faststream.redis_broker(redis_url, topic, "g", orders.on_order)
    check_faststream(await orders.run(broker), sent)


# -- the doc -----------------------------------------------------------------------------------


def python_blocks() -> list[tuple[str, str]]:
    """(example file, code) of each Python block of the doc: its first line names the file."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    out = []
    for block in blocks:
        first, _, code = block.partition("\n")
        assert first.startswith("# examples/"), f"a Python block that names no example: {first}"
        out.append((first.removeprefix("# "), code))
    return out


@pytest.mark.unit
def test_the_docs_python_is_the_examples_code() -> None:
    blocks = python_blocks()
    assert {name for name, _ in blocks} == {
        f"examples/{name}.py"
        for name in (
            "consume_kafka",
            "consume_redis",
            "consume_cloudevents",
            "consume_faststream",
            "fastapi_app",
            "typed_events",
            "consume_inbox",
        )
    }
    for name, code in blocks:
        assert code.strip() in (ROOT / name).read_text(), f"{name} no longer has this code"


def run_commands() -> list[list[str]]:
    """Every `outbox-relay run ...` line of the doc's bash blocks (with VAR=value before)."""
    blocks = re.findall(r"```bash\n(.*?)```", DOC.read_text(), re.DOTALL)
    lines = [line for block in blocks for line in block.splitlines()]
    return [shlex.split(line, comments=True) for line in lines if "outbox-relay run" in line]


@pytest.mark.redis
@pytest.mark.postgres
@pytest.mark.slow
async def test_every_run_command_in_the_doc_runs(
    database_url: str, redis_url: str, pg: asyncpg.Connection
) -> None:
    """Each command, as a real relay process on Redis: the events of "orders" and "payments"
    arrive in the envelope the command asks for."""
    commands = run_commands()
    assert len(commands) >= 3
    for argv in commands:
        env = dict(word.split("=", 1) for word in argv[: argv.index("outbox-relay")])
        args = argv[argv.index("outbox-relay") + 2 :]
        prefix = f"doc-{uuid.uuid4().hex[:6]}-"
        expected = expected_modes(env, args)
        await commit_events(
            database_url, [e for t in ("orders", "payments") for e in sample_events(t)[:1]]
        )
        env |= {"OUTBOX_BROKER": "redis", "OUTBOX_REDIS_URL": redis_url}
        env |= {"OUTBOX_TOPIC_PREFIX": prefix, "OUTBOX_POLL_INTERVAL": "0.2"}
        process = relay_process(database_url, *args, env=env)
        client = aioredis.Redis.from_url(redis_url)
        try:
            for topic in ("orders", "payments"):
                reply: Any = await client.xread({prefix + topic: "0"}, count=1, block=30_000)
                assert reply, f"{argv}: nothing on {prefix + topic}"
                [(_, [(_, fields)])] = reply
                assert mode_of(fields) == expected[topic], argv
                assert Envelope.from_redis(topic, fields).json()["order_id"] == 1
                await client.delete(prefix + topic)
        finally:
            await client.aclose()
            process.send_signal(signal.SIGTERM)
            _, stderr = await asyncio.to_thread(process.communicate, timeout=30)
        assert process.returncode == 0, stderr.decode()[-2000:]
        assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0


def expected_modes(env: dict[str, str], args: list[str]) -> dict[str, str]:
    """The envelope of "orders" and "payments" that a command asks for."""
    options = dict(zip(args[::2], args[1::2], strict=True))
    default = options.get("--envelope", env.get("OUTBOX_ENVELOPE", "plain"))
    topics = options.get("--envelope-topics", env.get("OUTBOX_ENVELOPE_TOPICS", ""))
    per_topic = (
        dict(item.split("=") for item in topics.split(",") if item)
        if topics[:1] != "{"
        else json.loads(topics)
    )
    return {t: per_topic.get(t, default) for t in ("orders", "payments")}


def mode_of(fields: dict[bytes, bytes]) -> str:
    if b"__data__" in fields:
        return "faststream"
    if b"ce_specversion" in fields:
        return "cloudevents-binary"
    if fields.get(b"content-type") == b"application/cloudevents+json":
        return "cloudevents-structured"
    return "plain"
