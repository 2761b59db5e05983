"""The relay's memory follows bytes, not only the event count: a backlog of maximum-size events
(900 KB each; the writers' limit is 1 MiB) must not blow a container's memory limit. Before the
byte budget, 600 such events drove one relay to 1.3 GiB RSS (a batch of 500 plus the prefetch).
"""

from __future__ import annotations

import asyncio
import sys
import time

import asyncpg
import psutil
import pytest

from outbox.relay.stores.postgres import PostgresStore
from tests.helpers import relay_process

pytestmark = pytest.mark.postgres

#: 600 payloads of ~900 KB: hex that barely compresses, or a repeated string that compresses
#: ~100x (toasted small on disk, as big as ever in the relay's memory).
PAYLOADS = {
    "incompressible": "g::text || (SELECT string_agg(md5(i::text), '') "
    "FROM generate_series(1, 28000) AS i)",  # pglz compresses each value alone
    "compressible": "repeat(md5(g::text), 28000)",
}


@pytest.mark.parametrize("kind", sorted(PAYLOADS))
async def test_peak_rss_stays_under_300_mb_with_a_backlog_of_big_events(
    database_url: str, pg: asyncpg.Connection, kind: str
) -> None:
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, payload) "
        "SELECT gen_random_uuid(), 't', 'k' || (g % 50), "
        f"jsonb_build_object('blob', {PAYLOADS[kind]}) FROM generate_series(1, 600) AS g"
    )
    assert await pg.fetchval("SELECT min(octet_length(payload::text)) FROM outbox_events") > 800_000
    relay = relay_process(database_url, "--broker", "stdout", "--jsonl-path", "/dev/null")
    process = psutil.Process(relay.pid)
    peak = 0
    try:
        deadline = time.monotonic() + 120
        while await pg.fetchval("SELECT count(*) FROM outbox_events"):
            assert time.monotonic() < deadline, "the relay did not drain 600 big events in 120 s"
            assert relay.poll() is None, relay.communicate()[1].decode()[-2000:]
            peak = max(peak, process.memory_info().rss)
            await asyncio.sleep(0.02)
    finally:
        relay.terminate()
        await asyncio.to_thread(relay.communicate, timeout=60)
    print(f"{kind}: peak RSS {peak / 2**20:.0f} MB", file=sys.stderr)
    assert peak < 300 * 2**20


async def test_the_row_cap_lifts_once_stored_sizes_were_the_bytes_received(
    database_url: str, pg: asyncpg.Connection
) -> None:
    """A new store claims 32 rows first. When their stored sizes were not short of the bytes
    received, the next claim takes what was asked (nine doubling claims to reach 10,000 rows
    made half of a drain over 1,000 topics go out in small batches); when payloads compressed
    better than the claim assumes, the cap only doubles."""
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, payload) SELECT gen_random_uuid(), 't', "
        "'k' || (g % 50), jsonb_build_object('n', g) FROM generate_series(1, 600) AS g"
    )
    assert await claim_sizes(database_url, 3) == [32, 500, 68]
    await pg.execute("DELETE FROM outbox_events")
    await pg.execute(
        "INSERT INTO outbox_events (id, topic, key, payload) SELECT gen_random_uuid(), 't', "
        "'k' || (g % 50), jsonb_build_object('blob', repeat(md5(g::text), 3000)) "
        "FROM generate_series(1, 600) AS g"
    )
    assert await pg.fetchval(
        "SELECT bool_and(pg_column_size(payload) * 4 < octet_length(payload::text)) "
        "FROM outbox_events"
    )
    assert await claim_sizes(database_url, 3) == [32, 64, 128]


async def claim_sizes(database_url: str, claims: int) -> list[int]:
    """The sizes of `claims` claims of up to 500 events by a new store, none settled."""
    store = PostgresStore(database_url, lease_seconds=30)
    await store.start("row-cap")
    try:
        await store.maintain_leases(rebalance=True)
        sizes: list[int] = []
        taken: list[int] = []
        for _ in range(claims):
            claim = await store.claim(500, exclude=taken)
            sizes.append(len(claim.events))
            taken += [e.seq for e in claim.events]
        return sizes
    finally:
        await store.stop()
