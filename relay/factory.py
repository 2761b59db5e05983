"""Builds a `Relay` (store + publisher) from `RelaySettings`. The one place that knows every
implementation; the loop itself knows only the seams."""

from __future__ import annotations

from typing import TYPE_CHECKING

from pydantic import SecretStr

from outbox.envelope import Encoder
from outbox.extras import requires_extra
from outbox.relay.ordering import PoisonPolicy
from outbox.relay.publishers.stdout import JsonLinesPublisher
from outbox.relay.relay import Relay
from outbox.relay.retry import RetryPolicy
from outbox.relay.seams import Publisher, Store
from outbox.relay.settings import RelaySettings
from outbox.urls import is_sqlite

if TYPE_CHECKING:
    from outbox.relay.publishers.kafka_security import KafkaSecurity


def build_store(settings: RelaySettings) -> Store:
    if is_sqlite(settings.database_url):
        with requires_extra("database_url=sqlite://"):
            from outbox.relay.stores.sqlite import SqliteStore

        return SqliteStore(settings.database_url, max_batch_bytes=settings.max_batch_bytes)
    from outbox.relay.stores.postgres import PostgresStore

    return PostgresStore(
        settings.database_url,
        lease_seconds=settings.lease_seconds,
        database_timeout=settings.database_timeout,
        max_batch_bytes=settings.max_batch_bytes,
        history=settings.history == "on",
        # Delivered events are pruned only while history is kept.
        history_retention=settings.history_retention if settings.history == "on" else None,
        dead_letter_retention=settings.dead_letter_retention,
    )


def build_publisher(settings: RelaySettings) -> Publisher:
    if settings.broker == "kafka":
        with requires_extra("broker=kafka"):
            from outbox.relay.publishers.kafka import KafkaPublisher

        return KafkaPublisher(
            settings.kafka_bootstrap,
            topic_prefix=settings.topic_prefix,
            encoder=build_encoder(settings),
            **kafka_security(settings).producer_options(),
        )
    if settings.broker == "redis":
        with requires_extra("broker=redis"):
            from outbox.relay.publishers.redis import RedisPublisher

        return RedisPublisher(
            settings.redis_url,
            mode=settings.redis_mode,
            maxlen=settings.redis_maxlen,
            topic_prefix=settings.topic_prefix,
            encoder=build_encoder(settings),
        )
    return JsonLinesPublisher(settings.jsonl_path)


def build_encoder(settings: RelaySettings) -> Encoder:
    """The envelope of each topic (docs/consumers.md); Kafka and Redis only."""
    return Encoder(settings.envelope, settings.envelope_topics, settings.event_source())


def kafka_security(settings: RelaySettings) -> KafkaSecurity:
    from outbox.relay.publishers.kafka_security import KafkaSecurity

    def secret(value: SecretStr | None) -> str | None:
        return value.get_secret_value() if value is not None else None

    return KafkaSecurity(
        protocol=settings.kafka_security_protocol,
        sasl_mechanism=settings.kafka_sasl_mechanism,
        sasl_username=settings.kafka_sasl_username,
        sasl_password=secret(settings.kafka_sasl_password),
        ssl_ca_file=settings.kafka_ssl_ca_file,
        ssl_cert_file=settings.kafka_ssl_cert_file,
        ssl_key_file=settings.kafka_ssl_key_file,
        ssl_key_password=secret(settings.kafka_ssl_key_password),
    )


def build_relay(settings: RelaySettings) -> Relay:
    return Relay(
        build_store(settings),
        build_publisher(settings),
        relay_id=settings.relay_id,
        batch_size=settings.batch_size,
        poll_interval=settings.poll_interval,
        lease_seconds=settings.lease_seconds,
        retry_policy=RetryPolicy(
            base_seconds=settings.backoff_base,
            factor=settings.backoff_factor,
            max_seconds=settings.backoff_max,
            max_attempts=settings.max_attempts,
        ),
        poison_policy=PoisonPolicy(settings.poison_policy),
        shutdown_timeout=settings.shutdown_timeout,
        record_positions=settings.history == "on",
    )
