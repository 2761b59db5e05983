"""Context that travels with the event (outbox/context.py): the correlation id and the W3C
trace context, from the request (or `with correlation_id(...)`, or an OpenTelemetry span) into
the event's headers, through the real relay, to real Kafka and Redis consumers."""

from __future__ import annotations

import subprocess
import sys
import uuid
from collections.abc import AsyncIterator

import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI
from opentelemetry import trace
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.trace import NonRecordingSpan, SpanContext, TraceFlags, TraceState
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

from outbox import (
    CorrelationIdMiddleware,
    OutboxEvent,
    correlation_id,
    current_correlation_id,
    enqueue,
)
from outbox.envelope import Encoder
from outbox.relay.publishers.kafka import KafkaPublisher
from outbox.relay.settings import RelaySettings
from outbox.urls import sqlalchemy_async_url
from tests.helpers import pg_relay, read_stream
from tests.test_envelopes import read_records
from tests.test_fastapi import create_app

TIMEOUT = 30.0
PROVIDER = TracerProvider()  # an SDK provider of the tests' own, not the global one
TRACER = PROVIDER.get_tracer("tests.test_context")


def traceparent(span: trace.Span) -> str:
    ctx = span.get_span_context()
    return f"00-{ctx.trace_id:032x}-{ctx.span_id:016x}-{int(ctx.trace_flags):02x}"


def remote_parent(state: str) -> trace.Span:
    """A span as an upstream service would hand it over, with a `tracestate`."""
    return NonRecordingSpan(
        SpanContext(
            trace_id=0x0AF7651916CD43DD8448EB211C80319C,
            span_id=0xB7AD6B7169203331,
            is_remote=True,
            trace_flags=TraceFlags(TraceFlags.SAMPLED),
            trace_state=TraceState.from_header([state]),
        )
    )


# -- unit: the headers of a new event ----------------------------------------------------------


@pytest.mark.unit
def test_the_correlation_id_block_goes_into_the_events_headers() -> None:
    assert OutboxEvent(topic="t", payload={}).headers == {}
    with correlation_id("abc") as given:
        assert given == "abc"
        assert current_correlation_id() == "abc"
        event = OutboxEvent(topic="t", payload={}, headers={"n": "1"})
        explicit = OutboxEvent(topic="t", payload={}, headers={"correlation_id": "mine"})
    assert current_correlation_id() is None
    assert event.headers == {"correlation_id": "abc", "n": "1"}
    assert explicit.headers == {"correlation_id": "mine"}  # the caller's header wins
    with correlation_id() as made:
        assert uuid.UUID(made).version == 4
        assert OutboxEvent(topic="t", payload={}).headers == {"correlation_id": made}


@pytest.mark.unit
def test_an_active_span_gives_traceparent_and_tracestate() -> None:
    with TRACER.start_as_current_span("place order") as span:
        event = OutboxEvent(topic="t", payload={})
        assert event.headers == {"traceparent": traceparent(span)}
    parent = trace.set_span_in_context(remote_parent("vendor=abc"))
    with TRACER.start_as_current_span("child", context=parent) as child:
        event = OutboxEvent(topic="t", payload={}, headers={"tracestate": "mine=1"})
    assert child.get_span_context().trace_id == 0x0AF7651916CD43DD8448EB211C80319C
    assert event.headers == {"traceparent": traceparent(child), "tracestate": "mine=1"}
    with TRACER.start_as_current_span("child", context=parent) as child:
        event = OutboxEvent(topic="t", payload={})
    assert event.headers == {"traceparent": traceparent(child), "tracestate": "vendor=abc"}
    assert OutboxEvent(topic="t", payload={}).headers == {}  # no span active


def run_python(code: str) -> str:
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


@pytest.mark.unit
def test_opentelemetry_is_never_imported_and_may_be_absent() -> None:
    build = (
        "import outbox\n"
        "with outbox.correlation_id('abc'):\n"
        "    e = outbox.OutboxEvent(topic='t', payload={})\n"
        "print(e.headers['correlation_id'], 'opentelemetry' in sys.modules)\n"
    )
    assert run_python("import sys\n" + build) == "abc False"
    # Not installed: importing it fails (a None entry in sys.modules makes `import` raise).
    assert run_python("import sys\nsys.modules['opentelemetry'] = None\n" + build) == "abc True"


# -- the middleware ----------------------------------------------------------------------------


def echo_app() -> FastAPI:
    app = FastAPI()
    app.add_middleware(CorrelationIdMiddleware)

    @app.get("/")
    async def headers() -> dict[str, str]:
        return OutboxEvent(topic="t", payload={}).headers

    @app.get("/sync")
    def headers_in_a_thread() -> dict[str, str]:  # FastAPI runs it in its thread pool
        return OutboxEvent(topic="t", payload={}).headers

    return app


@pytest.fixture
async def client() -> AsyncIterator[httpx.AsyncClient]:
    transport = httpx.ASGITransport(app=echo_app())
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as c:
        yield c


@pytest.mark.unit
@pytest.mark.parametrize("path", ["/", "/sync"])
async def test_the_middleware_takes_echoes_or_makes_the_id(
    client: httpx.AsyncClient, path: str
) -> None:
    response = await client.get(path, headers={"X-Correlation-ID": "abc"})
    assert response.json() == {"correlation_id": "abc"}
    assert response.headers.get_list("x-correlation-id") == ["abc"]

    response = await client.get(path)
    made = response.headers["x-correlation-id"]
    assert uuid.UUID(made).version == 4
    assert response.json() == {"correlation_id": made}
    assert current_correlation_id() is None  # nothing leaks out of the request


@pytest.mark.unit
@pytest.mark.parametrize("bad", ["", "a b", "x" * 129, "é"])
async def test_a_malformed_incoming_id_is_replaced(client: httpx.AsyncClient, bad: str) -> None:
    response = await client.get("/", headers=[(b"X-Correlation-ID", bad.encode())])
    made = response.headers["x-correlation-id"]
    assert uuid.UUID(made).version == 4
    assert response.json() == {"correlation_id": made}


# -- real Postgres, the real relay, real Redis and Kafka ---------------------------------------


@pytest.mark.postgres
@pytest.mark.redis
@pytest.mark.parametrize(
    ("mode", "field"), [("plain", b"correlation_id"), ("cloudevents-binary", b"ce_correlationid")]
)
async def test_the_requests_correlation_id_and_span_reach_the_consumer(
    database_url: str, redis_url: str, topic: str, mode: str, field: bytes
) -> None:
    settings = RelaySettings(
        database_url=database_url,
        broker="redis",
        redis_url=redis_url,
        redis_mode="streams",
        envelope=mode,
        topic_prefix=f"{topic}.",
        poll_interval=0.2,
        relay_id=f"context-{uuid.uuid4().hex[:6]}",
    )
    stream = f"{topic}.orders"
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            with TRACER.start_as_current_span("checkout") as span:
                response = await client.post(
                    "/orders",
                    json={"customer": "ada", "total_cents": 4200},
                    headers={"X-Correlation-ID": "abc"},
                )
            assert response.status_code == 201, response.text
            assert response.headers["x-correlation-id"] == "abc"
            [event] = await read_stream(redis_url, stream, 1, timeout=TIMEOUT)
    assert event.id == uuid.UUID(response.json()["event_id"])
    assert event.headers["correlation_id"] == "abc"
    assert event.headers["traceparent"] == traceparent(span)
    client_ = aioredis.Redis.from_url(redis_url)
    try:
        entries: list[tuple[bytes, dict[bytes, bytes]]] = await client_.xrange(stream)  # type: ignore[assignment]
    finally:
        await client_.aclose()
    [(_, fields)] = entries
    assert fields[field] == b"abc"


@pytest.mark.postgres
@pytest.mark.kafka
async def test_enqueue_carries_the_context_to_kafka_cloudevents(
    database_url: str, kafka_bootstrap: str, topic: str
) -> None:
    engine = create_async_engine(sqlalchemy_async_url(database_url))
    parent = trace.set_span_in_context(remote_parent("vendor=abc"))
    try:
        async with AsyncSession(engine) as session, session.begin():
            with (
                correlation_id("job-7"),
                TRACER.start_as_current_span("job", context=parent) as span,
            ):
                await enqueue(session, topic=topic, key="k", payload={"n": 1})
    finally:
        await engine.dispose()
    publisher = KafkaPublisher(kafka_bootstrap, encoder=Encoder("cloudevents-binary"))
    assert (await pg_relay(database_url, publisher).drain()).delivered == 1
    [record] = await read_records(kafka_bootstrap, topic, 1)
    headers = dict(record.headers)
    assert headers["ce_correlationid"] == b"job-7"
    assert headers["ce_traceparent"] == traceparent(span).encode()
    assert headers["ce_tracestate"] == b"vendor=abc"
    assert headers["correlation_id"] == b"job-7"  # stays a header, for tracing libraries
