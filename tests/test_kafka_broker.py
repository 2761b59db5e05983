"""The test broker itself (tests/kafka_broker.py): what the chaos suites stand on."""

from __future__ import annotations

import pytest

from tests.kafka_broker import KafkaBroker, free_port_run, kafka_available


@pytest.mark.kafka
def test_a_cluster_id_that_starts_with_a_dash_formats_the_storage() -> None:
    """One random cluster id in 64 starts with '-' (URL-safe base64), which the storage tool's
    argument parser read as an option: CI failed on such an id (stop 28)."""
    if not kafka_available():
        pytest.skip("no Kafka jars in .services/kafka/libs (run scripts/services.sh up)")
    broker = KafkaBroker("dash-id", free_port_run(2, 39292), cluster_id="-AAAAAAAAAAAAAAAAAAAAA")
    try:
        broker.format_storage()
        meta = (broker.data / "meta.properties").read_text()
        assert "cluster.id=-AAAAAAAAAAAAAAAAAAAAA" in meta
    finally:
        broker.cleanup()
