"""The outbox relay: claims committed outbox rows and publishes them to a broker."""

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
