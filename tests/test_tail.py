"""`outbox-relay tail TOPIC` as a user runs it: a real process reading real Kafka and Redis."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import uuid
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

import pytest

from outbox.envelope import MODES, Encoder, Envelope, EnvelopeMode
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.redis import RedisPublisher
from outbox.relay.seams import Publisher
from tests.test_cli import cli

ROOT = Path(__file__).resolve().parent.parent


def event(topic: str, seq: int = 7) -> Envelope:
    return Envelope(
        seq=seq,
        id=uuid.uuid4(),
        topic=topic,
        key="order-7",
        payload=b'{"order_id": 7, "note": "caf\\u00e9"}',
        headers={"source": "checkout"},
        event_type="OrderPlaced",
        created_at=datetime(2026, 11, 30, 12, 0, tzinfo=UTC),
    )


def publisher(broker: str, url: str, mode: EnvelopeMode = "plain") -> Publisher:
    encoder = Encoder(mode, source="/tests")
    if broker == "kafka":
        return KafkaPublisher(url, encoder=encoder)
    return RedisPublisher(url, encoder=encoder)


async def publish(broker: str, url: str, events: list[Envelope], mode: EnvelopeMode) -> None:
    sender = publisher(broker, url, mode)
    await sender.start()
    try:
        results = await sender.publish(events)
        assert len(results) == len(events)
    finally:
        await sender.stop()


def broker_env(broker: str, url: str) -> dict[str, str]:
    name = "OUTBOX_KAFKA_BOOTSTRAP" if broker == "kafka" else "OUTBOX_REDIS_URL"
    return {"OUTBOX_BROKER": broker, name: url}


@pytest.fixture(params=["kafka", "redis"])
def broker(request: pytest.FixtureRequest) -> tuple[str, str]:
    fixture = "kafka_bootstrap" if request.param == "kafka" else "redis_url"
    return request.param, request.getfixturevalue(fixture)


@pytest.mark.parametrize("mode", MODES)
async def test_tail_from_the_beginning_decodes_every_envelope_mode(
    broker: tuple[str, str], topic: str, mode: EnvelopeMode
) -> None:
    name, url = broker
    sent = [event(topic, 7), event(topic, 8)]
    await publish(name, url, sent, mode)
    env = broker_env(name, url)
    lines = cli("tail", topic, "--from-beginning", "--max", "2", "--json", **env)
    assert lines.returncode == 0, lines.stderr
    got = [json.loads(line) for line in lines.stdout.splitlines()]
    assert [(d["id"], d["seq"], d["key"], d["type"]) for d in got] == [
        (str(e.id), e.seq, "order-7", "OrderPlaced") for e in sent
    ]
    assert got[0]["payload"] == {"order_id": 7, "note": "café"}
    assert got[0]["headers"]["source"] == "checkout"

    text = cli("tail", topic, "--from-beginning", "--max", "1", **env)
    assert text.returncode == 0, text.stderr
    head = f"{sent[0].id} seq=7 key=order-7 type=OrderPlaced "
    assert text.stdout.startswith(head)
    assert text.stdout.count("\n") == 1
    assert json.loads(text.stdout.removeprefix(head)) == {"order_id": 7, "note": "café"}


def read_line(stream: IO[str]) -> str:
    line = stream.readline()
    assert line, "the process closed its output"
    return line


def test_tail_from_now_prints_new_events_and_stops_on_sigint(
    broker: tuple[str, str], topic: str
) -> None:
    name, url = broker
    old = event(topic, 1)
    asyncio.run(publish(name, url, [old], "plain"))  # before tail starts: not shown
    environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    proc = subprocess.Popen(
        [sys.executable, "-m", "outbox.relay.cli", "tail", topic],
        env=environ | broker_env(name, url),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert proc.stderr is not None
        assert proc.stdout is not None
        assert "from now" in read_line(proc.stderr)  # reading: what follows is not missed
        new = event(topic, 2)
        asyncio.run(publish(name, url, [new], "plain"))
        assert read_line(proc.stdout).startswith(f"{new.id} seq=2 key=order-7 ")
        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=30) == 0
        assert proc.stdout.read() == ""
        assert proc.stderr.read() == ""
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize(
    ("args", "env", "named"),
    [
        (("tail", "t", "--broker", "stdout"), {}, "--broker"),
        (("tail", ""), {}, "TOPIC"),
        (("tail", "t", "--max", "0"), {}, "--max"),
        (("tail", "t", "--redis-url", "http://x"), {"OUTBOX_BROKER": "redis"}, "redis_url"),
        (
            ("tail", "t", "--from-beginning"),
            {"OUTBOX_BROKER": "redis", "OUTBOX_REDIS_MODE": "pubsub"},
            "--from-beginning",
        ),
    ],
)
def test_tail_bad_input_is_one_line(args: tuple[str, ...], env: dict[str, Any], named: str) -> None:
    done = cli(*args, **env)
    assert done.returncode != 0
    assert done.stderr.count("\n") == 1, done.stderr
    assert done.stderr.startswith("outbox-relay: error: ")
    assert named in done.stderr


def test_the_tail_commands_of_the_operations_doc_run(kafka_bootstrap: str, redis_url: str) -> None:
    """Each line of docs/operations.md's tail block, as written, on a topic prefix of its own."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    block = doc.split("<!-- tail:start -->", 1)[1].split("<!-- tail:end -->", 1)[0]
    commands = [c.split("#")[0].split() for c in block.splitlines() if c.startswith("outbox-relay")]
    assert len(commands) == 2
    for command in commands:
        prefix = f"doc-{uuid.uuid4().hex[:8]}."
        broker = command[command.index("--broker") + 1] if "--broker" in command else "kafka"
        url = kafka_bootstrap if broker == "kafka" else redis_url
        events = [event(prefix + command[2], seq) for seq in range(1, 11)]
        asyncio.run(publish(broker, url, events, "plain"))
        environ = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
        done = subprocess.run(
            [sys.executable, "-m", "outbox.relay", *command[1:]],
            env=environ
            | broker_env("kafka", kafka_bootstrap)
            | {"OUTBOX_TOPIC_PREFIX": prefix}
            | {"OUTBOX_REDIS_URL": redis_url, "OUTBOX_BROKER": "kafka"},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        lines = done.stdout.splitlines()
        if "--json" in command:
            assert [json.loads(line)["seq"] for line in lines] == list(range(1, 11))
        else:
            assert [line.split()[1] for line in lines] == [f"seq={n}" for n in range(1, 11)]
