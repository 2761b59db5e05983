"""scripts/services.sh as a newcomer meets it: `env` and `kafka-console-consumer`. Never stops
or restarts the shared services."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.kafka_broker import kafka_available

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "scripts" / "services.sh"

pytestmark = pytest.mark.unit

ENV_LINES = (
    "export OUTBOX_DATABASE_URL=postgresql://outbox:outbox-dev@127.0.0.1:5432/outbox\n"
    "export OUTBOX_KAFKA_BOOTSTRAP=127.0.0.1:9092\n"
    "export OUTBOX_REDIS_URL=redis://127.0.0.1:6379/0\n"
)


def test_env_warns_about_each_service_that_is_not_running(tmp_path: Path) -> None:
    """A copy of the script in an empty tree: none of its services was ever started."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(SCRIPT, tmp_path / "scripts" / "services.sh")
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "services.sh"), "env"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0  # `eval "$(... env)"` must not fail a shell
    assert done.stdout == ENV_LINES  # stdout stays what eval reads
    warnings = done.stderr.splitlines()
    assert [line.split(":")[1].split()[0] for line in warnings] == ["postgres", "redis", "kafka"]
    for line in warnings:
        assert line.endswith("is not running: start it with: bash scripts/services.sh up")


@pytest.mark.kafka
def test_kafka_console_consumer_prints_a_record(kafka_bootstrap: str, topic: str) -> None:
    if kafka_bootstrap != "127.0.0.1:9092" or not kafka_available():
        pytest.skip("needs the Kafka of scripts/services.sh")
    from aiokafka import AIOKafkaProducer

    async def send() -> None:
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        try:
            await producer.send_and_wait(topic, b'{"hello": "kafka"}', key=b"k-1")
        finally:
            await producer.stop()

    asyncio.run(send())
    done = subprocess.run(
        ["bash", str(SCRIPT), "kafka-console-consumer", topic, "--max-messages", "1"],
        capture_output=True,
        text=True,
        timeout=300,  # the first run downloads kafka-tools
        check=False,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout == 'k-1\t{"hello": "kafka"}\n'
    assert "Processed a total of 1 messages" in done.stderr
