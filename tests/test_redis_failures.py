"""How the Redis publisher answers Redis errors (relay/publishers/redis.py, docs/errors.md).

Unit tests (no server): `classify` on the replies as redis-py's parser turns them into
exceptions, `segments`, and `publish` against `FakeRedis`, a few lines of Redis protocol.
Real Redis: a stream key holding a string (WRONGTYPE) in the middle of a batch, on the shared
Redis; a full Redis (maxmemory, noeviction), a read-only replica and a busy script on a
throwaway redis-server of the test's own (CONFIG SET on the shared one would break the tests
that run beside these).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
import subprocess
import uuid
from collections import deque
from collections.abc import AsyncIterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import pytest
import redis.asyncio as aioredis
from redis._parsers import BaseParser
from redis.asyncio.connection import SSLConnection
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import OutOfMemoryError, ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from outbox import OutboxEvent
from outbox.envelope import Envelope
from outbox.relay.publishers.redis import RedisPublisher, classify, segments
from outbox.relay.retry import CircuitBreaker
from outbox.relay.seams import (
    HELD_BACK,
    BrokerUnavailableError,
    ConfigurationError,
    Failure,
    PublishResult,
    Verdict,
)
from tests.helpers import (
    ROOT,
    assert_per_key_order,
    commit_events,
    first_seen_order,
    keyed_events,
    pg_relay,
    read_stream,
    relay_process,
)
from tests.tcp_proxy import SilentProxy

OOM = "OOM command not allowed when used memory > 'maxmemory'."


def event(seq: int, topic: str, key: str | None) -> Envelope:
    return Envelope(seq, uuid.uuid4(), topic, key, b'{"n": %d}' % seq)


def reply_error(reply: str) -> Exception:
    """An error reply as redis-py's parser raises it (OutOfMemoryError for OOM...)."""
    error: Exception = BaseParser.parse_error(reply)  # type: ignore[no-untyped-call]
    return error


# -- classify ------------------------------------------------------------------------------------

BROKER_REPLIES = [
    OOM,
    "READONLY You can't write against a read only replica.",
    "LOADING Redis is loading the dataset in memory",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSAVE.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
    "NOREPLICAS Not enough good replicas to write.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "NOAUTH Authentication required.",
    "WRONGPASS invalid username-password pair or user is disabled.",
    "NOPERM User relay has no permissions to run the 'xadd' command",
    "NOPERM No permissions to access a key",
    "CLUSTERDOWN The cluster is down",
    "TRYAGAIN Multiple keys request during rehashing of slot",
    "MOVED 3999 127.0.0.1:6381",
    "ASK 3999 127.0.0.1:6381",
    "CROSSSLOT Keys in request don't hash to the same slot",
    "EXECABORT Transaction discarded because of previous errors.",
    "DENIED Redis is running in protected mode because protected mode is enabled",
    "ERR unknown command 'XADD', with args beginning with: ",
    "ERR max number of clients reached",
]
POISON_REPLIES = [
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR The stream has exhausted the last possible ID, unable to add more items",
    "ERR Elements are too large to be stored",
]
RETRY_REPLIES = ["ERR something this relay has never seen", "NEWCODE from a later server"]


@pytest.mark.unit
@pytest.mark.parametrize(
    ("reply", "verdict"),
    [(r, Verdict.BROKER) for r in BROKER_REPLIES]
    + [(r, Verdict.POISON) for r in POISON_REPLIES]
    + [(r, Verdict.RETRY) for r in RETRY_REPLIES],
)
def test_classify_error_replies(reply: str, verdict: Verdict) -> None:
    failure = classify(reply_error(reply), "orders")
    assert failure.verdict is verdict
    assert failure.message.startswith(reply.split()[0])  # the code survives redis-py's mapping
    assert ("'orders'" in failure.message) is (verdict is Verdict.POISON)


@pytest.mark.unit
def test_classify_keeps_redis_py_exception_names() -> None:
    assert classify(reply_error(OOM)).error_class == "OutOfMemoryError"
    readonly = classify(reply_error("READONLY You can't write against a read only replica."))
    assert readonly.error_class == "ReadOnlyError"
    loading = classify(reply_error("LOADING Redis is loading the dataset in memory"))
    assert loading.error_class == "BusyLoadingError"  # a ConnectionError in redis-py
    wrongtype = classify(reply_error(POISON_REPLIES[0]), "t-orders")
    assert wrongtype.error_class == "ResponseError"
    assert wrongtype.message == f"{POISON_REPLIES[0]} (stream 't-orders')"


@pytest.mark.unit
@pytest.mark.parametrize(
    ("exc", "verdict"),
    [
        (RedisConnectionError("Connection closed by server."), Verdict.BROKER),
        (RedisTimeoutError("Timeout reading from socket"), Verdict.BROKER),
        (ConnectionResetError(104, "Connection reset by peer"), Verdict.BROKER),
        (TimeoutError(), Verdict.BROKER),
        (ValueError("not a Redis error"), Verdict.RETRY),
    ],
)
def test_classify_connection_errors(exc: Exception, verdict: Verdict) -> None:
    assert classify(exc).verdict is verdict


# -- segments ------------------------------------------------------------------------------------


@pytest.mark.unit
def test_one_segment_when_every_key_keeps_to_one_stream() -> None:
    keys = ["a", "b", "a", None, "c", None, "b"]
    streams = [b"s1", b"s1", b"s1", b"s2", b"s2", b"s3", b"s1"]
    assert segments(keys, streams) == [range(7)]
    assert segments([None, None], [b"s1", b"s2"]) == [range(2)]  # unkeyed: no order
    assert segments([], []) == []


@pytest.mark.unit
def test_a_key_on_a_second_stream_starts_a_segment() -> None:
    keys = ["k", "j", "k", "j", "k"]
    streams = [b"A", b"A", b"B", b"A", b"A"]
    assert segments(keys, streams) == [range(2), range(2, 4), range(4, 5)]


# -- publish, against a fake server --------------------------------------------------------------


def parse_commands(payload: bytes) -> list[list[bytes]]:
    """RESP arrays of bulk strings, as the publisher writes them."""
    commands, pos = [], 0
    while pos < len(payload):
        end = payload.index(b"\r\n", pos)
        count, pos = int(payload[pos + 1 : end]), end + 2
        args = []
        for _ in range(count):
            end = payload.index(b"\r\n", pos)
            length, pos = int(payload[pos + 1 : end]), end + 2
            args.append(payload[pos : pos + length])
            pos += length + 2
        commands.append(args)
    return commands


class FakeRedis:
    """The connection pool, connection and server the publisher sees, in a few lines: MULTI /
    EXEC (a command refused while queued aborts EXEC), XADD to streams, keys holding strings
    (WRONGTYPE), a server-wide refusal of writes (`refuse`, from write number `refuse_from`
    on; `refuse_exec`: only at EXEC), keys the ACL denies (`deny`), a refused MULTI, a
    connection that breaks."""

    def __init__(self) -> None:
        self.strings: set[bytes] = set()
        self.deny: dict[bytes, str] = {}
        self.refuse: str | None = None
        self.refuse_from = 1
        self.refuse_multi: str | None = None
        self.refuse_exec: str | None = None
        self.break_at_write: int | None = None
        self.streams: dict[bytes, list[uuid.UUID]] = {}
        self.writes: list[list[list[bytes]]] = []
        self.disconnects = 0
        self._replies: deque[Any] = deque()
        self._queue: list[list[bytes]] | None = None
        self._dirty = False

    def publisher(self) -> RedisPublisher:
        publisher = RedisPublisher("redis://127.0.0.1:9/0")
        publisher._client = SimpleNamespace(connection_pool=self)  # type: ignore[assignment]
        return publisher

    def sent_ids(self) -> set[uuid.UUID]:
        return {
            uuid.UUID(cmd[cmd.index(b"outbox-id") + 1].decode())
            for write in self.writes
            for cmd in write
            if cmd[0] == b"XADD"
        }

    # the pool
    async def get_connection(self) -> FakeRedis:
        return self

    async def release(self, conn: FakeRedis) -> None:
        pass

    # the connection
    async def send_packed_command(self, payload: bytes) -> None:
        self.writes.append(parse_commands(payload))
        if self.break_at_write == len(self.writes):
            raise RedisConnectionError("Connection reset by peer (test)")
        self._replies.extend(self._execute(cmd) for cmd in self.writes[-1])

    async def read_response(self, disable_decoding: bool = False) -> Any:
        reply = self._replies.popleft()
        if isinstance(reply, Exception):
            raise reply
        return reply

    async def disconnect(self) -> None:
        self.disconnects += 1
        self._replies.clear()
        self._queue = None

    # the server
    def _execute(self, cmd: list[bytes]) -> Any:
        refusal = self.refuse if len(self.writes) >= self.refuse_from else None
        if cmd[0] == b"MULTI":
            if self.refuse_multi:
                return reply_error(self.refuse_multi)
            self._queue, self._dirty = [], False
            return b"OK"
        if cmd[0] == b"EXEC":
            if self._queue is None:
                return reply_error("ERR EXEC without MULTI")
            queue, self._queue = self._queue, None
            if self._dirty:
                return reply_error("EXECABORT Transaction discarded because of previous errors.")
            if refusal or self.refuse_exec:
                return reply_error(refusal or self.refuse_exec or "")
            return [self._xadd(queued) for queued in queue]
        refusal = refusal or self.deny.get(cmd[1])
        if refusal:
            self._dirty = self._queue is not None
            return reply_error(refusal)
        if self._queue is not None:
            self._queue.append(cmd)
            return b"QUEUED"
        return self._xadd(cmd)

    def _xadd(self, cmd: list[bytes]) -> Any:
        if cmd[1] in self.strings:
            return reply_error(POISON_REPLIES[0])  # in an EXEC array: returned, not raised
        entries = self.streams.setdefault(cmd[1], [])
        entries.append(uuid.UUID(cmd[cmd.index(b"outbox-id") + 1].decode()))
        return b"%d-0" % len(entries)


def verdicts(results: list[PublishResult]) -> list[Verdict | None]:
    return [r.verdict if r is not None else None for r in results]


@pytest.mark.unit
async def test_a_key_whose_event_failed_is_not_sent_to_its_next_stream() -> None:
    fake = FakeRedis()
    fake.strings.add(b"bad")
    batch = [event(1, "bad", "k"), event(2, "good", "j"), event(3, "good", "k")]
    batch.append(event(4, "good", "j"))
    results = await fake.publisher().publish(batch)
    assert results[1] is None
    assert results[2] is HELD_BACK
    assert results[3] is None
    assert isinstance(results[0], Failure)
    assert results[0].verdict is Verdict.POISON
    assert "WRONGTYPE" in results[0].message
    assert "'bad'" in results[0].message
    assert len(fake.writes) == 2  # two segments: k moved to another stream
    assert batch[2].id not in fake.sent_ids()  # never sent
    assert fake.streams == {b"good": [batch[1].id, batch[3].id]}


@pytest.mark.unit
async def test_later_events_of_a_failed_key_in_its_segment_are_held_back() -> None:
    fake = FakeRedis()
    fake.strings.add(b"bad")
    batch = [event(1, "bad", "k"), event(2, "good", "j"), event(3, "bad", "k")]
    batch += [event(4, "bad", None), event(5, "good", "j")]
    results = await fake.publisher().publish(batch)
    assert verdicts(results) == [Verdict.POISON, None, Verdict.HELD, Verdict.POISON, None]
    assert results[2] is HELD_BACK  # not its own WRONGTYPE: only the first one is poison
    assert len(fake.writes) == 1
    assert fake.writes[0][0] == [b"MULTI"]
    assert fake.writes[0][-1] == [b"EXEC"]


@pytest.mark.unit
async def test_a_full_server_refuses_the_whole_batch_and_nothing_is_appended() -> None:
    fake = FakeRedis()
    fake.refuse = OOM
    batch = [event(1, "a", "k"), event(2, "a", "k"), event(3, "b", None)]
    with pytest.raises(BrokerUnavailableError, match="OOM command not allowed"):
        await fake.publisher().publish(batch)
    assert fake.streams == {}


@pytest.mark.unit
async def test_memory_running_out_between_queueing_and_exec_refuses_the_segment() -> None:
    fake = FakeRedis()
    fake.refuse_exec = OOM  # every command was QUEUED, then EXEC answers OOM
    batch = [event(1, "a", "k"), event(2, "a", "k"), event(3, "b", None)]
    with pytest.raises(BrokerUnavailableError, match="OOM command not allowed"):
        await fake.publisher().publish(batch)
    assert fake.streams == {}


@pytest.mark.unit
async def test_a_refusal_after_a_delivered_segment_keeps_what_was_delivered() -> None:
    fake = FakeRedis()
    fake.refuse, fake.refuse_from = OOM, 2
    batch = [event(1, "A", "k"), event(2, "A", "j"), event(3, "B", "k"), event(4, "A", "j")]
    batch.append(event(5, "A", "k"))  # a third segment: not sent after the refusal
    results = await fake.publisher().publish(batch)
    assert verdicts(results) == [None, None] + [Verdict.BROKER] * 3
    assert all("OOM" in r.message for r in results[2:] if r is not None)
    assert len(fake.writes) == 2
    assert fake.streams == {b"A": [batch[0].id, batch[1].id]}


@pytest.mark.unit
async def test_a_denied_stream_refuses_its_segment_as_a_broker() -> None:
    fake = FakeRedis()
    fake.deny[b"secret"] = "NOPERM No permissions to access a key"
    batch = [event(1, "open", "a"), event(2, "secret", "b"), event(3, "open", "a")]
    with pytest.raises(BrokerUnavailableError, match="NOPERM"):
        await fake.publisher().publish(batch)
    assert fake.streams == {}  # the transaction was aborted: "open" got nothing either


@pytest.mark.unit
async def test_a_command_refused_for_an_unknown_reason_holds_the_rest_of_its_segment() -> None:
    fake = FakeRedis()
    fake.deny[b"odd"] = "ERR something this relay has never seen"
    batch = [event(1, "open", "a"), event(2, "odd", "b"), event(3, "open", "a")]
    results = await fake.publisher().publish(batch)
    assert verdicts(results) == [Verdict.HELD, Verdict.RETRY, Verdict.HELD]
    assert fake.streams == {}


@pytest.mark.unit
async def test_a_broken_connection_after_a_delivered_segment() -> None:
    fake = FakeRedis()
    fake.break_at_write = 2
    batch = [event(1, "A", "k"), event(2, "B", "k"), event(3, "A", "j")]
    results = await fake.publisher().publish(batch)
    assert verdicts(results) == [None, Verdict.BROKER, Verdict.BROKER]
    assert fake.disconnects == 1
    fake.break_at_write = 1
    fake.writes.clear()
    with pytest.raises(BrokerUnavailableError, match="Connection reset"):
        await fake.publisher().publish(batch)


@pytest.mark.unit
async def test_a_refused_multi_falls_back_to_a_plain_pipeline() -> None:
    fake = FakeRedis()
    fake.strings.add(b"bad")
    fake.refuse_multi = "NOPERM User relay has no permissions to run the 'multi' command"
    publisher = fake.publisher()
    batch = [event(1, "bad", "k"), event(2, "good", "j"), event(3, "bad", "k")]
    for _ in range(2):
        results = await publisher.publish(batch)
        assert verdicts(results) == [Verdict.POISON, None, Verdict.HELD]
    assert publisher.atomic is False
    assert [cmd[0] for cmd in fake.writes[1]] == [b"XADD"] * 3  # no MULTI any more


# -- real Redis: WRONGTYPE -----------------------------------------------------------------------


@pytest.mark.redis
async def test_wrongtype_stream_fails_only_its_own_events(redis_url: str, topic: str) -> None:
    good, bad = f"{topic}-good", f"{topic}-bad"
    client = aioredis.Redis.from_url(redis_url)
    await client.set(bad, "not a stream")
    batch = [event(1, good, "a"), event(2, good, "b"), event(3, bad, "c"), event(4, good, "a")]
    batch += [event(5, bad, "c"), event(6, bad, "d"), event(7, good, "d"), event(8, good, None)]
    batch += [event(9, good, "b"), event(10, good, "c")]
    publisher = RedisPublisher(redis_url)
    await publisher.start()
    try:
        results = await publisher.publish(batch)
        received = await read_stream(redis_url, good, None)
    finally:
        await publisher.stop()
        await client.delete(good, bad)
        await client.aclose()
    poison = [r for r in results if r is not None and r.verdict is Verdict.POISON]
    assert [batch[i].seq for i, r in enumerate(results) if r in poison] == [3, 6]
    assert all("WRONGTYPE" in r.message and repr(bad) in r.message for r in poison)
    assert [batch[i].seq for i, r in enumerate(results) if r is HELD_BACK] == [5, 7, 10]
    assert [e.seq for e in received] == [1, 2, 4, 8, 9]
    assert [e.id for e in received] == [batch[i].id for i in (0, 1, 3, 7, 8)]
    assert_per_key_order(received)


@pytest.mark.postgres
@pytest.mark.redis
async def test_relay_dead_letters_the_wrongtype_event_and_delivers_the_other_keys(
    database_url: str, redis_url: str, topic: str, pg: asyncpg.Connection
) -> None:
    good, bad = f"{topic}-good", f"{topic}-bad"
    client = aioredis.Redis.from_url(redis_url)
    await client.set(bad, "not a stream")
    events: list[OutboxEvent] = []
    poison: list[OutboxEvent] = []
    for n in range(5):
        events += [OutboxEvent(topic=good, key=k, payload={"n": n}) for k in ("a", "b")]
        if n in (1, 3):
            poison.append(OutboxEvent(topic=bad, key="c", payload={"n": n}))
            events.append(poison[-1])
    await commit_events(database_url, events)
    try:
        stats = await pg_relay(database_url, RedisPublisher(redis_url)).drain()
        received = await read_stream(redis_url, good, 10)
        assert await client.type(bad) == b"string"
    finally:
        await client.delete(good, bad)
        await client.aclose()
    assert stats.delivered == 10
    assert stats.retried == 0
    assert stats.dead_lettered == 2
    rows = await pg.fetch(
        "SELECT event_id, attempts, error_class, error_message, holds_key, held_behind"
        " FROM outbox_dead_letters ORDER BY original_seq"
    )
    assert [r["event_id"] for r in rows] == [e.id for e in poison]  # only key c's events
    first = rows[0]
    assert first["attempts"] == 1  # dead at once, no retries
    assert first["error_class"] == "ResponseError"
    assert "WRONGTYPE" in first["error_message"]
    assert repr(bad) in first["error_message"]
    # The second event of c was held back in the batch (never sent), then parked behind the
    # first by the `quarantine` policy.
    assert stats.held_back >= 1
    assert stats.parked == 1
    assert first["holds_key"]
    assert rows[1]["held_behind"] == poison[0].id
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    assert [e.id for e in received] == [e.id for e in events if e.topic == good]
    assert_per_key_order(received)


# -- a Redis of our own: full, read-only, busy ---------------------------------------------------

REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-server"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def self_signed(tmp_path: Path, name: str) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key, made with openssl."""
    cert, key = tmp_path / f"{name}.crt", tmp_path / f"{name}.key"
    args = ["req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes"]
    args += ["-days", "1", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"]
    subprocess.run(
        ["openssl", *args, "-keyout", str(key), "-out", str(cert)],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return cert, key


async def start_redis(
    tmp_path: Path, tls: tuple[Path, Path] | None = None
) -> tuple[asyncio.subprocess.Process, str] | None:
    """Start redis-server on a free loopback port; None if the port was taken meanwhile. A
    password of its own: the URL reaches this server only, never one that won the port.
    With `tls` (certificate, key), it serves TLS only, on that port: a rediss:// URL."""
    password = uuid.uuid4().hex
    port = free_port()
    args = ["--bind", "127.0.0.1", "--dir", str(tmp_path)]
    args += ["--save", "", "--appendonly", "no", "--logfile", str(tmp_path / "redis.log")]
    args += ["--maxmemory", "8mb", "--maxmemory-policy", "noeviction"]
    args += ["--requirepass", password]
    url = f"redis://:{password}@127.0.0.1:{port}/0"
    if tls is None:
        args += ["--port", str(port)]
    else:
        cert, key = tls
        args += ["--port", "0", "--tls-port", str(port), "--tls-auth-clients", "no"]
        args += ["--tls-cert-file", str(cert), "--tls-key-file", str(key)]
        args += ["--tls-ca-cert-file", str(cert)]
        url = f"rediss://:{password}@127.0.0.1:{port}/0?ssl_ca_certs={cert}"
    server = await asyncio.create_subprocess_exec(REDIS_SERVER, *args, stdout=subprocess.DEVNULL)
    client = aioredis.Redis.from_url(url)
    try:
        async with asyncio.timeout(15):
            while server.returncode is None:  # until it answers, or exits
                try:
                    await client.ping()
                except RedisConnectionError:
                    await asyncio.sleep(0.02)
                else:
                    return server, url
    finally:
        await client.aclose()
    await server.wait()
    return None


def missing(what: str) -> None:
    if os.environ.get("OUTBOX_REQUIRE_SERVICES") == "1":
        pytest.fail(what)
    pytest.skip(what)


async def run_redis(tmp_path: Path, tls: tuple[Path, Path] | None = None) -> AsyncIterator[str]:
    if not os.access(REDIS_SERVER, os.X_OK):
        missing(f"{REDIS_SERVER} not found")
    for _ in range(3):
        started = await start_redis(tmp_path, tls)
        if started is not None:
            break
        log = (tmp_path / "redis.log").read_text()
        if tls is not None and "tls" in log.lower():
            missing(f"{REDIS_SERVER} has no TLS support: {log[-300:]}")
    else:
        pytest.fail("redis-server did not start: " + (tmp_path / "redis.log").read_text())
    server, url = started
    try:
        yield url
    finally:
        server.terminate()
        try:
            await asyncio.wait_for(server.wait(), 10)
        except TimeoutError:
            server.kill()
            await server.wait()


@pytest.fixture
async def own_redis(tmp_path: Path) -> AsyncIterator[str]:
    """A throwaway redis-server on loopback for this test alone: 8 MB maxmemory, noeviction,
    no persistence. Stopped (and its files removed with tmp_path) at the end."""
    async for url in run_redis(tmp_path):
        yield url


@pytest.fixture
async def tls_redis(tmp_path: Path) -> AsyncIterator[str]:
    """`own_redis` serving TLS only, with a self-signed certificate for 127.0.0.1: its URL is
    `rediss://:<password>@127.0.0.1:<port>/0?ssl_ca_certs=<the certificate>`."""
    if shutil.which("openssl") is None:
        missing("openssl not found")
    async for url in run_redis(tmp_path, self_signed(tmp_path, "server")):
        yield url


async def fill(client: aioredis.Redis) -> None:
    """Grow a string key until the server refuses writes; then XADD gets OOM too."""
    chunk = b"x" * 256 * 1024
    for _ in range(200):
        try:
            await client.append("filler", chunk)
        except OutOfMemoryError:
            break
    with pytest.raises(OutOfMemoryError):
        await client.xadd("probe", {"f": "v"})


@pytest.mark.postgres
@pytest.mark.redis
async def test_full_redis_dead_letters_nothing_and_delivery_resumes(
    database_url: str, own_redis: str, topic: str, pg: asyncpg.Connection
) -> None:
    events = keyed_events(topic, keys=10, per_key=20)
    await commit_events(database_url, events)
    client = aioredis.Redis.from_url(own_redis)
    await fill(client)
    relay = pg_relay(database_url, RedisPublisher(own_redis))
    relay._breaker = CircuitBreaker(base_seconds=0.05, max_seconds=0.2)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.broker_failures >= 3, timeout=30)
        assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
        assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 200
        assert await pg.fetchval("SELECT max(attempts) FROM outbox_events") == 0
        assert relay.stats.delivered == relay.stats.retried == relay.stats.dead_lettered == 0
        assert await client.exists(topic) == 0  # a refused transaction appends nothing
        await client.delete("filler")
        await relay.wait_for(lambda s: s.delivered == 200, timeout=60)
    finally:
        relay.request_stop()
        await task
        await client.aclose()
    assert await pg.fetchval("SELECT count(*) FROM outbox_dead_letters") == 0
    assert await pg.fetchval("SELECT count(*) FROM outbox_events") == 0
    received = await read_stream(own_redis, topic, 200)
    assert len(received) == 200
    assert {e.id for e in received} == {e.id for e in events}
    assert_per_key_order(received)


async def loop_forever(client: aioredis.Redis) -> None:
    """A Lua script that keeps the server busy until SCRIPT KILL."""
    await client.eval("while true do end", 0)


@pytest.mark.redis
async def test_read_only_replica_and_busy_script_are_broker_refusals(own_redis: str) -> None:
    client = aioredis.Redis.from_url(own_redis)
    publisher = RedisPublisher(own_redis)
    await publisher.start()
    batch = [event(1, "orders", "a"), event(2, "orders", "a"), event(3, "audit", None)]
    try:
        await client.replicaof("127.0.0.1", str(free_port()))  # a primary that is not there
        with pytest.raises(BrokerUnavailableError, match="READONLY"):
            await publisher.publish(batch)
        await client.replicaof("NO", "ONE")

        await client.config_set("lua-time-limit", 50)  # busy-reply-threshold in 7.0
        looping = aioredis.Redis.from_url(own_redis)
        script = asyncio.create_task(loop_forever(looping))
        async with asyncio.timeout(10):
            while True:  # until the server answers BUSY
                try:
                    await client.ping()
                except ResponseError as exc:
                    busy = str(exc)
                    break
                await asyncio.sleep(0.01)  # the script has not started yet
        assert busy.startswith("BUSY")
        with pytest.raises(BrokerUnavailableError, match="BUSY"):
            await publisher.publish(batch)
        await client.script_kill()
        with pytest.raises(ResponseError, match="killed"):
            await script
        await looping.aclose()

        assert await client.exists("orders", "audit") == 0
        assert await publisher.publish(batch) == [None, None, None]
        assert await client.xlen("orders") == 2
    finally:
        await publisher.stop()
        await client.aclose()


async def run_fails_at_start(database_url: str, redis_url: str, *secrets: str) -> str:
    """`outbox-relay run --broker redis` with a wrong setup: it exits 2, without a traceback,
    and no secret shows. Returns its last line."""
    proc = relay_process(database_url, "--broker", "redis", "--redis-url", redis_url)
    try:
        _, stderr = await asyncio.to_thread(proc.communicate, timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
    text = stderr.decode()
    assert proc.returncode == 2, text[-2000:]
    assert [line for line in text.splitlines() if "Traceback" in line] == []
    for secret in secrets:
        assert secret not in text
    last = text.strip().splitlines()[-1]
    assert last.startswith("outbox-relay: error: "), last
    return last


@pytest.mark.postgres
@pytest.mark.parametrize("password", ["wrong-secret", ""], ids=["wrong", "missing"])
async def test_a_wrong_or_missing_password_is_a_configuration_error(
    database_url: str, own_redis: str, password: str
) -> None:
    """Not an outage to retry forever: `run` exits 2 with one line, the password redacted."""
    parts = urlsplit(own_redis)
    netloc = (
        f":{password}@{parts.hostname}:{parts.port}"
        if password
        else f"{parts.hostname}:{parts.port}"
    )
    bad_url = urlunsplit(parts._replace(netloc=netloc))
    last = await run_fails_at_start(database_url, bad_url, "wrong-secret")
    assert last.startswith("outbox-relay: error: redis redis://"), last
    assert "password" in last


# -- TLS (rediss://) and ACL users ---------------------------------------------------------------


def docs_acl_setuser() -> list[str]:
    """The `ACL SETUSER` line of docs/operations.md ("Redis over TLS, and ACL users")."""
    doc = (ROOT / "docs" / "operations.md").read_text()
    (line,) = [line for line in doc.splitlines() if line.startswith("ACL SETUSER ")]
    return line.split()


def with_user(url: str, user: str, password: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(netloc=f"{user}:{password}@{parts.hostname}:{parts.port}"))


def with_query(url: str, query: str) -> str:
    return urlunsplit(urlsplit(url)._replace(query=query))


@pytest.mark.unit
def test_a_rediss_url_with_tls_files_and_an_acl_user(tmp_path: Path) -> None:
    ca, _ = self_signed(tmp_path, "ca")  # loaded when the publisher is built
    url = f"rediss://outbox-relay:s%40cret@redis.internal:6380/2?ssl_ca_certs={ca}"
    options = RedisPublisher(url + "&ssl_cert_reqs=required")._client.connection_pool
    assert options.connection_class is SSLConnection
    kwargs = options.connection_kwargs
    assert (kwargs["host"], kwargs["port"], kwargs["db"]) == ("redis.internal", 6380, 2)
    assert (kwargs["username"], kwargs["password"]) == ("outbox-relay", "s@cret")
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_cert_reqs"]) == (str(ca), "required")


@pytest.mark.unit
@pytest.mark.parametrize(
    ("query", "problem"),
    [
        ("ssl_ca_certs={missing}", "ssl_ca_certs={missing}: no such file"),
        ("ssl_certfile={missing}", "ssl_certfile={missing}: no such file"),
        ("ssl_ca_certs={not_pem}", "cannot load its TLS files"),
        ("ssl_ca_cert={ca}", "unexpected keyword argument 'ssl_ca_cert'"),
        ("ssl_cert_reqs=maybe", "Invalid SSL Certificate Requirements Flag: maybe"),
        ("socket_timeout=soon", "Invalid value for 'socket_timeout'"),
    ],
)
def test_a_redis_url_redis_py_cannot_use_is_a_configuration_error(
    tmp_path: Path, query: str, problem: str
) -> None:
    files = {"missing": tmp_path / "nope.pem", "not_pem": tmp_path / "x.pem", "ca": tmp_path}
    files["not_pem"].write_text("not a certificate")
    url = f"rediss://u:s3cret-pw@127.0.0.1:6380/0?{query.format(**files)}"
    with pytest.raises(ConfigurationError) as caught:
        RedisPublisher(url)
    message = str(caught.value)
    assert message.startswith("redis_url: ")
    assert problem.format(**files) in message
    assert "s3cret-pw" not in message


@pytest.mark.unit
def test_tls_parameters_in_a_redis_url_say_rediss() -> None:
    with pytest.raises(ConfigurationError, match=r"ssl_\* parameters need a rediss:// URL"):
        RedisPublisher("redis://127.0.0.1:6379/0?ssl_ca_certs=/etc/hostname")


@pytest.mark.postgres
@pytest.mark.redis
async def test_the_relay_delivers_over_tls_as_an_acl_user(
    database_url: str, tls_redis: str, topic: str
) -> None:
    """The documented ACL, on a server that serves TLS only: the relay starts (its XADD
    probe passes), publishes every event in order, in MULTI/EXEC transactions."""
    admin = aioredis.Redis.from_url(tls_redis)
    try:
        assert await admin.execute_command(*docs_acl_setuser()) == b"OK"  # type: ignore[no-untyped-call]
    finally:
        await admin.aclose()
    relay_url = with_user(tls_redis, "outbox-relay", "change-me")
    events = keyed_events(topic, keys=3, per_key=4)
    await commit_events(database_url, events)
    publisher = RedisPublisher(relay_url)
    stats = await pg_relay(database_url, publisher).drain()
    assert stats.delivered == len(events)
    assert publisher.atomic  # +multi +exec were enough
    received = await read_stream(tls_redis, topic, len(events))
    assert [e.id for e in received] == [e.id for e in events]
    assert_per_key_order(received)


@pytest.mark.postgres
@pytest.mark.parametrize(
    "mistake", ["wrong-ca", "missing-ca", "wrong-password", "no-xadd", "plain-to-tls-ca"]
)
async def test_tls_and_acl_mistakes_are_configuration_errors(
    database_url: str, tls_redis: str, tmp_path: Path, mistake: str
) -> None:
    """`run` exits 2 with one line naming the problem, the password masked."""
    admin = aioredis.Redis.from_url(tls_redis)
    try:
        await admin.execute_command(*docs_acl_setuser())  # type: ignore[no-untyped-call]
        await admin.execute_command(  # type: ignore[no-untyped-call]
            "ACL", "SETUSER", "reader", "on", ">reader-secret", "~*", "+@read", "+ping"
        )
    finally:
        await admin.aclose()
    relay_url = with_user(tls_redis, "outbox-relay", "change-me")
    query = urlsplit(tls_redis).query
    other_ca, _ = self_signed(tmp_path, "other")
    bad_url, expected = {
        "wrong-ca": (
            with_query(relay_url, f"ssl_ca_certs={other_ca}"),
            "TLS certificate verification failed (self-signed certificate)",
        ),
        "missing-ca": (
            with_query(relay_url, f"ssl_ca_certs={tmp_path / 'gone.crt'}"),
            f"redis_url: ssl_ca_certs={tmp_path / 'gone.crt'}: no such file",
        ),
        "wrong-password": (
            with_query(with_user(tls_redis, "outbox-relay", "wrong-secret"), query),
            "WRONGPASS",
        ),
        "no-xadd": (
            with_query(with_user(tls_redis, "reader", "reader-secret"), query),
            "NOPERM this user has no permissions to run the 'xadd' command",
        ),
        "plain-to-tls-ca": (
            with_query(relay_url.replace("rediss://", "redis://"), query),
            "ssl_* parameters need a rediss:// URL",
        ),
    }[mistake]
    last = await run_fails_at_start(
        database_url, bad_url, "change-me", "wrong-secret", "reader-secret"
    )
    assert expected in last, last


@pytest.mark.postgres
@pytest.mark.redis
async def test_redis_connections_that_the_network_forgets_are_given_up_in_seconds(
    database_url: str, redis_url: str, topic: str
) -> None:
    """The network between the relay and Redis forgets the relay's connection (a firewall's or
    a NAT gateway's idle timeout): its packets are dropped, with no reset (tests/tcp_proxy.py).
    The publisher's socket timeout gives up on it, the breaker retries on a new connection,
    and every event arrives, in order per key, none dead-lettered."""
    proxy = SilentProxy(urlsplit(redis_url).port or 6379)
    await proxy.start()
    before = keyed_events(topic, keys=5, per_key=10)
    after = keyed_events(topic, keys=5, per_key=10)
    await commit_events(database_url, before)
    relay = pg_relay(database_url, RedisPublisher(proxy.url(redis_url)), batch_size=10)
    relay._breaker = CircuitBreaker(base_seconds=0.05, max_seconds=0.2)
    task = asyncio.create_task(relay.run())
    try:
        await relay.wait_for(lambda s: s.delivered == len(before), timeout=30)
        proxy.forget()
        await commit_events(database_url, after)
        await relay.wait_for(lambda s: s.delivered == len(before) + len(after), timeout=60)
    finally:
        relay.request_stop()
        await task
        await proxy.stop()
    assert proxy.forgotten >= 1
    assert relay.stats.broker_failures >= 1
    assert relay.stats.dead_lettered == 0
    received = first_seen_order(await read_stream(redis_url, topic, None))
    assert {e.id for e in received} == {e.id for e in [*before, *after]}
    assert_per_key_order(received)
