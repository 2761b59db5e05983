"""The relay embedded in a FastAPI app (examples/fastapi_app.py): real Postgres, real Redis."""

from __future__ import annotations

import gc
import importlib.util
import sys
import uuid
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import cast

import asyncpg
import httpx
import pytest
import redis.asyncio as aioredis
from fastapi import FastAPI

from outbox.envelope import Envelope
from outbox.relay.fastapi import outbox_lifespan, outbox_router
from outbox.relay.relay import Relay
from outbox.relay.seams import PublishResult
from outbox.relay.settings import RelaySettings
from outbox.relay.stores.sqlite import SqliteStore
from outbox.urls import asyncpg_dsn
from tests.fakes import FakeClock, OutboxDb, RecordingPublisher
from tests.helpers import eventually, free_port

TIMEOUT = 30.0
#: What XREAD returns: [(stream, [(entry id, {field: value})])].
StreamReply = list[tuple[bytes, list[tuple[bytes, dict[bytes, bytes]]]]]
EXAMPLE = Path(__file__).resolve().parent.parent / "examples" / "fastapi_app.py"


def load_create_app() -> Callable[[RelaySettings], FastAPI]:
    """examples/fastapi_app.py's `create_app`, loaded from its file (examples/ is no package)."""
    spec = importlib.util.spec_from_file_location("outbox_example_fastapi_app", EXAMPLE)
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # pydantic and FastAPI resolve annotations through it
    spec.loader.exec_module(module)
    create_app: Callable[[RelaySettings], FastAPI] = module.create_app
    return create_app


create_app = load_create_app()


async def read_one(redis_url: str, stream: str) -> Envelope:
    """The first entry of `stream`, waiting for it with XREAD BLOCK."""
    client = aioredis.Redis.from_url(redis_url)
    try:
        reply = cast(
            StreamReply, await client.xread({stream: "0-0"}, count=10, block=int(TIMEOUT * 1000))
        )
    finally:
        await client.aclose()
    assert reply, f"nothing arrived on {stream} within {TIMEOUT} s"
    [(name, entries)] = reply
    assert name == stream.encode()
    assert len(entries) == 1, entries
    return Envelope.from_redis(stream, entries[0][1])


@pytest.mark.postgres
@pytest.mark.redis
async def test_order_event_reaches_redis_and_leases_are_released(
    database_url: str, redis_url: str, topic: str
) -> None:
    settings = RelaySettings(
        database_url=database_url,
        broker="redis",
        redis_url=redis_url,
        redis_mode="streams",
        topic_prefix=f"{topic}.",  # the app publishes to "orders": this test's own stream
        poll_interval=0.2,
        lease_seconds=5,
        relay_id=f"fastapi-{uuid.uuid4().hex[:6]}",
    )
    stream = f"{topic}.orders"
    app = create_app(settings)
    collector = gc.get_threshold(), gc.isenabled(), gc.get_freeze_count()
    async with app.router.lifespan_context(app):
        relay: Relay = app.state.outbox_relay
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post("/orders", json={"customer": "ada", "total_cents": 4200})
            assert response.status_code == 201, response.text
            order = response.json()

            event = await read_one(redis_url, stream)
            assert event.id == uuid.UUID(order["event_id"])
            assert event.key == f"order-{order['id']}"
            assert event.event_type == "OrderPlaced"
            assert event.json() == {"order_id": order["id"], "customer": "ada", "total_cents": 4200}

            # Deleted once the broker acknowledged it (the stats count after the delete).
            await relay.wait_for(lambda s: s.delivered >= 1, timeout=TIMEOUT)
            status = (await client.get("/outbox/relay")).json()
            assert status["relay_id"] == settings.relay_id
            assert status["owned_buckets"] == 64  # the only live relay owns every bucket
            # The app's garbage collector is the app's (only `outbox-relay run` tunes it).
            assert (gc.get_threshold(), gc.isenabled(), gc.get_freeze_count()) == collector
            assert status["delivered"] == 1

            live = await client.get("/outbox/health/live")
            assert live.status_code == 200, live.text
            assert live.json()["relay_id"] == settings.relay_id
            ready = await client.get("/outbox/health/ready")
            assert ready.status_code == 200, ready.text
            assert ready.json()["owned_buckets"] == 64
            metrics = await client.get("/outbox/metrics")
            assert metrics.headers["content-type"].startswith("text/plain")
            assert 'outbox_events_published_total{broker="redis",topic="orders"} 1.0' in (
                metrics.text
            )
    assert relay.stats.stopped

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM outbox_events") == 0
        assert await conn.fetchval("SELECT count(*) FROM orders") == 1
        assert (
            await conn.fetchval("SELECT count(*) FROM outbox_bucket_leases WHERE owner IS NOT NULL")
            == 0
        )
        assert await conn.fetchval("SELECT count(*) FROM outbox_relays") == 0
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_a_failed_request_commits_neither_order_nor_event(database_url: str) -> None:
    settings = RelaySettings(database_url=database_url, broker="stdout", poll_interval=0.2)
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            response = await client.post("/orders", json={"customer": "ada", "total_cents": 0})
            assert response.status_code == 422
    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        assert await conn.fetchval("SELECT count(*) FROM orders") == 0
        assert await conn.fetchval("SELECT count(*) FROM outbox_events") == 0
    finally:
        await conn.close()


class ExplodingPublisher:
    name = "exploding"

    async def start(self) -> None:
        return None

    async def stop(self) -> None:
        return None

    async def publish(self, batch: Sequence[Envelope]) -> list[PublishResult]:
        raise RuntimeError("publisher bug (test)")


@pytest.mark.unit
async def test_a_crashed_relay_is_raised_on_exit_not_swallowed(db: OutboxDb) -> None:
    store = db.store()
    await db.add(key="k")
    relay = Relay(store, ExplodingPublisher(), relay_id="test", poll_interval=0.01)
    lifespan = outbox_lifespan(relay=relay)
    assert await lifespan.__aenter__() == {"outbox_relay": relay}
    await relay.wait_for(lambda s: s.stopped, timeout=TIMEOUT)
    assert store.stopped  # leases given back even though the loop crashed
    with pytest.raises(RuntimeError, match="publisher bug"):
        await lifespan.__aexit__(None, None, None)


@pytest.mark.unit
async def test_the_app_error_wins_over_the_relay_error(db: OutboxDb) -> None:
    store = db.store()
    await db.add(key="k")
    relay = Relay(store, ExplodingPublisher(), relay_id="test", poll_interval=0.01)
    lifespan = outbox_lifespan(relay=relay)
    await lifespan.__aenter__()
    await relay.wait_for(lambda s: s.stopped, timeout=TIMEOUT)
    app_error = KeyError("app failed")
    # Returns instead of raising the relay's error (logged), so the app's own error propagates.
    await lifespan.__aexit__(KeyError, app_error, None)


@pytest.mark.unit
def test_settings_and_relay_are_exclusive(tmp_path: Path) -> None:
    store = SqliteStore(f"sqlite:///{tmp_path / 'outbox.db'}", clock=FakeClock())
    relay = Relay(store, ExplodingPublisher(), relay_id="test")
    with pytest.raises(ValueError, match="not several"):
        outbox_lifespan(RelaySettings(database_url="sqlite:///x.db"), relay=relay)


@pytest.mark.unit
async def test_a_crashed_relay_is_restarted_with_backoff(db: OutboxDb) -> None:
    event = await db.add(key="k")
    recorder = RecordingPublisher()
    built: list[Relay] = []

    def factory() -> Relay:
        publisher = ExplodingPublisher() if len(built) < 2 else recorder  # two crashes, then fine
        built.append(Relay(db.store(), publisher, relay_id=f"r{len(built)}", poll_interval=0.01))
        return built[-1]

    app = FastAPI()
    lifespan = outbox_lifespan(factory=factory, restart_delay=0.01)(app)
    await lifespan.__aenter__()
    try:
        await eventually_relay(lambda: len(built) == 3)
        await built[2].wait_for(lambda s: s.delivered == 1, timeout=TIMEOUT)
        assert app.state.outbox_relay is built[2]  # the current relay
    finally:
        await lifespan.__aexit__(None, None, None)  # the crashes were handled: nothing raised
    assert lifespan.restarts == 2
    assert [e.id for e in recorder.published] == [event.id]
    assert built[2].stats.stopped


async def eventually_relay(check: Callable[[], bool]) -> None:
    async def checked() -> bool:
        return check()

    await eventually(checked, timeout=TIMEOUT, every=0.01)


@pytest.mark.postgres
async def test_readiness_fails_with_the_reason_while_the_broker_is_down(database_url: str) -> None:
    settings = RelaySettings(
        database_url=database_url,
        broker="redis",
        redis_url=f"redis://127.0.0.1:{free_port()}/0",  # nothing listens there
        poll_interval=0.2,
    )
    app = create_app(settings)
    async with app.router.lifespan_context(app):
        relay: Relay = app.state.outbox_relay
        await relay.wait_for(lambda s: s.broker_failures >= 1, timeout=TIMEOUT)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/outbox/health/live")).status_code == 200
            ready = await client.get("/outbox/health/ready")
            assert ready.status_code == 503
            assert ready.json()["reasons"] == ["broker: unavailable (circuit breaker open)"]
            metrics = (await client.get("/outbox/metrics")).text
            assert "outbox_breaker_open 1.0" in metrics


@pytest.mark.postgres
async def test_readiness_fails_while_the_database_is_unreachable() -> None:
    settings = RelaySettings(
        database_url=f"postgresql://outbox:secret-pw@127.0.0.1:{free_port()}/outbox",
        broker="stdout",
        poll_interval=0.2,
    )
    lifespan = outbox_lifespan(settings)
    app = FastAPI(lifespan=lifespan)
    app.include_router(outbox_router(lifespan))
    async with app.router.lifespan_context(app):
        relay: Relay = app.state.outbox_relay
        await relay.wait_for(lambda s: s.store_failures >= 1, timeout=TIMEOUT)
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            assert (await client.get("/outbox/health/live")).status_code == 200
            ready = await client.get("/outbox/health/ready")
            assert ready.status_code == 503
            reasons = ready.json()["reasons"]
            assert reasons[0].startswith("database: "), reasons
            assert "buckets: this relay holds none" in reasons[-1]
            assert "secret-pw" not in ready.text
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        dead = await client.get("/outbox/health/live")
        assert dead.status_code == 503  # the lifespan has ended: the relay is gone


@pytest.mark.postgres
async def test_dead_letter_endpoints_are_read_only_and_behind_the_given_auth(
    database_url: str,
) -> None:
    from fastapi import Header, HTTPException

    from outbox.relay.fastapi import outbox_router

    def operators_only(x_token: str | None = Header(None)) -> None:
        if x_token != "s3cret":
            raise HTTPException(403, "operators only")

    conn = await asyncpg.connect(asyncpg_dsn(database_url))
    try:
        ids = [uuid.uuid4(), uuid.uuid4()]
        for n, (event_id, topic) in enumerate(zip(ids, ["orders", "audit"], strict=True)):
            await conn.execute(
                "INSERT INTO outbox_dead_letters (event_id, original_seq, topic, key, payload,"
                " headers, created_at, attempts, first_failed_at, last_failed_at, error_class,"
                " error_message, relay_id) VALUES ($1, $2, $3, 'k', '{\"n\": 1}', '{}', now(), 1,"
                " now(), now(), 'E', 'refused', 'r')",
                event_id,
                n + 1,
                topic,
            )
    finally:
        await conn.close()
    settings = RelaySettings(database_url=database_url, broker="stdout", poll_interval=0.2)
    lifespan = outbox_lifespan(settings)
    app = FastAPI(lifespan=lifespan)
    app.include_router(outbox_router(lifespan, dlq_auth=operators_only))
    bare = FastAPI()
    bare.include_router(outbox_router(outbox_lifespan(settings)))  # no auth: no endpoints
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://app"
    ) as client:
        token = {"x-token": "s3cret"}
        assert (await client.get("/outbox/dead-letters")).status_code == 403
        listed = await client.get("/outbox/dead-letters", params={"topic": "orders"}, headers=token)
        assert listed.status_code == 200, listed.text
        [row] = listed.json()["dead_letters"]
        assert row["event_id"] == str(ids[0])
        assert "payload" not in row
        shown = await client.get(f"/outbox/dead-letters/{ids[1]}", headers=token)
        assert shown.json()["payload"] == {"n": 1}
        assert shown.json()["topic"] == "audit"
        missing = await client.get(f"/outbox/dead-letters/{uuid.uuid4()}", headers=token)
        assert missing.status_code == 404
        assert (
            await client.get("/outbox/dead-letters/not-a-uuid", headers=token)
        ).status_code == 422
        bad = await client.get("/outbox/dead-letters", params={"limit": 0}, headers=token)
        assert bad.status_code == 422
        for method in ("POST", "PUT", "DELETE", "PATCH"):
            response = await client.request(method, f"/outbox/dead-letters/{ids[0]}", headers=token)
            assert response.status_code == 405, method
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=bare), base_url="http://app"
    ) as client:
        assert (await client.get("/outbox/dead-letters")).status_code == 404
