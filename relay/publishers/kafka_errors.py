"""Kafka errors: what each aiokafka error says about an event, its topic or the broker (the
verdict table of docs/errors.md, "Kafka"), and a rate limit for aiokafka's own loggers."""

from __future__ import annotations

import enum
import logging
import time

from aiokafka import errors as ke

from outbox.relay.seams import BrokerUnavailableError, Failure, Verdict

# -- classification --------------------------------------------------------------------------


class Kind(enum.Enum):
    """What a Kafka error says, before it becomes a verdict."""

    #: The broker (or the path to it) is down, overloaded or misconfigured: BROKER.
    BROKER = "broker"
    #: The producer's idempotence state is broken (sequence gap, unknown or fenced producer
    #: id): not the event's fault; the producer is replaced and the event resent: HELD.
    SEQUENCE = "sequence"
    #: The partition had no leader, or the topic went away, for longer than the producer
    #: waits: HELD (resent later; the producer is replaced, since the batch used a sequence).
    PARTITION = "partition"
    #: The record (or its batch) was refused as it is: POISON when the record was alone in
    #: its batch, otherwise it is sent again alone.
    RECORD = "record"
    #: The topic cannot take any event (invalid name, not authorized, refused by a policy):
    #: POISON for the events of that topic only.
    TOPIC = "topic"
    #: Anything else, perhaps transient: RETRY (attempt counted, backoff).
    RETRY = "retry"


#: Error classes by what they say. Checked in this order; anything not listed is RETRY.
KINDS: tuple[tuple[Kind, tuple[type[BaseException], ...]], ...] = (
    (
        Kind.SEQUENCE,
        (
            ke.OutOfOrderSequenceNumber,
            ke.UnknownProducerId,
            ke.InvalidProducerEpoch,
            ke.InvalidProducerIdMapping,
            ke.ProducerFenced,
            ke.DuplicateSequenceNumber,
            ke.InvalidTxnState,
            ke.TransactionCoordinatorFenced,
            ke.ProducerClosed,
        ),
    ),
    (
        Kind.PARTITION,
        (
            ke.NotLeaderForPartitionError,
            ke.LeaderNotAvailableError,
            ke.UnknownTopicOrPartitionError,
            ke.StaleLeaderEpochCodeError,
        ),
    ),
    (
        Kind.RECORD,
        (
            ke.MessageSizeTooLargeError,
            ke.RecordListTooLargeError,
            ke.RecordTooLargeError,
            ke.CorruptRecordException,  # also known as InvalidMessageError
            ke.UnsupportedForMessageFormatError,
            ke.InvalidRequestError,
        ),
    ),
    (
        Kind.TOPIC,
        (ke.InvalidTopicError, ke.TopicAuthorizationFailedError, ke.PolicyViolationError),
    ),
    (
        Kind.BROKER,
        (
            ke.KafkaConnectionError,
            ke.NodeNotReadyError,
            ke.RequestTimedOutError,
            ke.KafkaTimeoutError,
            ke.NotEnoughReplicasError,
            ke.NotEnoughReplicasAfterAppendError,
            ke.KafkaStorageError,
            ke.BrokerNotAvailableError,
            ke.ReplicaNotAvailableError,
            ke.NotControllerError,
            ke.CoordinatorNotAvailableError,
            ke.CoordinatorLoadInProgressError,
            ke.NotCoordinatorError,
            ke.ClusterAuthorizationFailedError,
            ke.TransactionalIdAuthorizationFailed,
            ke.UnsupportedVersionError,
            ke.IncompatibleBrokerVersion,
            ke.UnrecognizedBrokerVersion,
            ke.InvalidRequiredAcksError,
            ke.KafkaUnavailableError,
            ke.NoBrokersAvailable,
            ke.MetadataEmptyBrokerList,
            ke.StaleMetadata,
            ke.TooManyInFlightRequests,
            ke.KafkaProtocolError,
            ke.AuthenticationFailedError,
            ke.AuthenticationMethodNotSupported,
            ke.SaslAuthenticationFailed,
            ke.IllegalSaslStateError,
            ke.UnsupportedSaslMechanismError,
            ke.SecurityDisabled,
            ke.UnsupportedCodecError,
            ke.KafkaConfigurationError,
            BrokerUnavailableError,
            ConnectionError,
            TimeoutError,
            OSError,
        ),
    ),
)


_VERDICTS = {
    Kind.BROKER: Verdict.BROKER,
    Kind.SEQUENCE: Verdict.HELD,
    Kind.PARTITION: Verdict.HELD,
    Kind.RECORD: Verdict.POISON,
    Kind.TOPIC: Verdict.POISON,
    Kind.RETRY: Verdict.RETRY,
}


class ProducerAborted(ke.KafkaError):  # type: ignore[misc]
    """Set on every pending send when the publisher kills its producer (broker unreachable,
    no ack in time); the events are answered BROKER."""


def kind_of(exc: BaseException) -> Kind:
    if isinstance(exc, ProducerAborted):
        return Kind.BROKER
    for kind, classes in KINDS:
        if isinstance(exc, classes):
            return kind
    return Kind.RETRY


#: What the common errors mean, for the dead letter's message.
EXPLAIN: dict[type[BaseException], str] = {
    ke.MessageSizeTooLargeError: "larger than the broker's message.max.bytes "
    "(or the topic's max.message.bytes)",
    ke.RecordListTooLargeError: "larger than the broker accepts in one request",
    ke.OutOfOrderSequenceNumber: "a gap in the producer's sequence after an earlier failed batch",
    ke.UnknownProducerId: "the broker no longer knows the producer id",
    ke.InvalidProducerEpoch: "the producer was fenced",
    ke.NotLeaderForPartitionError: "the partition had no leader for the whole request timeout",
    ke.InvalidTopicError: "not a valid topic name",
    ke.TopicAuthorizationFailedError: "not authorized to write to the topic",
}


def describe(exc: BaseException) -> str:
    text = str(exc)
    if not text or text == type(exc).__name__:
        text = repr(exc)
    for cls, meaning in EXPLAIN.items():
        if isinstance(exc, cls):
            return f"{text}: {meaning}"
    return text


def classify(exc: BaseException, context: str = "") -> Failure:
    """The verdict for an event whose send failed with `exc`, the record alone in its batch.
    `context` (topic, size) is added to the message."""
    message = describe(exc) + (f" ({context})" if context else "")
    return Failure(type(exc).__name__, message, _VERDICTS[kind_of(exc)])


# -- aiokafka's loggers ------------------------------------------------------------------------


class RateLimitFilter(logging.Filter):
    """Lets one record per (logger, message template) through every `interval` seconds; the
    next one that passes says how many were dropped. DEBUG records are not limited."""

    def __init__(self, interval: float = 30.0) -> None:
        super().__init__()
        self.interval = interval
        self._last: dict[tuple[str, str], float] = {}
        self._dropped: dict[tuple[str, str], int] = {}

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno < logging.INFO:
            return True
        key = (record.name, str(record.msg))
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.interval:
            self._dropped[key] = self._dropped.get(key, 0) + 1
            return False
        self._last[key] = now
        dropped = self._dropped.pop(key, 0)
        if dropped and last is not None and isinstance(record.msg, str):
            record.msg += f" [{dropped} more like this in the last {now - last:.0f}s]"
        return True


#: The loggers aiokafka's producer writes to.
AIOKAFKA_LOGGERS = (
    "aiokafka",
    "aiokafka.conn",
    "aiokafka.cluster",
    "aiokafka.producer.producer",
    "aiokafka.producer.sender",
    "aiokafka.producer.message_accumulator",
    "aiokafka.producer.transaction_manager",
    "aiokafka.util",
)
_log_filter = RateLimitFilter()


def quiet_aiokafka_logs() -> None:
    """Rate-limit aiokafka's loggers (idempotent). During an outage aiokafka logs every failed
    connection and metadata update; one line per kind every 30 s is enough."""
    for name in AIOKAFKA_LOGGERS:
        logger = logging.getLogger(name)
        if _log_filter not in logger.filters:
            logger.addFilter(_log_filter)
