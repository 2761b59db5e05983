"""Embed the relay in a FastAPI (or any Starlette) app: `FastAPI(lifespan=outbox_lifespan())`.

The relay runs as a background task on the app's event loop while the lifespan is entered. It
shares nothing with the request handlers but the database, and it keeps retrying when the
database or the broker is down, so it never stops the app from starting. Every worker process
may run one: relays share the key buckets through leases.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any

from outbox.extras import requires_extra
from outbox.urls import redact_text

with requires_extra("outbox.relay.fastapi"):
    from outbox.relay.factory import build_relay
    from outbox.relay.logs import relay_logger
    from outbox.relay.relay import Relay
    from outbox.relay.retry import CircuitBreaker
    from outbox.relay.settings import RelaySettings

if TYPE_CHECKING:
    from fastapi import APIRouter
    from starlette.applications import Starlette

log = relay_logger("relay.fastapi")

#: Name of the relay on `app.state` and in the lifespan state (`request.state`).
STATE_KEY = "outbox_relay"


class OutboxLifespan:
    """An async context manager that runs a relay while it is entered.

    FastAPI calls it with the app (`lifespan=outbox_lifespan(...)`), which also sets
    `app.state.outbox_relay`. Entering returns `{"outbox_relay": relay}`, the lifespan state
    Starlette copies into `request.state`. On exit it asks the relay to stop and waits for it:
    the in-flight batch settles and the bucket leases are released.

    Supervision: a relay built here (from settings or a `factory`) that dies of an unexpected
    error is logged (`relay_task_failed`) and replaced by a fresh one after a pause that
    doubles from `restart_delay` up to a minute, for as long as the app runs; `restarts`
    counts them and `app.state.outbox_relay` is always the current relay. A `relay` instance
    passed in can run only once: its error is raised on exit instead.
    """

    def __init__(
        self,
        settings: RelaySettings | None,
        relay: Relay | None,
        factory: Callable[[], Relay] | None = None,
        restart_delay: float = 1.0,
    ) -> None:
        if sum(x is not None for x in (settings, relay, factory)) > 1:
            raise ValueError("outbox_lifespan: pass settings, relay or factory, not several")
        self._settings = settings
        self._given = relay
        self._factory = factory
        self._restart = CircuitBreaker(base_seconds=restart_delay, max_seconds=60.0)
        self._app: Starlette | None = None
        self._task: asyncio.Task[None] | None = None
        self._stopping = asyncio.Event()
        self.relay: Relay | None = None
        self.restarts = 0

    def __call__(self, app: Starlette) -> OutboxLifespan:
        self._app = app
        return self

    def _new_relay(self) -> Relay:
        if self._given is not None:
            relay = self._given
        elif self._factory is not None:
            relay = self._factory()
        else:
            # A relay runs once; one built from settings is built anew on every start.
            relay = build_relay(self._settings or RelaySettings())
        if self._app is not None:
            setattr(self._app.state, STATE_KEY, relay)
        self.relay = relay
        return relay

    async def __aenter__(self) -> dict[str, Relay]:
        if self._task is not None:
            raise RuntimeError("outbox_lifespan is already running")
        self._stopping.clear()
        relay = self._new_relay()
        self._task = asyncio.create_task(self._supervise(relay), name="outbox-relay")
        self._task.add_done_callback(self._report)
        return {STATE_KEY: relay}

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        task, self._task = self._task, None
        if task is None or self.relay is None:
            return
        self._stopping.set()
        self.relay.request_stop()
        try:
            await task
        except Exception:
            # Logged by _report. Raised unless the app is already failing with its own error.
            if exc is None:
                raise

    async def _supervise(self, relay: Relay) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await relay.run()
            except Exception as exc:
                if self._given is not None or self._stopping.is_set():
                    raise
                if loop.time() - started > 60:
                    self._restart.record_success()  # it ran a while: start the pauses over
                pause = self._restart.record_failure()
                log.exception("relay_task_failed", error=repr(exc), restart_in=round(pause, 2))
            else:
                return  # asked to stop
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(pause):
                    await self._stopping.wait()
            if self._stopping.is_set():
                return
            relay = self._new_relay()
            self.restarts += 1
            log.info("relay_restarted", restarts=self.restarts)

    @property
    def database_url(self) -> str:
        """The database the relays use (their settings, or the OUTBOX_* variables)."""
        return (self._settings or RelaySettings()).database_url

    @property
    def running(self) -> bool:
        """Whether the relay task runs (a relay waiting to be restarted counts)."""
        return self._task is not None and not self._task.done()

    def _report(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            log.warning("relay_task_cancelled")
        elif (error := task.exception()) is not None:
            log.error("relay_task_failed", error=repr(error), exc_info=error)


def outbox_lifespan(
    settings: RelaySettings | None = None,
    *,
    relay: Relay | None = None,
    factory: Callable[[], Relay] | None = None,
    restart_delay: float = 1.0,
) -> OutboxLifespan:
    """A lifespan that runs the relay beside the app, restarting it if it dies.

    `settings` defaults to `RelaySettings()` (the OUTBOX_* environment variables); `factory`
    builds relays of your own (called again for each restart); `relay` runs one relay you built
    yourself, once. Use it as `FastAPI(lifespan=outbox_lifespan(settings))`, or inside your
    own lifespan: `async with outbox_lifespan(settings)(app): yield`.
    """
    return OutboxLifespan(settings, relay, factory, restart_delay)


def outbox_router(
    lifespan: OutboxLifespan,
    *,
    prefix: str = "/outbox",
    ready_timeout: float = 2.0,
    dlq_auth: Callable[..., Any] | None = None,
    database_url: str | None = None,
) -> APIRouter:
    """Health probes and metrics of the relay that `lifespan` runs:

    - `GET {prefix}/health/live`: 200 while the relay task runs (a crashed relay being
      restarted counts as alive), 503 once it has ended;
    - `GET {prefix}/health/ready`: 200 when the database answers within `ready_timeout`, the
      broker's circuit breaker is closed, and the relay holds key buckets (or every bucket
      has a live owner, so it is not needed); else 503 with the reasons;
    - `GET {prefix}/metrics`: the Prometheus exposition of the relay's metrics.

    With `dlq_auth`, a FastAPI dependency that raises (401, 403) for callers who may not read
    dead letters, two read-only endpoints are added behind it (there is no mutating one;
    replay and purge are `outbox-relay dlq` commands):

    - `GET {prefix}/dead-letters?topic=&key=&type=&error_class=&since=&until=&limit=`: the
      newest first (a key's chain in order), without payloads;
    - `GET {prefix}/dead-letters/{event_id}`: one in full, headers and payload included.

    They read `database_url` (default: the lifespan's settings).

    Mind what a readiness probe does: an API pod that fails it gets no traffic. For a relay
    embedded in an API, probe `/health/ready` from monitoring rather than from the pod's
    readinessProbe, unless you want the API out of rotation while the broker is down."""
    with requires_extra("outbox_router"):
        from fastapi import APIRouter, Response
        from fastapi.responses import JSONResponse
        from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    from outbox.relay.metrics import relay_registry

    router = APIRouter(prefix=prefix, tags=["outbox"])
    registry = relay_registry(lambda: lifespan.relay)

    @router.get("/health/live")
    async def live() -> JSONResponse:
        relay, alive = lifespan.relay, lifespan.running
        body = {
            "status": "alive" if alive else "dead",
            "relay_id": relay.relay_id if relay else None,
            "restarts": lifespan.restarts,
        }
        return JSONResponse(body, status_code=200 if alive else 503)

    @router.get("/health/ready")
    async def ready() -> JSONResponse:
        relay = lifespan.relay
        if relay is None or not lifespan.running:
            return JSONResponse({"status": "not ready", "reasons": ["relay not running"]}, 503)
        reasons = []
        try:
            async with asyncio.timeout(ready_timeout):
                backlog = await relay.store.backlog()
        except Exception as exc:  # noqa: BLE001 - any failure means: not ready
            reasons.append(f"database: {type(exc).__name__}: {redact_text(str(exc))}")
            backlog = None
        if relay.breaker_open:
            reasons.append("broker: unavailable (circuit breaker open)")
        owned = relay.stats.owned_buckets
        if owned == 0 and (backlog is None or backlog.unowned_buckets > 0):
            reasons.append("buckets: this relay holds none while some have no live owner")
        body = {
            "status": "not ready" if reasons else "ready",
            "reasons": reasons,
            "relay_id": relay.relay_id,
            "owned_buckets": owned,
            "pending_events": backlog.pending if backlog else None,
            "oldest_pending_age_seconds": backlog.oldest_age if backlog else None,
        }
        return JSONResponse(body, status_code=503 if reasons else 200)

    @router.get("/metrics")
    async def metrics() -> Response:
        return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)

    if dlq_auth is not None:
        _add_dead_letter_routes(router, dlq_auth, database_url or lifespan.database_url)
    return router


def _add_dead_letter_routes(router: APIRouter, auth: Callable[..., Any], database_url: str) -> None:
    from fastapi import Depends, HTTPException, Query

    from outbox.relay import admin

    def utc(moment: datetime | None) -> datetime | None:
        return moment.replace(tzinfo=UTC) if moment and moment.tzinfo is None else moment

    @router.get("/dead-letters", dependencies=[Depends(auth)])
    async def list_dead_letters(
        topic: str | None = None,
        key: str | None = None,
        type: str | None = None,
        error_class: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
        limit: int = Query(50, ge=1, le=1000),
    ) -> dict[str, Any]:
        filters = admin.Filters(
            topic=topic,
            key=key,
            event_type=type,
            error_class=error_class,
            since=utc(since),
            until=utc(until),
        )
        async with admin.connect(database_url) as conn:
            rows = await admin.list_dead_letters(conn, filters, limit)
        return {"dead_letters": [admin.document(r) for r in rows]}

    @router.get("/dead-letters/{event_id}", dependencies=[Depends(auth)])
    async def show_dead_letter(event_id: uuid.UUID) -> dict[str, Any]:
        async with admin.connect(database_url) as conn:
            rows = await admin.show_dead_letters(conn, admin.Filters(event_ids=(event_id,)))
        if not rows:
            raise HTTPException(404, f"no dead letter with event id {event_id}")
        return admin.document(rows[0])
