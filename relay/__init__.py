"""The outbox relay: claims committed outbox rows and publishes them to a broker.

Needs the `relay` extra (`pip install "outbox[relay,kafka]"`). The names below load on first
use (PEP 562), so that `outbox-relay` can name a missing extra instead of failing here."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from outbox.extras import requires_extra

if TYPE_CHECKING:
    from outbox.relay.relay import Relay, RelayStats
    from outbox.relay.retry import RetryPolicy
    from outbox.relay.seams import (
        BrokerUnavailableError,
        Failure,
        Publisher,
        Store,
        StoreUnavailableError,
    )
    from outbox.relay.settings import RelaySettings

_WHERE = {
    "BrokerUnavailableError": "outbox.relay.seams",
    "Failure": "outbox.relay.seams",
    "Publisher": "outbox.relay.seams",
    "Relay": "outbox.relay.relay",
    "RelaySettings": "outbox.relay.settings",
    "RelayStats": "outbox.relay.relay",
    "RetryPolicy": "outbox.relay.retry",
    "Store": "outbox.relay.seams",
    "StoreUnavailableError": "outbox.relay.seams",
}

__all__ = [
    "BrokerUnavailableError",
    "Failure",
    "Publisher",
    "Relay",
    "RelaySettings",
    "RelayStats",
    "RetryPolicy",
    "Store",
    "StoreUnavailableError",
]


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'outbox.relay' has no attribute {name!r}")
    with requires_extra("outbox.relay"):
        value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_WHERE])
