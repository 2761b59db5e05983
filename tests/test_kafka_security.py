"""Kafka over SASL and TLS, against a real broker of our own (tests/kafka_broker.py): one
KRaft broker for the module with a SASL_PLAINTEXT listener (PLAIN, SCRAM-SHA-256), a SASL_SSL
listener (PLAIN, SCRAM-SHA-512) and an SSL listener that requires a client certificate
(mutual TLS), all with certificates signed by a throwaway CA. Setup and reads go through its
PLAINTEXT listener.

The relay delivers over each; a wrong password and a CA that does not verify the broker make
`outbox-relay run` exit 2 with one line (the password never shows). The checks of the settings
themselves need no broker (marked unit)."""

from __future__ import annotations

import asyncio
import os
import re
import shlex
import ssl
import subprocess
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay.factory import build_publisher, build_relay, kafka_security
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.publishers.kafka_security import KafkaSecurity, configuration_problem
from outbox.relay.seams import BrokerUnavailableError, ConfigurationError
from outbox.relay.settings import RelaySettings
from outbox.urls import redact_text
from tests.helpers import ROOT, commit_events, create_topic, read_topic, relay_process
from tests.kafka_broker import KafkaBroker, free_port_run, kafka_available
from tests.test_schema import outbox_cli

USER = "alice"
PASSWORD = "Alice-s3cret-Kafka"  # the throwaway broker's test user
WRONG = "Wr0ng-pass-Kafka"
KEY_PASSWORD = "client-key-pass"  # the throwaway client key's


# -- certificates and the broker -----------------------------------------------------------


@dataclass(frozen=True)
class Tls:
    ca: Path
    broker: Path  # PKCS#8 key + certificate, for the broker's PEM keystore
    client_cert: Path
    client_key: Path  # encrypted with KEY_PASSWORD
    other_ca: Path  # a CA that signed nothing here


def openssl(*args: str | Path) -> None:
    subprocess.run(["openssl", *map(str, args)], check=True, capture_output=True, timeout=60)


def make_tls(d: Path) -> Tls:
    """A CA, a broker certificate for 127.0.0.1 and a client certificate signed by it, and
    another CA."""
    for ca in ("ca", "other-ca"):
        openssl(
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN=outbox test {ca}", "-keyout", d / f"{ca}.key", "-out", d / f"{ca}.crt",
        )  # fmt: skip
    (d / "broker.ext").write_text("subjectAltName=IP:127.0.0.1\n")
    signed: list[tuple[str, str, list[str | Path]]] = [
        ("broker", "/CN=127.0.0.1", ["-extfile", d / "broker.ext"]),
        ("client", f"/CN={USER}", []),
    ]
    for name, subject, ext in signed:
        openssl(
            "req", "-newkey", "rsa:2048", "-nodes", "-subj", subject,
            "-keyout", d / f"{name}.key", "-out", d / f"{name}.csr",
        )  # fmt: skip
        openssl(
            "x509", "-req", "-in", d / f"{name}.csr", "-CA", d / "ca.crt", "-CAkey", d / "ca.key",
            "-CAcreateserial", "-days", "2", "-out", d / f"{name}.crt", *ext,
        )  # fmt: skip
    openssl(
        "pkcs8", "-topk8", "-in", d / "client.key", "-out", d / "client.enc.key",
        "-v2", "aes-256-cbc", "-passout", f"pass:{KEY_PASSWORD}",
    )  # fmt: skip
    broker = d / "broker.pem"
    broker.write_text((d / "broker.key").read_text() + (d / "broker.crt").read_text())
    return Tls(d / "ca.crt", broker, d / "client.crt", d / "client.enc.key", d / "other-ca.crt")


@dataclass(frozen=True)
class SecureBroker:
    broker: KafkaBroker
    tls: Tls

    @property
    def plaintext(self) -> str:
        return self.broker.bootstrap

    def address(self, listener: str) -> str:
        return f"127.0.0.1:{self.broker.listeners[listener]}"


@pytest.fixture(scope="module")
def tls(tmp_path_factory: pytest.TempPathFactory) -> Tls:
    return make_tls(tmp_path_factory.mktemp("kafka-tls"))


@pytest.fixture(scope="module")
def secure_broker(tls: Tls) -> Iterator[SecureBroker]:
    if not kafka_available():
        pytest.skip("no Kafka jars in .services/kafka/libs (run scripts/services.sh up)")
    port = free_port_run(5, 19400)
    plain = (
        "org.apache.kafka.common.security.plain.PlainLoginModule required "
        f'user_{USER}="{PASSWORD}";'
    )
    scram = "org.apache.kafka.common.security.scram.ScramLoginModule required;"
    settings = {
        "sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256,SCRAM-SHA-512",
        "listener.name.sasl_plaintext.sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-256",
        "listener.name.sasl_plaintext.plain.sasl.jaas.config": plain,
        "listener.name.sasl_plaintext.scram-sha-256.sasl.jaas.config": scram,
        "listener.name.sasl_ssl.sasl.enabled.mechanisms": "PLAIN,SCRAM-SHA-512",
        "listener.name.sasl_ssl.plain.sasl.jaas.config": plain,
        "listener.name.sasl_ssl.scram-sha-512.sasl.jaas.config": scram,
        "ssl.keystore.type": "PEM",
        "ssl.keystore.location": str(tls.broker),
        "ssl.truststore.type": "PEM",
        "ssl.truststore.location": str(tls.ca),
        "listener.name.ssl.ssl.client.auth": "required",
    }
    broker = KafkaBroker(
        "security",
        port,
        settings=settings,
        listeners={"SASL_PLAINTEXT": port + 2, "SSL": port + 3, "SASL_SSL": port + 4},
        scram=[
            f"SCRAM-SHA-256=[name={USER},password={PASSWORD}]",
            f"SCRAM-SHA-512=[name={USER},password={PASSWORD}]",
        ],
    )
    try:
        broker.start()
        yield SecureBroker(broker, tls)
    finally:
        broker.cleanup()


def settings_for(database_url: str, bootstrap: str, **kafka: Any) -> RelaySettings:
    return RelaySettings(
        database_url=database_url,
        broker="kafka",
        kafka_bootstrap=bootstrap,
        poll_interval=0.2,
        **{f"kafka_{k}": v for k, v in kafka.items()},
    )


def events(topic: str, count: int = 5) -> list[OutboxEvent]:
    return [OutboxEvent(topic=topic, key=f"k{n % 2}", payload={"n": n}) for n in range(count)]


async def assert_delivered(relay_settings: RelaySettings, plaintext: str, topic: str) -> None:
    """The relay drains the outbox over the secured listener; a consumer on the PLAINTEXT
    listener reads the events back."""
    await create_topic(plaintext, topic)
    await commit_events(relay_settings.database_url, events(topic))
    stats = await build_relay(relay_settings).drain()
    assert stats.delivered == 5
    received = await read_topic(plaintext, topic, 5, timeout=30)
    assert sorted(e.json()["n"] for e in received) == list(range(5))


# -- delivery over SASL and TLS --------------------------------------------------------------


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_the_relay_delivers_over_sasl_plaintext(
    database_url: str, secure_broker: SecureBroker, mechanism: str
) -> None:
    relay_settings = settings_for(
        database_url,
        secure_broker.address("SASL_PLAINTEXT"),
        security_protocol="SASL_PLAINTEXT",
        sasl_mechanism=mechanism,
        sasl_username=USER,
        sasl_password=PASSWORD,
    )
    await assert_delivered(relay_settings, secure_broker.plaintext, f"sasl-{uuid.uuid4().hex[:8]}")


@pytest.mark.postgres
@pytest.mark.kafka
async def test_every_producer_gets_the_security_options(
    secure_broker: SecureBroker, topic: str
) -> None:
    """The publisher replaces its producer after an outage or a failed batch: the new one
    authenticates too (SCRAM-SHA-512 over TLS)."""
    relay_settings = settings_for(
        "sqlite:///unused.db",
        secure_broker.address("SASL_SSL"),
        security_protocol="SASL_SSL",
        sasl_mechanism="SCRAM-SHA-512",
        sasl_username=USER,
        sasl_password=PASSWORD,
        ssl_ca_file=str(secure_broker.tls.ca),
    )
    await create_topic(secure_broker.plaintext, topic)
    publisher = build_publisher(relay_settings)
    assert isinstance(publisher, KafkaPublisher)
    batch = [Envelope(seq=n, id=uuid.uuid4(), topic=topic, key="k", payload=b"{}") for n in (1, 2)]
    try:
        await publisher.start()
        assert await publisher.publish(batch[:1]) == [None]
        first = publisher._producer
        await publisher._fresh_producer("test: a replaced producer")
        assert publisher._producer is not first
        assert await publisher.publish(batch[1:]) == [None]
    finally:
        await publisher.stop()
    assert len(await read_topic(secure_broker.plaintext, topic, 2, timeout=30)) == 2


def documented_examples() -> list[dict[str, str]]:
    """The OUTBOX_* variables of each bash example of docs/operations.md, "Kafka security"."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    section = doc[doc.index("\n## Kafka security\n") :]
    section = section[: section.index("\n## ", 1)]
    examples = []
    for block in re.findall(r"```bash\n(.*?)```", section, re.DOTALL):
        words = [shlex.split(line, comments=True) for line in block.splitlines()]
        examples.append(dict(w[1].split("=", 1) for w in words if w[:1] == ["export"]))
    return examples


def pointed_at(example: dict[str, str], broker: SecureBroker) -> dict[str, str]:
    """A documented example with the test broker's address, user, passwords and files in
    place of the placeholders (and our CA where the example trusts the system's CAs)."""
    tls = broker.tls
    protocol = example["OUTBOX_KAFKA_SECURITY_PROTOCOL"]
    ours = {
        "OUTBOX_KAFKA_BOOTSTRAP": broker.address(protocol),
        "OUTBOX_KAFKA_SASL_USERNAME": USER,
        "OUTBOX_KAFKA_SASL_PASSWORD": PASSWORD,
        "OUTBOX_KAFKA_SSL_CA_FILE": str(tls.ca),
        "OUTBOX_KAFKA_SSL_CERT_FILE": str(tls.client_cert),
        "OUTBOX_KAFKA_SSL_KEY_FILE": str(tls.client_key),
        "OUTBOX_KAFKA_SSL_KEY_PASSWORD": KEY_PASSWORD,
    }
    env = {name: ours.get(name, value) for name, value in example.items()}
    env["OUTBOX_KAFKA_BOOTSTRAP"] = ours["OUTBOX_KAFKA_BOOTSTRAP"]
    env.setdefault("OUTBOX_KAFKA_SSL_CA_FILE", ours["OUTBOX_KAFKA_SSL_CA_FILE"])
    return env


@pytest.mark.unit
def test_the_docs_show_three_kafka_security_examples() -> None:
    shown = [
        (e["OUTBOX_KAFKA_SECURITY_PROTOCOL"], e.get("OUTBOX_KAFKA_SASL_MECHANISM"))
        for e in documented_examples()
    ]
    assert shown == [("SASL_SSL", "PLAIN"), ("SASL_SSL", "SCRAM-SHA-512"), ("SSL", None)]


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.parametrize(
    "example", documented_examples(), ids=["confluent-plain", "msk-scram", "mutual-tls"]
)
async def test_the_cli_delivers_with_each_documented_example(
    database_url: str, secure_broker: SecureBroker, topic: str, example: dict[str, str]
) -> None:
    """The real `outbox-relay run`, configured by the docs' OUTBOX_* variables only. The
    broker checks the password or the relay's certificate; the relay checks the broker's
    against our CA."""
    await create_topic(secure_broker.plaintext, topic)
    await commit_events(database_url, events(topic))
    env = pointed_at(example, secure_broker)
    proc = relay_process(database_url, "--broker", "kafka", env=env)
    try:
        received = await read_topic(secure_broker.plaintext, topic, 5, timeout=60)
    finally:
        proc.terminate()
        out, err = await asyncio.to_thread(proc.communicate, timeout=30)
    assert sorted(e.json()["n"] for e in received) == list(range(5)), err.decode()[-2000:]
    assert proc.returncode == 0, err.decode()[-2000:]
    assert PASSWORD not in (out + err).decode()
    assert KEY_PASSWORD not in (out + err).decode()


# -- refused at start: exit 2, one line ------------------------------------------------------


async def run_until_exit(database_url: str, *args: str) -> tuple[int, str]:
    proc = relay_process(database_url, "--broker", "kafka", *args)
    try:
        out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    return proc.returncode, (out + err).decode()


def error_lines(output: str) -> list[str]:
    return [line for line in output.splitlines() if line.startswith("outbox-relay: error:")]


@pytest.mark.postgres
@pytest.mark.kafka
@pytest.mark.parametrize("mechanism", ["PLAIN", "SCRAM-SHA-256"])
async def test_a_wrong_password_exits_2_with_one_line(
    database_url: str, secure_broker: SecureBroker, mechanism: str
) -> None:
    code, output = await run_until_exit(
        database_url,
        "--kafka-bootstrap",
        secure_broker.address("SASL_PLAINTEXT"),
        "--kafka-security-protocol",
        "SASL_PLAINTEXT",
        "--kafka-sasl-mechanism",
        mechanism,
        "--kafka-sasl-username",
        USER,
        "--kafka-sasl-password",
        WRONG,
    )
    assert code == 2, output[-2000:]
    assert error_lines(output) == [output.strip().splitlines()[-1]], output[-2000:]
    line = error_lines(output)[0]
    print(f"\n{line}")
    assert "SASL authentication failed" in line
    assert "kafka_sasl_password" in line
    assert WRONG not in output
    assert "Traceback" not in output


@pytest.mark.postgres
@pytest.mark.kafka
async def test_a_ca_that_does_not_verify_the_broker_exits_2_with_one_line(
    database_url: str, secure_broker: SecureBroker
) -> None:
    tls = secure_broker.tls
    code, output = await run_until_exit(
        database_url,
        "--kafka-bootstrap",
        secure_broker.address("SSL"),
        "--kafka-security-protocol",
        "SSL",
        "--kafka-ssl-ca-file",
        str(tls.other_ca),
        "--kafka-ssl-cert-file",
        str(tls.client_cert),
        "--kafka-ssl-key-file",
        str(tls.client_key),
        "--kafka-ssl-key-password",
        KEY_PASSWORD,
    )
    assert code == 2, output[-2000:]
    assert error_lines(output) == [output.strip().splitlines()[-1]], output[-2000:]
    line = error_lines(output)[0]
    print(f"\n{line}")
    assert "TLS certificate verification failed" in line
    assert "kafka_ssl_ca_file" in line
    assert KEY_PASSWORD not in output
    assert "Traceback" not in output


@pytest.mark.kafka
async def test_an_unreachable_broker_is_an_outage_not_a_configuration_error() -> None:
    """The diagnosis at start does not turn a broker that is down into exit 2."""
    port = free_port_run(1, 19480)
    options = KafkaSecurity("SASL_PLAINTEXT", "SCRAM-SHA-256", USER, PASSWORD).producer_options()
    publisher = KafkaPublisher(f"127.0.0.1:{port}", request_timeout_ms=2000, **options)
    with pytest.raises(BrokerUnavailableError):
        await publisher.start()
    await publisher.stop()


# -- the settings, without a broker ----------------------------------------------------------


def refused(**kafka: Any) -> str:
    with pytest.raises(ValidationError) as info:
        settings_for("sqlite:///x.db", "127.0.0.1:9092", **kafka)
    return str(info.value.errors()[0]["msg"]).removeprefix("Value error, ")


@pytest.mark.unit
def test_combinations_are_checked_by_name(tls: Tls) -> None:
    sasl = {"sasl_mechanism": "PLAIN", "sasl_username": USER, "sasl_password": PASSWORD}
    assert refused(security_protocol="SASL_SSL").startswith("kafka_sasl_mechanism: required")
    assert refused(security_protocol="SASL_SSL", sasl_mechanism="PLAIN").startswith(
        "kafka_sasl_username: required"
    )
    assert refused(
        security_protocol="SASL_PLAINTEXT", sasl_mechanism="PLAIN", sasl_username=USER
    ).startswith("kafka_sasl_password: required")
    assert refused(**sasl) == (
        "kafka_sasl_mechanism: needs kafka_security_protocol SASL_SSL or SASL_PLAINTEXT "
        "(it is PLAINTEXT)"
    )
    assert refused(security_protocol="SASL_PLAINTEXT", ssl_ca_file=str(tls.ca), **sasl) == (
        "kafka_ssl_ca_file: needs kafka_security_protocol SSL or SASL_SSL (it is SASL_PLAINTEXT)"
    )
    assert refused(security_protocol="SSL", ssl_key_file=str(tls.client_key)).startswith(
        "kafka_ssl_key_file: needs kafka_ssl_cert_file"
    )
    assert refused(security_protocol="SSL", ssl_ca_file="/nowhere/ca.pem") == (
        "/nowhere/ca.pem: no such file"
    )
    lower = settings_for(
        "sqlite:///x.db", "h:1", security_protocol="sasl_ssl", **sasl | {"sasl_mechanism": "plain"}
    )
    assert (lower.kafka_security_protocol, lower.kafka_sasl_mechanism) == ("SASL_SSL", "PLAIN")
    assert PASSWORD not in repr(lower)


@pytest.mark.unit
@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (
            ["--kafka-security-protocol", "SASL_SSL", "--kafka-sasl-mechanism", "SCRAM-SHA-512"],
            "outbox-relay: error: kafka_sasl_username: required with kafka_security_protocol "
            "SASL_SSL\n",
        ),
        (
            ["--kafka-security-protocol", "SSL", "--kafka-ssl-cert-file", "/nowhere/c.pem"],
            "outbox-relay: error: kafka_ssl_cert_file: /nowhere/c.pem: no such file\n",
        ),
    ],
)
def test_the_cli_refuses_bad_combinations_in_one_line(args: list[str], expected: str) -> None:
    done = outbox_cli("run", "--database-url", "sqlite:///x.db", *args, env=clean_env())
    assert done.returncode == 2
    assert done.stderr == expected


def clean_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}


@pytest.mark.unit
def test_the_sasl_password_is_masked_once_given() -> None:
    secret = f"masked-{uuid.uuid4().hex[:8]}"
    settings_for(
        "sqlite:///x.db",
        "h:1",
        security_protocol="SASL_SSL",
        sasl_mechanism="PLAIN",
        sasl_username=USER,
        sasl_password=secret,
    )
    assert redact_text(f"auth with {secret} failed") == "auth with *** failed"


@pytest.mark.unit
def test_a_wrong_key_password_is_a_configuration_error(tls: Tls) -> None:
    security = KafkaSecurity(
        "SSL",
        ssl_ca_file=str(tls.ca),
        ssl_cert_file=str(tls.client_cert),
        ssl_key_file=str(tls.client_key),
        ssl_key_password="not-the-key-password",
    )
    with pytest.raises(ConfigurationError, match=r"^kafka_ssl_cert_file: cannot load"):
        security.producer_options()
    # No password for an encrypted key: the same error, not OpenSSL prompting on the terminal.
    with pytest.raises(ConfigurationError, match="kafka_ssl_key_password"):
        KafkaSecurity(
            "SSL", ssl_cert_file=str(tls.client_cert), ssl_key_file=str(tls.client_key)
        ).producer_options()
    ok = kafka_security(
        settings_for(
            "sqlite:///x.db",
            "h:1",
            security_protocol="SSL",
            ssl_cert_file=str(tls.client_cert),
            ssl_key_file=str(tls.client_key),
            ssl_key_password=KEY_PASSWORD,
        )
    )
    assert ok.producer_options()["ssl_context"] is not None


@pytest.mark.unit
def test_tls_errors_of_a_peer_that_went_away_are_an_outage() -> None:
    assert configuration_problem(ssl.SSLEOFError(8, "EOF occurred")) is None
    assert configuration_problem(ConnectionResetError()) is None
    assert configuration_problem(ssl.SSLError(1, "[SSL] wrong version number")) is not None
