"""Kafka security: the producer's TLS and SASL options, and which connection errors at start
say that the relay's settings are wrong (exit 2) rather than that the brokers are down.

aiokafka hides the cause when no bootstrap server lets the producer in: `start()` raises
`KafkaConnectionError("Unable to bootstrap ...")` for a wrong password, an unknown CA and a
broker that is down alike, and the cause only goes to its log. So when the first start fails,
the publisher opens one plain connection per bootstrap server with the same options
(`aiokafka.conn.create_conn`), which raises the cause itself, and `configuration_problem()`
reads it. Measured against Kafka 4.3 (tests/test_kafka_security.py): a wrong SASL password
gives `SaslAuthenticationFailed`, an unknown CA `ssl.SSLCertVerificationError`, a SASL client
on a PLAINTEXT listener `IllegalSaslStateError`. Some mistakes look like an outage and stay
one: a missing client certificate (the broker just closes the connection), TLS to a
PLAINTEXT listener (connection reset), PLAINTEXT to a SASL listener (closed after ApiVersions).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass, field
from typing import Any, Literal

from aiokafka import errors as ke

from outbox.relay.seams import ConfigurationError

SecurityProtocol = Literal["PLAINTEXT", "SSL", "SASL_PLAINTEXT", "SASL_SSL"]
SaslMechanism = Literal["PLAIN", "SCRAM-SHA-256", "SCRAM-SHA-512"]

#: The producer options that a single connection (the diagnosis at start) needs too.
CONNECTION_OPTIONS = (
    "client_id",
    "security_protocol",
    "ssl_context",
    "sasl_mechanism",
    "sasl_plain_username",
    "sasl_plain_password",
)

#: TLS errors that say nothing about the settings: the peer went away mid-handshake.
_TLS_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


@dataclass(frozen=True, slots=True)
class KafkaSecurity:
    """The relay's Kafka security settings (validated by `RelaySettings`)."""

    protocol: SecurityProtocol = "PLAINTEXT"
    sasl_mechanism: SaslMechanism | None = None
    sasl_username: str | None = None
    sasl_password: str | None = field(default=None, repr=False)
    ssl_ca_file: str | None = None
    ssl_cert_file: str | None = None
    ssl_key_file: str | None = None
    ssl_key_password: str | None = field(default=None, repr=False)

    def producer_options(self) -> dict[str, Any]:
        """AIOKafkaProducer keyword arguments. Builds the TLS context (reads the files):
        ConfigurationError, naming the setting, if a file cannot be used."""
        options: dict[str, Any] = {"security_protocol": self.protocol}
        if self.protocol in ("SSL", "SASL_SSL"):
            options["ssl_context"] = self.ssl_context()
        if self.protocol in ("SASL_PLAINTEXT", "SASL_SSL"):
            options["sasl_mechanism"] = self.sasl_mechanism
            options["sasl_plain_username"] = self.sasl_username
            options["sasl_plain_password"] = self.sasl_password
        return options

    def ssl_context(self) -> ssl.SSLContext:
        """A client TLS context: the CA file (else the system's CAs), host names checked, and
        the client certificate for mutual TLS."""
        from aiokafka.helpers import create_ssl_context

        try:
            context: ssl.SSLContext = create_ssl_context(cafile=self.ssl_ca_file)
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"kafka_ssl_ca_file: cannot load {self.ssl_ca_file} as PEM certificates ({exc})"
            ) from exc
        if self.ssl_cert_file is not None:
            try:
                # A callable, never None: OpenSSL would prompt on the terminal for the
                # password of an encrypted key.
                context.load_cert_chain(
                    self.ssl_cert_file, self.ssl_key_file, lambda: self.ssl_key_password or ""
                )
            except (ssl.SSLError, OSError) as exc:
                raise ConfigurationError(
                    f"kafka_ssl_cert_file: cannot load {self.ssl_cert_file} with key "
                    f"{self.ssl_key_file or '(in the same file)'} ({exc}): a key that does "
                    "not match the certificate, or a wrong or missing kafka_ssl_key_password?"
                ) from exc
        return context


def configuration_problem(exc: BaseException) -> str | None:
    """What a failed connection says about the relay's settings; None when it may just be an
    outage (refused, reset, closed, timed out)."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        why = getattr(exc, "verify_message", None) or exc
        return (
            f"TLS certificate verification failed ({why}): check kafka_ssl_ca_file (the CA "
            "that signed the brokers' certificates) and that the host names in kafka_bootstrap "
            "are in their certificates"
        )
    if isinstance(exc, ssl.SSLError) and not isinstance(exc, _TLS_TRANSIENT):
        why = getattr(exc, "reason", None) or exc
        return (
            f"TLS handshake failed ({why}): check kafka_security_protocol (is the listener "
            "TLS?) and the kafka_ssl_* files"
        )
    if isinstance(exc, ke.SaslAuthenticationFailed | ke.AuthenticationFailedError):
        return (
            f"SASL authentication failed ({_reason(exc)}): check kafka_sasl_username, "
            "kafka_sasl_password and kafka_sasl_mechanism"
        )
    if isinstance(
        exc,
        ke.UnsupportedSaslMechanismError
        | ke.IllegalSaslStateError
        | ke.AuthenticationMethodNotSupported,
    ):
        return (
            f"SASL handshake refused ({_reason(exc)}): check kafka_sasl_mechanism, and "
            "kafka_security_protocol against the listener's protocol"
        )
    return None


def _reason(exc: BaseException) -> str:
    """`ErrorClass: what the broker said` (aiokafka gives some errors only the connection)."""
    said = exc.args[0] if exc.args and isinstance(exc.args[0], str) else None
    said = said or getattr(exc, "description", None)
    return f"{type(exc).__name__}: {said}" if said else type(exc).__name__
