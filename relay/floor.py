"""The claim's floor: a seq below which the relay has nothing left to claim.

Why: the claim walks the primary key in seq order. While a transaction is open anywhere in the
database (a report, a session idle in transaction), Postgres may not clean up the rows the
relays delete, so a claim that starts at the head of the index walks every row delivered since
that transaction began: with one open for minutes the drain slowed down as 1/N. With a floor
the scan starts past them.

When is a seq below the floor safe to skip? Three things can put a claimable event there:

1. A writer that drew a lower seq and commits late. `Horizon` rules that out: an INSERT locks
   outbox_events before it draws its seq, so once every transaction that held that lock when
   `outbox_last_seq()` was S has ended, no seq up to S can appear any more.
2. Events the relay claimed and left pending: held back behind a failed event of their key,
   or refused with the whole broker. `ClaimFloor.advance` stays below the lowest of them.
3. Waiting events (a retry backoff, a delayed delivery, a replayed dead letter: available_at
   later than created_at), and the events of their keys queued behind them. The claim itself
   lowers the floor below the lowest waiting seq, in its own snapshot (queries.sql).

Whatever else could slip below (buckets taken over from another relay, a lease lost, a store
outage) resets the floor to 0, and so does a full sweep every `sweep_seconds`, a backstop that
bounds the delay of anything this reasoning missed.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field


class Horizon:
    """The highest seq that no writer can still be committing, from samples of
    (`outbox_last_seq()`, the transactions then holding outbox_events' write lock), read in that
    order. A sample's seq is safe once none of its writers holds the lock any more."""

    def __init__(self, keep: int = 4096) -> None:
        self._samples: deque[tuple[int, frozenset[str]]] = deque(maxlen=keep)
        self.safe = 0

    def observe(self, last_seq: int, writers: Iterable[str]) -> int:
        now = frozenset(writers)
        self._samples.append((last_seq, now))
        for i in range(len(self._samples) - 1, -1, -1):
            seq, then = self._samples[i]
            if not then & now:  # every writer of that moment has ended
                self.safe = max(self.safe, seq)
                for _ in range(i):  # older samples cannot say more
                    self._samples.popleft()
                break
        return self.safe

    def reset(self) -> None:
        """After a lost connection: start over (a restarted Postgres reuses lock ids)."""
        self._samples.clear()
        self.safe = 0


@dataclass(slots=True)
class ClaimFloor:
    """The floor the loop gives its claims (see the module docstring)."""

    sweep_seconds: float = 60.0
    value: int = 0
    next_sweep: float = field(default=0.0)

    def current(self, now: float) -> int:
        """The floor for a claim at `now` (monotonic seconds): 0 when a sweep is due."""
        if now >= self.next_sweep:
            self.value = 0
            self.next_sweep = now + self.sweep_seconds
        return self.value

    def advance(self, horizon: int, boundary: int, pending: Iterable[int]) -> None:
        """After a claim was published: every claimable event of the relay's buckets up to
        `boundary` (the claim's last seq when it was full, else all of them) was in the claim
        or in flight beside it, and no writer can still add one up to `horizon` (read before
        the claim). So nothing up to the lower of the two is left to claim, but for `pending`:
        claimed events left in the outbox (held back, refused with the broker, passed over)."""
        limit = min(horizon, boundary)
        self.value = min(limit, min(pending, default=limit + 1) - 1)

    def reset(self) -> None:
        self.value = 0
