"""Redis publisher: XADD to one stream per topic (default), or PUBLISH (opt-in, at-most-once).

The hot path. A batch goes out as one write of RESP-encoded commands on a pooled redis-py
connection, and the replies are read back in order. redis-py's own Pipeline builds a Python
object per command and was the relay's top hot spot in profiles (about 90 % of a Redis drain);
encoding the commands here is a dozen lines and roughly 1.5x faster. redis-py still owns
connecting, AUTH, TLS and health checks; hiredis (a dependency) parses the replies.

Per-key order (the publisher contract: once an event is not delivered, no later event of its
key in the batch may be delivered). All commands are written before any reply is read, so the
reply to an event comes too late to stop the later events of its key: they are already on the
wire. The order must follow from what the server does with the write, and two things could
break it:

1. A key on two streams. K1 goes to stream A and fails (A holds a string: WRONGTYPE), K2 goes
   to stream B and is appended. So the batch is cut, in order, into *segments* in which no key
   appears on two different streams (`segments`); the usual batch, where a key keeps to one
   topic, is one segment. Segments go out one after the other, each as one write followed by
   the read of its replies, and a key whose event failed is left out of the later segments
   (HELD_BACK, not sent).
2. A server state that changes in the middle of the write. Redis reads a long pipeline 16 KB
   at a time and serves other clients in between, so OOM (memory freed by a DEL, an expiry, a
   client buffer), LOADING, BUSY (a script ends), NOREPLICAS or MASTERDOWN can refuse K1 and
   accept K2 a moment later, on the same stream. So each segment is one transaction,
   MULTI ... EXEC, in the same single write. Redis checks each command as it is queued (ACL,
   memory, read-only replica, disk errors, min-replicas, loading, busy script) and the
   transaction as a whole again at EXEC; it either refuses the transaction whole (EXECABORT,
   or EXEC itself answers OOM, READONLY...) or runs it whole, serving no one else meanwhile.
   A refused segment appended nothing. (Cost, measured on 500-event batches: +0.25 us of relay
   CPU and +0.1 us of server CPU per event, about 2 %; a full drain showed no difference.)

What can still fail inside a running EXEC concerns one stream and hits every command on it
alike: WRONGTYPE (the key holds another type; XADD only creates streams, and nothing else runs
during the EXEC) and a stream whose last possible ID is used up. A segment holds a key on one
stream only, so the later events of a failed event's key in the segment fail with it: they are
answered HELD_BACK, and only the first carries the error. (XADD's one per-entry error, an
entry above the 1 GB listpack limit, cannot be reached under the default limits: the server
drops the connection at proto-max-bulk-len, 512 MB a field, or client-query-buffer-limit,
1 GB, first.) Were a later event of a failed key appended anyway, it is reported delivered,
the truth, and logged (`redis_order_violated`, and the loop's `order_violated`).

Verdicts (docs/errors.md, "Redis", has the table): replies about the server or the deployment
(OOM, READONLY, LOADING, BUSY, MISCONF, NOREPLICAS, MASTERDOWN, NOAUTH, NOPERM, the cluster
replies, an unknown command) are BROKER: no attempt counted, nothing dead-lettered, the loop
opens its circuit breaker, and the segments after a refused one are not sent. WRONGTYPE and a
used-up stream are POISON for the event (the stream is named in the message); any other error
reply is RETRY. A transaction aborted by one command's own error gives that command its
verdict and holds the others (HELD); one refused at EXEC with no culprit is BROKER. A
connection that breaks or times out makes the rest of the batch BROKER: the segment in flight
may have been appended (at-least-once: it is sent again), the segments before it were
acknowledged and stay delivered. When nothing was delivered and every event was refused or
held, publish() raises BrokerUnavailableError.

A server or user that refuses MULTI (an ACL without +multi, a proxy) makes the publisher fall
back to plain pipelining: the commands then ran outside a transaction, their replies are read
as such, and a warning is logged once. Point 2 is then not covered.

Setup mistakes raise ConfigurationError (`run` exits 2): a URL redis-py cannot use, when the
publisher is built; and in `start()`, a certificate that does not verify, wrong credentials,
and an ACL that forbids XADD (XADD_PROBE). Once running, the same errors are BROKER.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Iterator, Sequence
from dataclasses import replace
from typing import Any, Literal

import redis.asyncio as aioredis
from redis._parsers.hiredis import NOT_ENOUGH_DATA as _NOT_ENOUGH_DATA
from redis.asyncio.connection import AbstractConnection
from redis.exceptions import (
    AuthenticationError,
    InvalidResponse,
    NoPermissionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

from outbox.envelope import Encoder, Envelope, resp_bulk
from outbox.relay.logs import relay_logger
from outbox.relay.ordering import KeyGate
from outbox.relay.seams import (
    HELD_BACK,
    BrokerUnavailableError,
    ConfigurationError,
    Failure,
    Position,
    PublishResult,
    Verdict,
)
from outbox.urls import redact

log = relay_logger("relay.redis")

#: The connection is gone or timed out. redis-py also raises ConnectionError subclasses for
#: some replies, after dropping the connection: LOADING (BusyLoadingError), NOAUTH / WRONGPASS
#: (AuthenticationError), "max number of clients reached". InvalidResponse: the connection
#: lost track of the protocol.
BROKER_DOWN = (
    RedisConnectionError,
    RedisTimeoutError,
    InvalidResponse,
    ConnectionError,
    TimeoutError,
    OSError,
)

#: Error codes (the reply's first word) that describe the server or the deployment, not the
#: event: the server refuses any write now, or this client may not write here.
SERVER_STATE = frozenset(
    {
        "OOM",  # maxmemory reached with noeviction (or no volatile key left to evict)
        "READONLY",  # a replica, e.g. the old primary after a failover
        "LOADING",  # loading its dataset after a restart
        "BUSY",  # running a slow script or function
        "MISCONF",  # stop-writes-on-bgsave-error: it cannot persist to disk
        "NOREPLICAS",  # min-replicas-to-write not met
        "MASTERDOWN",  # replica-serve-stale-data no, link to the primary down
        "NOAUTH",  # authentication required
        "WRONGPASS",  # wrong credentials
        "NOPERM",  # the ACL denies the command or the key
        "EXECABORT",  # a transaction refused as a whole (its cause is classified if known)
        "CLUSTERDOWN",  # Redis Cluster: a slot is not served
        "TRYAGAIN",  # Redis Cluster: resharding
        "MOVED",  # Redis Cluster: the key lives on another node (not supported: config)
        "ASK",
        "CROSSSLOT",
        "DENIED",  # protected mode
    }
)
#: Error codes that say this event's stream cannot take entries.
STREAM_FAULTS = frozenset({"WRONGTYPE"})
#: "ERR ..." replies about the server or the deployment.
SERVER_STATE_ERR = ("unknown command", "max number of clients")
#: "ERR ..." replies of XADD about this event's stream or entry.
STREAM_FAULTS_ERR = ("The stream has exhausted the last possible ID", "Elements are too large")
#: Codes of a refused MULTI after which the publisher stops sending MULTI.
NO_MULTI = frozenset({"NOPERM", "ERR"})

#: Verdicts that leave an event pending at no cost.
HOLDS = (Verdict.BROKER, Verdict.HELD)

MULTI = b"*1\r\n$5\r\nMULTI\r\n"
EXEC = b"*1\r\n$4\r\nEXEC\r\n"

#: May this user run XADD? Redis checks the ACL before the arguments, so this XADD, whose
#: MAXLEN is invalid, is refused either by the ACL (NOPERM) or for its MAXLEN, and writes
#: nothing (NOMKSTREAM too, for a server that would take it).
XADD_PROBE = ("XADD", "outbox-relay:acl-probe", "NOMKSTREAM", "MAXLEN", "-1", "*", "f", "v")
#: The TLS files redis-py takes from a rediss:// URL's query.
TLS_FILES = ("ssl_ca_certs", "ssl_certfile", "ssl_keyfile")
#: TLS errors that say nothing about the settings: the peer went away mid-handshake.
TLS_TRANSIENT = (ssl.SSLEOFError, ssl.SSLZeroReturnError, ssl.SSLSyscallError)


def reply_code(exc: BaseException) -> tuple[str, str]:
    """An error reply's code and text. redis-py strips the code of the replies it maps
    (OutOfMemoryError, and every "ERR ...") and keeps it in `status_code`; others keep it."""
    text = str(exc)
    code = getattr(exc, "status_code", None)
    if code:
        return str(code), text
    if not isinstance(exc, ResponseError):
        return "", text
    first, _, rest = text.partition(" ")
    if first.isupper() and first.isalpha():
        return first, rest
    return "", text


def classify(exc: BaseException, stream: str | None = None) -> Failure:
    """What a Redis error says: about the server (BROKER), this event's stream (POISON), or
    this event, perhaps transiently (RETRY). `stream`: the stream (or channel) the command
    wrote to, named in the message. See docs/errors.md, "Redis"."""
    code, text = reply_code(exc)
    message = f"{code} {text}" if code else text or repr(exc)
    if not isinstance(exc, ResponseError):
        verdict = Verdict.BROKER if isinstance(exc, BROKER_DOWN) else Verdict.RETRY
    elif code in SERVER_STATE or (code == "ERR" and text.startswith(SERVER_STATE_ERR)):
        verdict = Verdict.BROKER
    elif code in STREAM_FAULTS or (code == "ERR" and text.startswith(STREAM_FAULTS_ERR)):
        verdict = Verdict.POISON
        if stream is not None:
            message = f"{message} (stream {stream!r})"
    else:
        verdict = Verdict.RETRY
    return Failure(type(exc).__name__, message, verdict)


def causes(exc: BaseException) -> Iterator[BaseException]:
    """The exception and what caused it, outermost first (redis-py wraps ssl's errors)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def tls_problem(exc: BaseException) -> str | None:
    """What a failed connection says about the relay's TLS settings; None when it may just
    be an outage (refused, reset, closed, timed out)."""
    for cause in causes(exc):
        if isinstance(cause, ssl.SSLCertVerificationError):
            return (
                f"TLS certificate verification failed ({cause.verify_message or cause.reason}): "
                "check ssl_ca_certs in redis_url (the CA that signed the server's certificate) "
                "and that the host name is in the certificate"
            )
        if isinstance(cause, ssl.SSLError) and not isinstance(cause, TLS_TRANSIENT):
            return (
                f"TLS handshake failed ({cause.reason or cause}): is the port a TLS port? "
                "(rediss:// needs one), and the ssl_* parameters of redis_url"
            )
    return None


def check_options(client: aioredis.Redis, url: str) -> None:
    """Build one connection, without connecting, from the URL's options: ConfigurationError
    for a parameter redis-py does not take, a bad value, or a TLS file that cannot be used."""
    pool = client.connection_pool
    options = pool.connection_kwargs
    try:
        conn = pool.connection_class(**options)
    except (TypeError, RedisError) as exc:  # an unknown parameter, a bad ssl_cert_reqs
        plain = "'ssl_" in str(exc) and not url.startswith("rediss://")
        hint = " (ssl_* parameters need a rediss:// URL)" if plain else ""
        raise ConfigurationError(f"redis_url: {redact(url)}: {exc}{hint}") from exc
    for name in TLS_FILES:
        path = options.get(name)
        if path is not None and not os.path.isfile(path):
            raise ConfigurationError(f"redis_url: {name}={path}: no such file")
    context = getattr(conn, "ssl_context", None)
    if context is not None:
        try:
            context.get()  # loads the CA, the client certificate and its key
        except (ssl.SSLError, OSError) as exc:
            raise ConfigurationError(
                f"redis_url: {redact(url)}: cannot load its TLS files ({exc})"
            ) from exc


def segments(keys: Sequence[str | None], streams: Sequence[bytes]) -> list[range]:
    """Cut a batch, in order, into the fewest runs in which no key appears on two different
    streams (see the module doc). Events without a key are not ordered."""
    out: list[range] = []
    start = 0
    seen: dict[str, bytes] = {}
    for i, (key, stream) in enumerate(zip(keys, streams, strict=True)):
        if key is None:
            continue
        known = seen.setdefault(key, stream)
        if known != stream:
            out.append(range(start, i))
            start = i
            seen = {key: stream}
    out.append(range(start, len(keys)))
    return out if len(keys) else []


def resp_command(args: Sequence[bytes]) -> bytes:
    """One command in the Redis protocol: an array of bulk strings."""
    out = [b"*%d\r\n" % len(args)]
    out.extend(b"$%d\r\n%b\r\n" % (len(arg), arg) for arg in args)
    return b"".join(out)


async def _replies(conn: AbstractConnection, count: int) -> list[Any]:
    """The next `count` replies; an error reply comes as its exception, not raised.

    Each `read_response` opens a timeout scope (a third of the publisher's time when it read
    every reply): it reads from the socket only when no whole reply is buffered, and the
    replies that one socket read brought (thousands) are taken from hiredis' reader as is."""
    read = conn.read_response
    buffered = _buffered_replies(conn)
    out: list[Any] = []
    while len(out) < count:
        try:
            out.append(await read(disable_decoding=True))
        except ResponseError as exc:  # this command failed, the connection is fine
            out.append(exc)
        if buffered is not None:
            buffered(out, count)
    return out


def _buffered_replies(conn: AbstractConnection) -> Any:
    """A function that moves the whole replies hiredis holds already into `out` (up to
    `count`); None when the connection does not parse with hiredis."""
    reader = getattr(getattr(conn, "_parser", None), "_reader", None)
    if reader is None or not hasattr(reader, "gets"):
        return None
    gets = reader.gets

    def take(out: list[Any], count: int) -> None:
        while len(out) < count:
            reply = gets(False)
            if reply is _NOT_ENOUGH_DATA or reply is False:
                return
            if isinstance(reply, RedisConnectionError) or not isinstance(
                reply, bytes | int | list | ResponseError | None
            ):  # a broken connection, or a push message: redis-py's own path raises it
                raise RedisConnectionError(f"unexpected reply from redis: {reply!r}")
            out.append(reply)

    return take


class RedisPublisher:
    name = "redis"

    def __init__(
        self,
        url: str,
        *,
        mode: Literal["streams", "pubsub"] = "streams",
        maxlen: int | None = None,
        topic_prefix: str = "",
        encoder: Encoder | None = None,
    ) -> None:
        self.url = url
        self.mode = mode
        self.topic_prefix = topic_prefix
        #: Each entry's fields (each message), in its topic's envelope mode.
        self.encoder = encoder or Encoder()
        self._trim = [b"MAXLEN", b"~", str(maxlen).encode()] if maxlen else []
        #: XADD's arguments before the fields: the command, the stream, the trim, the id `*`.
        self._xadd_args = 3 + len(self._trim)
        self._xadd_heads: dict[bytes, bytes] = {}
        try:
            self._client = aioredis.Redis.from_url(
                url, socket_timeout=10, socket_connect_timeout=5, health_check_interval=30
            )
        except ValueError as exc:  # a scheme or a query value redis-py cannot parse
            raise ConfigurationError(f"redis_url: {redact(url)}: {exc}") from exc
        check_options(self._client, url)
        #: Each segment as one MULTI/EXEC transaction; off when the server refuses MULTI.
        self.atomic = True
        #: The stream entry id of each acked event (RecordsPositions); None: not recorded.
        self.positions: dict[int, Position] | None = None
        self._last_replies: list[Any] = []

    async def start(self) -> None:
        if self.mode == "pubsub":
            log.warning(
                "redis_pubsub_at_most_once",
                detail="PUBLISH reaches only subscribers connected right now; events "
                "published while nobody listens are lost. Use streams for at-least-once.",
            )
        try:
            await self._client.ping()
            if self.mode == "streams":
                await self._check_xadd()
        except (AuthenticationError, NoPermissionError) as exc:
            # A wrong or missing password, or an ACL that forbids the relay: an operator must
            # fix it, so it is not retried as an outage (later, while running, it would be).
            raise ConfigurationError(
                f"redis {redact(self.url)}: {classify(exc).message} "
                "(check the password in redis_url and the user's ACL)"
            ) from exc
        except BROKER_DOWN as exc:
            problem = tls_problem(exc)
            if problem is not None:  # as wrong as a password: exit 2, not an outage
                raise ConfigurationError(f"redis {redact(self.url)}: {problem}") from exc
            raise BrokerUnavailableError(self._down(exc)) from exc

    async def _check_xadd(self) -> None:
        """NoPermissionError if the ACL forbids this user XADD (see XADD_PROBE). A refusal of
        the probe's key says nothing: the streams' names may match the user's key patterns."""
        try:
            await self._client.execute_command(*XADD_PROBE)  # type: ignore[no-untyped-call]
        except NoPermissionError as exc:
            if "command" in str(exc):  # "... no permissions to run the 'xadd' command"
                raise
        except ResponseError:
            pass  # "The MAXLEN argument must be >= 0": XADD is allowed

    async def stop(self) -> None:
        await self._client.aclose()

    def _command(self, event: Envelope, name: bytes) -> bytes:
        if self.mode == "pubsub":
            return resp_command([b"PUBLISH", name, self.encoder.pubsub_message(event)])
        count, fields = self.encoder.stream_resp(event)
        head = self._xadd_head(name)
        return b"*%d\r\n%s%s" % (self._xadd_args + count, head, fields)

    def _xadd_head(self, name: bytes) -> bytes:
        """`XADD name [MAXLEN ~ n] *` in the Redis protocol, once per stream."""
        head = self._xadd_heads.get(name)
        if head is None:
            head = resp_bulk([b"XADD", name, *self._trim, b"*"])
            if len(self._xadd_heads) < 10_000:  # a bound on memory over very many streams
                self._xadd_heads[name] = head
        return head

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        prefix = self.topic_prefix
        names = [(prefix + event.topic).encode() for event in batch]
        keys = [event.key for event in batch]
        results: list[PublishResult] = [None] * len(batch)
        if self.positions is not None:
            self.positions.clear()
        pool = self._client.connection_pool
        try:
            conn = await pool.get_connection()  # type: ignore[no-untyped-call]
        except BROKER_DOWN as exc:
            raise BrokerUnavailableError(self._down(exc)) from exc
        failed = KeyGate()  # keys with an undelivered event
        refusal: Failure | None = None  # the server refused: the later segments are not sent
        done = 0  # the events before `done` have their final result
        try:
            for segment in segments(keys, names):
                if refusal is not None:
                    break
                send = list(segment)
                if failed:
                    send = []
                    for i in segment:
                        if failed.admits(batch[i]):
                            send.append(i)
                        else:
                            results[i] = HELD_BACK
                if send:
                    commands = [self._command(batch[i], names[i]) for i in send]
                    answers = await self._exchange(conn, commands, [names[i] for i in send])
                    if self.positions is not None:
                        self._note_positions(batch, send)
                    if not any(answers):  # all delivered: results[i] is None already
                        done = segment.stop
                        continue
                    for i, answer in zip(send, answers, strict=True):
                        event = batch[i]
                        if answer is None:
                            if not failed.admits(event):  # cannot happen (module doc)
                                log.error("redis_order_violated", key=event.key, stream=names[i])
                            continue
                        results[i] = answer if failed.admits(event) else HELD_BACK
                        if answer.verdict is Verdict.BROKER:
                            refusal = refusal or answer
                        failed.close(event)
                done = segment.stop
        except BROKER_DOWN as exc:
            await conn.disconnect()
            if all(result is not None for result in results[:done]):
                raise BrokerUnavailableError(self._down(exc)) from exc
            # What was acknowledged before stays delivered; the rest is sent again.
            refusal = Failure(type(exc).__name__, self._down(exc), Verdict.BROKER)
        except BaseException:
            await conn.disconnect()  # unread replies would answer the next batch's commands
            raise
        finally:
            await pool.release(conn)
        if refusal is not None:
            results[done:] = [refusal] * (len(batch) - done)
            if all(r is not None and r.verdict in HOLDS for r in results):  # nothing to settle
                raise BrokerUnavailableError(f"redis {redact(self.url)}: {refusal.message}")
        return results

    def _note_positions(self, batch: Sequence[Envelope], send: list[int]) -> None:
        """The entry ids XADD answered (the last `_exchange`) of the events sent."""
        positions = self.positions
        assert positions is not None
        for i, reply in zip(send, self._last_replies, strict=False):
            if type(reply) is bytes:  # an entry id (not a count of PUBLISH, nor an error)
                positions[batch[i].seq] = Position(None, None, reply.decode())

    async def _exchange(
        self, conn: AbstractConnection, commands: list[bytes], names: list[bytes]
    ) -> list[PublishResult]:
        """Send one segment in one write, as a transaction if `atomic`; one result per command."""
        self._last_replies = []
        if not self.atomic:
            await conn.send_packed_command(b"".join(commands))
            replies = await _replies(conn, len(commands))
            self._last_replies = replies
            return [self._result(reply, name) for reply, name in zip(replies, names, strict=True)]
        await conn.send_packed_command(b"".join([MULTI, *commands, EXEC]))
        opened, *queued, executed = await _replies(conn, len(commands) + 2)
        if isinstance(opened, ResponseError):
            # No transaction: the commands ran one by one and `queued` holds their replies.
            if reply_code(opened)[0] in NO_MULTI:
                self.atomic = False
                log.warning(
                    "redis_multi_refused", error=classify(opened).message, fallback="pipeline"
                )
            self._last_replies = queued
            return [self._result(reply, name) for reply, name in zip(queued, names, strict=True)]
        if isinstance(executed, list):
            self._last_replies = executed
            return [self._result(reply, name) for reply, name in zip(executed, names, strict=True)]
        # Refused as a whole: nothing ran. A command refused when it was queued is the cause.
        culprits = [
            classify(reply, name.decode()) if isinstance(reply, ResponseError) else None
            for reply, name in zip(queued, names, strict=True)
        ]
        cause = next((c for c in culprits if c is not None), None)
        if cause is None:  # EXEC itself was refused: the server's state as a whole
            if isinstance(executed, ResponseError):
                cause = replace(classify(executed), verdict=Verdict.BROKER)
            else:
                cause = Failure("ExecAbortError", f"EXEC answered {executed!r}", Verdict.BROKER)
            return [cause] * len(commands)
        if cause.verdict is not Verdict.BROKER:  # one command's fault: the others are resent
            cause = Failure(
                cause.error_class, f"transaction aborted: {cause.message}", Verdict.HELD
            )
        return [culprit or cause for culprit in culprits]

    def _down(self, exc: BaseException) -> str:
        # Not repr(): redis-py's errors repr as "network:ConnectionError", without the message.
        return f"redis {redact(self.url)}: {type(exc).__name__}: {classify(exc).message}"

    @staticmethod
    def _result(reply: Any, name: bytes) -> PublishResult:
        """None for a stream entry id (or a receiver count), else what the error says."""
        if isinstance(reply, ResponseError):
            return classify(reply, name.decode())
        return None
