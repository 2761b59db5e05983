"""One typed settings model for the relay. Every field is an OUTBOX_* environment variable and
a flag of `outbox-relay run`."""

from __future__ import annotations

import json
import os
import re
import socket
import uuid
from pathlib import PurePosixPath
from typing import Annotated, Literal
from urllib.parse import unquote, urlsplit

from pydantic import Field, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from outbox.envelope import DEFAULT_SOURCE, EnvelopeMode
from outbox.urls import is_postgres, is_sqlite, redact, register_password, register_secret


def default_relay_id() -> str:
    return f"{socket.gethostname()}-{os.getpid()}-{uuid.uuid4().hex[:6]}"


def default_source(database_url: str) -> str:
    """`/outbox/<database name>`: the same for every relay of one outbox, so that a duplicate
    sent by another relay has the same source and id (without host or credentials)."""
    name = PurePosixPath(unquote(urlsplit(database_url).path)).stem
    return f"{DEFAULT_SOURCE}/{name}" if name else DEFAULT_SOURCE


def parse_topic_modes(value: str) -> dict[str, str]:
    """`topic=mode,topic=mode`, or a JSON object; the modes are checked by the field's type."""
    text = value.strip()
    if text.startswith("{"):
        try:
            document = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ValueError(f"not a JSON object: {exc.msg} at character {exc.pos}") from None
        if not isinstance(document, dict):
            raise ValueError("not a JSON object")
        return document
    modes: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        topic, equals, mode = (part.strip() for part in item.partition("="))
        if not equals or not topic or not mode:
            raise ValueError(f"{item!r}: expected topic=mode (topic=mode,topic=mode)")
        if topic in modes:
            raise ValueError(f"topic {topic!r} is given twice")
        modes[topic] = mode
    return modes


DURATION = re.compile(r"(\d{1,9}(?:\.\d+)?)([smhdw]?)")
DURATION_SECONDS = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86_400, "w": 604_800}


def parse_duration(value: object) -> object:
    """Seconds, or a number and a unit: 90s, 30m, 12h, 7d, 2w."""
    if not isinstance(value, str):
        return value
    match = DURATION.fullmatch(value.strip())
    if match is None:
        raise ValueError(f"{value!r} is not a duration: seconds, or 90s, 30m, 12h, 7d, 2w")
    return float(match[1]) * DURATION_SECONDS[match[2]]


class RelaySettings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="OUTBOX_", extra="forbid", frozen=True, allow_inf_nan=False
    )

    database_url: str = Field(description="postgresql://user:pass@host/db (or sqlite:///file)")
    broker: Literal["kafka", "redis", "stdout"] = Field("kafka", description="where to publish")
    kafka_bootstrap: str = Field("127.0.0.1:9092", description="Kafka bootstrap servers")
    kafka_security_protocol: Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"] = Field(
        "PLAINTEXT", description="Kafka: PLAINTEXT, SSL (TLS), SASL_PLAINTEXT, SASL_SSL"
    )
    kafka_sasl_mechanism: Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"] | None = Field(
        None, description="Kafka SASL mechanism (required with SASL_*)"
    )
    kafka_sasl_username: str | None = Field(None, description="Kafka SASL user name")
    kafka_sasl_password: SecretStr | None = Field(
        None, description="Kafka SASL password (masked in logs and errors)"
    )
    kafka_ssl_ca_file: str | None = Field(
        None,
        description="PEM file of the CAs that signed the brokers' certificates "
        "(default: the system's CAs)",
    )
    kafka_ssl_cert_file: str | None = Field(
        None, description="PEM client certificate, for mutual TLS"
    )
    kafka_ssl_key_file: str | None = Field(
        None, description="PEM key of the client certificate (if not in kafka_ssl_cert_file)"
    )
    kafka_ssl_key_password: SecretStr | None = Field(
        None, description="password of an encrypted kafka_ssl_key_file (masked)"
    )
    redis_url: str = Field("redis://127.0.0.1:6379/0", description="Redis URL")
    redis_mode: Literal["streams", "pubsub"] = Field(
        "streams", description="streams (durable) or pubsub (at-most-once, opt-in)"
    )
    redis_maxlen: int | None = Field(None, gt=0, description="approximate MAXLEN per stream")
    topic_prefix: str = Field("", description="prefix added to every topic / stream name")
    envelope: EnvelopeMode = Field(
        "plain", description="how events are framed for consumers (docs/consumers.md)"
    )
    envelope_topics: Annotated[dict[str, EnvelopeMode], NoDecode] = Field(
        {},
        description="envelope per topic, over `envelope`: topic=mode,topic=mode or a JSON "
        "object (the event's topic, without topic_prefix)",
    )
    source: str | None = Field(
        None, description="CloudEvents `source` (default: /outbox/ and the database's name)"
    )
    jsonl_path: str | None = Field(None, description="stdout broker: append to this file")
    batch_size: int = Field(500, ge=1, le=10_000, description="events claimed per batch")
    max_batch_bytes: int = Field(
        16 * 1024 * 1024,
        ge=1024,
        description="payload bytes claimed per batch, at most (one bigger event still goes)",
    )
    poll_interval: float = Field(
        1.0, gt=0, le=3600, description="longest wait in seconds between polls of an idle relay"
    )
    lease_seconds: float = Field(15.0, ge=1, le=3600, description="bucket lease length")
    database_timeout: float = Field(
        30.0,
        gt=0,
        le=3600,
        description="seconds a relay statement or connection attempt may go unanswered "
        "before its connection is taken for lost",
    )
    poison_policy: Literal["quarantine", "skip"] = Field(
        "quarantine",
        description="quarantine: a dead-lettered event parks the later events of its key "
        "until replayed; skip: the key moves on without it (breaks that key's order)",
    )
    max_attempts: int = Field(10, ge=1, le=1000, description="attempts before dead-lettering")
    backoff_base: float = Field(1.0, gt=0, description="first retry delay, seconds")
    backoff_factor: float = Field(2.0, ge=1, description="retry delay growth factor")
    backoff_max: float = Field(300.0, gt=0, description="longest retry delay, seconds")
    shutdown_timeout: float = Field(10.0, gt=0, description="seconds to finish in-flight work")
    relay_id: str = Field(default_factory=default_relay_id, description="unique per process")
    log_format: Literal["auto", "json", "console"] = Field("auto", description="log rendering")
    log_level: Literal["debug", "info", "warning", "error"] = Field(
        "info", description="lowest log level written"
    )
    event_loop: Literal["auto", "uvloop", "asyncio"] = Field(
        "auto",
        description="outbox-relay run's event loop. auto: uvloop where it is installed (the "
        "relay extra brings it on Linux and macOS), else asyncio's",
    )
    metrics_port: int | None = Field(
        None, ge=1, le=65535, description="serve Prometheus /metrics on this port (off if unset)"
    )
    metrics_host: str = Field("0.0.0.0", description="address the /metrics server binds")  # noqa: S104
    history: Literal["off", "on"] = Field(
        "off",
        description="on: keep delivered events in outbox_delivered (PostgreSQL; "
        "docs/operations.md#delivered-history)",
    )
    history_retention: float = Field(
        7 * 86_400.0,
        gt=0,
        description="with history on, delete delivered events older than this: seconds, "
        "or 30m, 12h, 7d, 2w",
    )
    dead_letter_retention: float | None = Field(
        None,
        gt=0,
        description="delete dead letters older than this (default: keep them; never a "
        "quarantine chain): seconds, or 30m, 12h, 7d, 2w",
    )

    @field_validator("database_url", "redis_url", mode="before")
    @classmethod
    def _remember_secrets(cls, value: object) -> object:
        if isinstance(value, str):
            register_secret(value)  # masked in every log line and error from now on
        return value

    @field_validator("kafka_sasl_password", "kafka_ssl_key_password", mode="before")
    @classmethod
    def _remember_passwords(cls, value: object) -> object:
        secret = value.get_secret_value() if isinstance(value, SecretStr) else value
        if isinstance(secret, str):
            register_password(secret)
        return value

    @field_validator("kafka_security_protocol", "kafka_sasl_mechanism", mode="before")
    @classmethod
    def _upper_case(cls, value: object) -> object:
        return value.upper() if isinstance(value, str) else value

    @field_validator("kafka_ssl_ca_file", "kafka_ssl_cert_file", "kafka_ssl_key_file")
    @classmethod
    def _check_file(cls, value: str | None) -> str | None:
        if value is not None:
            if not os.path.isfile(value):
                raise ValueError(f"{value}: no such file")
            if not os.access(value, os.R_OK):
                raise ValueError(f"{value}: not readable by this user")
        return value

    @field_validator("history_retention", "dead_letter_retention", mode="before")
    @classmethod
    def _parse_duration(cls, value: object) -> object:
        return parse_duration(value)

    @field_validator("envelope_topics", mode="before")
    @classmethod
    def _parse_envelope_topics(cls, value: object) -> object:
        return parse_topic_modes(value) if isinstance(value, str) else value

    @field_validator("source")
    @classmethod
    def _check_source(cls, value: str | None) -> str | None:
        if value is not None and (
            not value or any(c.isspace() or not c.isprintable() for c in value)
        ):
            raise ValueError("must be a non-empty URI reference, without spaces")
        return value

    def event_source(self) -> str:
        """The CloudEvents source: `source`, or one derived from the database's name."""
        return self.source or default_source(self.database_url)

    @field_validator("database_url")
    @classmethod
    def _check_database_url(cls, value: str) -> str:
        if not (is_postgres(value) or is_sqlite(value)):
            raise ValueError(f"{redact(value)!r} must start with postgresql:// or sqlite://")
        return value

    @model_validator(mode="after")
    def _check_retention_store(self) -> RelaySettings:
        """History and retention are the PostgreSQL store's (SQLite is for demos and tests)."""
        if is_sqlite(self.database_url):
            if self.history == "on":
                raise ValueError("history: needs PostgreSQL (database_url is SQLite)")
            if self.dead_letter_retention is not None:
                raise ValueError("dead_letter_retention: needs PostgreSQL (database_url is SQLite)")
        return self

    @model_validator(mode="after")
    def _check_backoff(self) -> RelaySettings:
        if self.backoff_max < self.backoff_base:
            raise ValueError("backoff_max must be >= backoff_base")
        return self

    @model_validator(mode="after")
    def _check_kafka_security(self) -> RelaySettings:
        """Settings that the protocol would ignore, or that it lacks, are refused by name."""
        protocol = self.kafka_security_protocol
        sasl = {
            "kafka_sasl_mechanism": self.kafka_sasl_mechanism,
            "kafka_sasl_username": self.kafka_sasl_username,
            "kafka_sasl_password": self.kafka_sasl_password,
        }
        tls = {
            "kafka_ssl_ca_file": self.kafka_ssl_ca_file,
            "kafka_ssl_cert_file": self.kafka_ssl_cert_file,
            "kafka_ssl_key_file": self.kafka_ssl_key_file,
            "kafka_ssl_key_password": self.kafka_ssl_key_password,
        }
        if protocol.startswith("SASL_"):
            for name, value in sasl.items():
                if not value:
                    raise ValueError(f"{name}: required with kafka_security_protocol {protocol}")
        else:
            for name, value in sasl.items():
                if value:
                    raise ValueError(
                        f"{name}: needs kafka_security_protocol SASL_SSL or SASL_PLAINTEXT "
                        f"(it is {protocol})"
                    )
        if protocol not in ("SSL", "SASL_SSL"):
            for name, value in tls.items():
                if value:
                    raise ValueError(
                        f"{name}: needs kafka_security_protocol SSL or SASL_SSL (it is {protocol})"
                    )
        for name in ("kafka_ssl_key_file", "kafka_ssl_key_password"):
            if tls[name] and not self.kafka_ssl_cert_file:
                raise ValueError(f"{name}: needs kafka_ssl_cert_file (the client certificate)")
        return self
