"""The claim's floor (relay/floor.py): where it may start, and that nothing below it is lost
or reordered: late commits, held events, retries, replayed dead letters; and that with a
snapshot held open the claim no longer walks the rows it deleted."""

from __future__ import annotations

import asyncio
import re
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from outbox.relay.floor import ClaimFloor, Horizon
from outbox.relay.relay import Relay
from outbox.relay.sql import QUERIES
from outbox.relay.stores.postgres import PLANNER_SETTINGS, PostgresStore
from outbox.urls import asyncpg_dsn
from tests.fakes import RecordingPublisher
from tests.helpers import eventually

INSERT = (
    "INSERT INTO outbox_events (id, topic, key, payload) VALUES ($1, 't', $2, '{}') RETURNING seq"
)


# -- the pure parts --------------------------------------------------------------------------


@pytest.mark.unit
def test_horizon_waits_for_every_writer_of_a_sample() -> None:
    horizon = Horizon()
    assert horizon.observe(10, []) == 10  # nobody writing: all of it is final
    assert horizon.observe(20, ["a"]) == 10  # "a" may hold a seq in 11..20
    assert horizon.observe(30, ["a", "b"]) == 10
    assert horizon.observe(40, ["b", "c"]) == 20  # "a" ended: up to 20 is final
    assert horizon.observe(50, ["c"]) == 30  # the writers of 30 ended; "c" of 40 has not
    assert horizon.observe(60, ["d"]) == 50
    horizon.reset()
    assert horizon.safe == 0
    assert horizon.observe(70, ["d"]) == 0  # after a reset, a writer seen only now pins it


@pytest.mark.unit
def test_claim_floor_stays_below_what_was_left_pending_and_sweeps() -> None:
    floor = ClaimFloor(sweep_seconds=60)
    assert floor.current(0.0) == 0
    floor.advance(100, 120, [])
    assert floor.current(1.0) == 100  # writers may still add seqs above 100
    floor.advance(200, 180, [])
    assert floor.current(1.5) == 180  # a full claim: claimable events beyond its last seq
    floor.advance(200, 200, [150, 170])
    assert floor.current(2.0) == 149
    floor.reset()
    assert floor.current(3.0) == 0
    floor.advance(300, 300, [])
    assert floor.current(59.0) == 300
    assert floor.current(60.0) == 0  # the sweep: one claim from the head now and then


# -- on Postgres -----------------------------------------------------------------------------

pytestmark = pytest.mark.postgres


@pytest.fixture
async def store(database_url: str) -> AsyncIterator[PostgresStore]:
    store = PostgresStore(database_url, lease_seconds=5)
    store.horizon_interval = 0.02
    await store.start("floor-test")
    await store.maintain_leases(rebalance=True)
    yield store
    await store.stop()


async def wait_horizon(store: PostgresStore, reached: int, timeout: float = 10) -> None:
    async def there() -> bool:
        return store.horizon() >= reached

    await eventually(there, timeout, every=0.02)


async def test_horizon_stays_below_an_uncommitted_insert(
    store: PostgresStore, database_url: str
) -> None:
    late = await asyncpg.connect(asyncpg_dsn(database_url))
    other = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        first = await other.fetchval(INSERT, uuid.uuid4(), "a")
        await wait_horizon(store, first)
        await late.execute("BEGIN")
        late_seq = await late.fetchval(INSERT, uuid.uuid4(), "k")
        seqs = [await other.fetchval(INSERT, uuid.uuid4(), f"o{i}") for i in range(3)]
        await asyncio.sleep(0.3)  # many samples while the late writer is open
        assert first <= store.horizon() < late_seq
        await late.execute("COMMIT")
        await wait_horizon(store, max(seqs))
    finally:
        await late.close()
        await other.close()


@pytest.fixture
async def relay_running(store: PostgresStore) -> AsyncIterator[tuple[Relay, RecordingPublisher]]:
    publisher = RecordingPublisher()
    relay = Relay(store, publisher, relay_id="floor-test", poll_interval=0.05, batch_size=50)
    task = asyncio.create_task(relay.run())
    yield relay, publisher
    relay.request_stop()
    await task


async def test_a_late_commit_below_the_delivered_ones_still_goes_out_in_key_order(
    relay_running: tuple[Relay, RecordingPublisher], database_url: str, store: PostgresStore
) -> None:
    relay, publisher = relay_running
    late = await asyncpg.connect(asyncpg_dsn(database_url))
    other = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        await late.execute("BEGIN")
        late_seq = await late.fetchval(INSERT, uuid.uuid4(), "k")
        for i in range(200):
            await other.fetchval(INSERT, uuid.uuid4(), f"o{i}")
        await relay.wait_for(lambda s: s.delivered >= 200, timeout=30)
        await asyncio.sleep(0.3)  # claims go on, each with the floor it has
        await late.execute("COMMIT")  # seq below 200 delivered events
        after_seq = await other.fetchval(INSERT, uuid.uuid4(), "k")
        await relay.wait_for(lambda s: s.delivered >= 202, timeout=10)
    finally:
        await late.close()
        await other.close()
    keyed = [e.seq for e in publisher.published if e.key == "k"]
    assert keyed == [late_seq, after_seq]


async def test_retries_and_replays_below_the_floor_are_claimed(
    relay_running: tuple[Relay, RecordingPublisher], database_url: str
) -> None:
    """Waiting rows (a retry come due, a replayed dead letter with its original seq) sit
    below the floor: the claim goes below the lowest of them, in the same snapshot."""
    relay, publisher = relay_running
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        low = await conn.fetchval(INSERT, uuid.uuid4(), "r")
        await conn.execute(  # a retry, due in a moment
            "UPDATE outbox_events SET available_at = now() + interval '300 ms', attempts = 1"
            " WHERE seq = $1",
            low,
        )
        for i in range(100):
            await conn.fetchval(INSERT, uuid.uuid4(), f"o{i}")
        await relay.wait_for(lambda s: s.delivered >= 100, timeout=30)
        await relay.wait_for(lambda s: s.delivered >= 101, timeout=10)  # the retry came due
        # A replayed dead letter: back with its original (low) seq, as `dlq replay` does.
        replayed = await conn.fetchval(
            "INSERT INTO outbox_events (seq, id, topic, key, payload, created_at)"
            " VALUES ($1, $2, 't', 'q', '{}', now() - interval '1 hour') RETURNING seq",
            low + 1,  # the seq of an event delivered (and deleted) long ago
            uuid.uuid4(),
        )
        await relay.wait_for(lambda s: s.delivered >= 102, timeout=10)
    finally:
        await conn.close()
    assert publisher.published[-1].seq == replayed
    assert low in [e.seq for e in publisher.published]


async def test_with_a_snapshot_held_the_claim_skips_the_rows_it_deleted(
    database_url: str,
) -> None:
    """EXPLAIN of the claim after 50,000 rows were deleted while a REPEATABLE READ snapshot
    is held: from the head it visits every dead index entry; from the floor, almost none."""
    holder = await asyncpg.connect(asyncpg_dsn(database_url))
    pg = await asyncpg.connect(asyncpg_dsn(database_url), server_settings=PLANNER_SETTINGS)
    try:
        await pg.execute(
            "INSERT INTO outbox_events (id, topic, key, payload) "
            "SELECT gen_random_uuid(), 't', 'k' || g, '{}' FROM generate_series(1, 50500) AS g"
        )
        await pg.execute(
            "UPDATE outbox_bucket_leases SET owner = 'r1', lease_until = now() + interval '1 hour'"
        )
        await holder.execute("BEGIN ISOLATION LEVEL REPEATABLE READ")
        await holder.fetchval("SELECT count(*) FROM outbox_bucket_leases")  # the snapshot
        delivered = await pg.fetchval(
            "WITH d AS (DELETE FROM outbox_events WHERE seq <= (SELECT min(seq) + 49999"
            " FROM outbox_events) RETURNING seq) SELECT max(seq) FROM d"
        )
        await pg.execute("ANALYZE outbox_events")

        async def buffers(floor: int) -> int:
            plan = "\n".join(
                r[0]
                for r in await pg.fetch(
                    "EXPLAIN (ANALYZE, BUFFERS) " + QUERIES["claim_batch"],
                    "r1",
                    500,
                    [],
                    2**24,
                    floor,
                )
            )
            scan = re.search(
                r"Index Scan using pk_outbox_events on outbox_events e.*?Buffers: shared hit=(\d+)",
                plan,
                flags=re.S,
            )
            assert scan is not None, plan
            return int(scan.group(1))

        from_head, from_floor = await buffers(0), await buffers(delivered)
        await holder.execute("ROLLBACK")
    finally:
        await holder.close()
        await pg.close()
    assert from_head > 10 * from_floor, (from_head, from_floor)


async def test_a_caching_sequence_turns_the_floor_off(database_url: str) -> None:
    """With CACHE > 1 a session may hand out a lower seq long after a higher one: no floor."""
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await conn.fetchval("SELECT outbox_last_seq()") == 0
        await conn.execute("ALTER TABLE outbox_events ALTER COLUMN seq SET CACHE 20")
        assert await conn.fetchval("SELECT outbox_last_seq()") is None
        store = PostgresStore(database_url)
        store.horizon_interval = 0.01
        await store.start("cache-test")
        try:
            await conn.fetchval(INSERT, uuid.uuid4(), "k")
            await asyncio.sleep(0.1)  # samplings, had there been any
            assert store.horizon() == 0
        finally:
            await store.stop()
    finally:
        await conn.close()
