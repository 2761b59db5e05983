"""Embed the relay in a FastAPI (or any Starlette) app: `FastAPI(lifespan=outbox_lifespan())`.

The relay runs as a background task on the app's event loop while the lifespan is entered. It
shares nothing with the request handlers but the database, and it keeps retrying when the
database or the broker is down, so it never stops the app from starting. Every worker process
may run one: relays share the key buckets through leases.
"""

from __future__ import annotations

import asyncio
from types import TracebackType
from typing import TYPE_CHECKING

import structlog

from relay.factory import build_relay
from relay.relay import Relay
from relay.settings import RelaySettings

if TYPE_CHECKING:
    from starlette.applications import Starlette

log = structlog.get_logger("relay.fastapi")

#: Name of the relay on `app.state` and in the lifespan state (`request.state`).
STATE_KEY = "outbox_relay"


class OutboxLifespan:
    """An async context manager that runs a relay while it is entered.

    FastAPI calls it with the app (`lifespan=outbox_lifespan(...)`), which also sets
    `app.state.outbox_relay`. Entering returns `{"outbox_relay": relay}`, the lifespan state
    Starlette copies into `request.state`. On exit it asks the relay to stop and waits for it:
    the in-flight batch settles and the bucket leases are released.
    """

    def __init__(self, settings: RelaySettings | None, relay: Relay | None) -> None:
        if settings is not None and relay is not None:
            raise ValueError("outbox_lifespan: pass settings or relay, not both")
        self._settings = settings
        self._given = relay
        self._app: Starlette | None = None
        self._task: asyncio.Task[None] | None = None
        self.relay: Relay | None = None

    def __call__(self, app: Starlette) -> OutboxLifespan:
        self._app = app
        return self

    async def __aenter__(self) -> dict[str, Relay]:
        if self._task is not None:
            raise RuntimeError("outbox_lifespan is already running")
        # A relay runs once; one built from settings is built anew on every start.
        relay = self._given or build_relay(self._settings or RelaySettings())
        if self._app is not None:
            setattr(self._app.state, STATE_KEY, relay)
        self.relay = relay
        self._task = asyncio.create_task(relay.run(), name="outbox-relay")
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
        self.relay.request_stop()
        try:
            await task
        except Exception:
            # Logged by _report. Raised unless the app is already failing with its own error.
            if exc is None:
                raise

    def _report(self, task: asyncio.Task[None]) -> None:
        if task.cancelled():
            log.warning("relay_task_cancelled")
        elif (error := task.exception()) is not None:
            log.error("relay_task_failed", error=repr(error), exc_info=error)


def outbox_lifespan(
    settings: RelaySettings | None = None, *, relay: Relay | None = None
) -> OutboxLifespan:
    """A lifespan that runs the relay beside the app.

    `settings` defaults to `RelaySettings()` (the OUTBOX_* environment variables); `relay` runs a
    relay you built yourself instead. Use it as `FastAPI(lifespan=outbox_lifespan(settings))`,
    or inside your own lifespan: `async with outbox_lifespan(settings)(app): yield`.
    """
    return OutboxLifespan(settings, relay)
