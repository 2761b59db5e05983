"""Context that travels with the event: the correlation id and the W3C trace context.

Every `OutboxEvent(...)` and `enqueue(...)` copies them into the event's headers, under the
names the envelope modes pass on (docs/consumers.md): `correlation_id` (FastStream's
correlation id, the CloudEvents `correlationid` extension), `traceparent` and `tracestate`.
A header the caller gives wins.

- The correlation id is this module's context variable: `CorrelationIdMiddleware` sets it
  per HTTP request (from `X-Correlation-ID`, else a new one), `with correlation_id("abc"):`
  anywhere else.
- The trace context is OpenTelemetry's current span, when `opentelemetry-api` is installed
  (the `otel` extra) and a span is active. This module never imports OpenTelemetry itself:
  without an import by the application no span can be active, so there is nothing to read.

ASGI only: no FastAPI or Starlette import, so the writer side stays free of them.
"""

from __future__ import annotations

import re
import sys
import uuid
from collections.abc import Awaitable, Callable, Iterator, Mapping, MutableMapping
from contextlib import contextmanager
from contextvars import ContextVar
from typing import Any

#: The event header names (the envelope's `CE_EXTENSIONS` keys).
CORRELATION_HEADER = "correlation_id"
TRACEPARENT_HEADER = "traceparent"
TRACESTATE_HEADER = "tracestate"
#: The HTTP header the middleware reads and echoes.
HTTP_HEADER = "X-Correlation-ID"
#: An incoming id is kept if it is 1-128 visible ASCII characters; else a new one replaces it
#: (it goes into headers and logs as it is).
_ACCEPTED = re.compile(r"[\x21-\x7e]{1,128}")

_correlation: ContextVar[str | None] = ContextVar("outbox_correlation_id", default=None)

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]


def current_correlation_id() -> str | None:
    """The correlation id of the running request or `correlation_id` block, if any."""
    return _correlation.get()


@contextmanager
def correlation_id(value: str | None = None) -> Iterator[str]:
    """Events built in the block carry `value` (a new uuid4 if None) as `correlation_id`."""
    value = value if value is not None else str(uuid.uuid4())
    token = _correlation.set(value)
    try:
        yield value
    finally:
        _correlation.reset(token)


_inject: Callable[[dict[str, str]], None] | None = None


def _trace_headers(into: dict[str, str]) -> None:
    """OpenTelemetry's current span as W3C `traceparent`/`tracestate`, if one is active."""
    global _inject  # the propagator, once OpenTelemetry is there
    if _inject is None:
        if "opentelemetry.trace" not in sys.modules:  # not imported: no span can be active
            return
        from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

        _inject = TraceContextTextMapPropagator().inject
    _inject(into)  # adds nothing without a valid span context


def with_context(headers: Mapping[str, str] | None) -> Mapping[str, str] | None:
    """`headers` plus the correlation id and trace context (the given headers win). Returns
    `headers` itself when there is no context to add."""
    extra: dict[str, str] = {}
    cid = _correlation.get()
    if cid is not None:
        extra[CORRELATION_HEADER] = cid
    _trace_headers(extra)
    if not extra or (headers is not None and not isinstance(headers, Mapping)):
        return headers  # nothing to add, or not a mapping: the headers check will say so
    if headers:
        extra.update(headers)
    return extra


class CorrelationIdMiddleware:
    """ASGI middleware: each HTTP request runs with a correlation id, echoed in the response.

    >>> app.add_middleware(CorrelationIdMiddleware)  # FastAPI / Starlette

    The id is the request's `X-Correlation-ID` when it is 1-128 visible ASCII characters, else
    a new uuid4. Events written while the request runs carry it as `correlation_id`."""

    def __init__(self, app: ASGIApp, header: str = HTTP_HEADER) -> None:
        self.app = app
        self.header = header
        self._raw = header.lower().encode("latin-1")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        given = next(
            (v.decode("latin-1") for n, v in scope.get("headers", ()) if n.lower() == self._raw),
            None,
        )
        value = given if given is not None and _ACCEPTED.fullmatch(given) else str(uuid.uuid4())
        encoded = value.encode("latin-1")

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = [(n, v) for n, v in message.get("headers", ()) if n.lower() != self._raw]
                message["headers"] = [*headers, (self._raw, encoded)]
            await send(message)

        with correlation_id(value):
            await self.app(scope, receive, send_with_id)
