"""The outbox relay: claims committed outbox rows and publishes them to a broker."""

from relay.relay import Relay, RelayStats
from relay.retry import RetryPolicy
from relay.seams import BrokerUnavailableError, Failure, Publisher, Store, StoreUnavailableError
from relay.settings import RelaySettings

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
