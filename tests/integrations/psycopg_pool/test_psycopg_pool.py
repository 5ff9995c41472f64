"""What is specific to psycopg 3 pools; the shared behaviour is in ../test_common_*.py."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import psycopg
import pytest
from psycopg_pool import (
    AsyncConnectionPool,
    AsyncNullConnectionPool,
    ConnectionPool,
    NullConnectionPool,
)

import pgleak
from pgleak._core import core
from pgleak.integrations.psycopg_pool import PsycopgPoolAdapter
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import assert_site

PATCHED = [
    (ConnectionPool, "getconn"),
    (ConnectionPool, "putconn"),
    (ConnectionPool, "close"),
    (AsyncConnectionPool, "getconn"),
    (AsyncConnectionPool, "putconn"),
    (AsyncConnectionPool, "close"),
]
#: Patched on a class that inherits the method: uninstall deletes the attribute again.
PATCHED_INHERITED = [
    (NullConnectionPool, "_getconn_unchecked"),
    (AsyncNullConnectionPool, "_getconn_unchecked"),
]


@pytest.fixture
def pool(pg: Server, installed: pgleak.Settings) -> Iterator[ConnectionPool[psycopg.Connection]]:
    with ConnectionPool(
        pg.dsn + " password=s3cret-pw application_name=x", min_size=1, max_size=2, timeout=0.5
    ) as opened:
        yield opened


def test_uninstall_restores_every_patched_method_exactly() -> None:
    pgleak.uninstall()
    originals = {(cls, attr): cls.__dict__[attr] for cls, attr in PATCHED}
    pgleak.install()
    pgleak.install()
    try:
        assert "psycopg_pool" in pgleak.installed()
        for cls, attr in PATCHED:
            assert cls.__dict__[attr] is not originals[(cls, attr)], f"{cls.__name__}.{attr}"
        for cls, attr in PATCHED_INHERITED:
            assert attr in cls.__dict__, f"{cls.__name__}.{attr}"
    finally:
        pgleak.uninstall()
    for cls, attr in PATCHED_INHERITED:
        assert attr not in cls.__dict__, f"{cls.__name__}.{attr}"
    for cls, attr in PATCHED:
        assert cls.__dict__[attr] is originals[(cls, attr)], f"{cls.__name__}.{attr}"
    # The Null pools inherit the methods: nothing was put on them, nothing is left there.
    assert "getconn" not in NullConnectionPool.__dict__


def test_pool_name_shows_target_but_no_password(
    pool: ConnectionPool[psycopg.Connection],
) -> None:
    conn = pool.getconn()
    try:
        [checkout] = pgleak.checked_out()
    finally:
        pool.putconn(conn)
    assert checkout.pool.startswith(f"{pool.name} (host=")
    assert "password=***" in checkout.pool
    assert "s3cret" not in checkout.pool


def test_a_foreign_connection_is_refused_and_nothing_is_checked_in(
    pg: Server, pool: ConnectionPool[psycopg.Connection]
) -> None:
    mine = pool.getconn()
    with ConnectionPool(pg.dsn, min_size=1, max_size=1) as other:
        theirs = other.getconn()
        with pytest.raises(ValueError, match="pool"):
            pool.putconn(theirs)
        assert len(pgleak.checked_out()) == 2
        other.putconn(theirs)
    pool.putconn(mine)
    assert pgleak.checked_out() == []


def test_a_connection_broken_while_out_is_checked_in_without_report(
    pool: ConnectionPool[psycopg.Connection], events: EventCapture
) -> None:
    conn = pool.getconn()
    conn.close()
    pool.putconn(conn)  # the pool discards it and opens a replacement
    assert pgleak.checked_out() == []
    assert core.by_conn == {}
    assert events.events == []


def test_getconn_with_its_own_timeout_reports_that_wait(
    pool: ConnectionPool[psycopg.Connection], events: EventCapture
) -> None:
    held = [pool.getconn(), pool.getconn()]
    with pytest.raises(psycopg_pool_timeout()):
        pool.getconn(timeout=0.2)  # WAITER
    for conn in held:
        pool.putconn(conn)
    [event] = events.of("pool.exhausted")
    assert event.waiter is not None
    assert event.waiter.held_s == pytest.approx(0.2)
    assert_site(event.waiter.stack, "WAITER")
    assert "couldn't get a connection" in (event.detail or "")


def psycopg_pool_timeout() -> type[BaseException]:
    from psycopg_pool import PoolTimeout

    return PoolTimeout


def test_async_connection_context_names_the_async_with_line(
    pg: Server, events: EventCapture
) -> None:
    async def main() -> None:
        apool = AsyncConnectionPool(pg.dsn, min_size=1, max_size=1, open=False)
        async with apool, apool.connection() as conn:  # ASYNC-WITH
            await conn.execute("select 1")
            await asyncio.to_thread(events.wait_for, "leak.suspected")

    asyncio.run(main())
    [event] = events.of("leak.suspected")
    assert_site(event.stack, "ASYNC-WITH")


def test_named_integration_installs_alone() -> None:
    pgleak.uninstall()
    try:
        pgleak.install(integrations=["psycopg_pool"])
        assert pgleak.installed() == ["psycopg_pool"]
    finally:
        pgleak.uninstall()
    assert PsycopgPoolAdapter.name == "psycopg_pool"


def test_exhaustion_names_the_slots_lost_to_collected_connections(
    pg: Server, events: EventCapture, caplog: pytest.LogCaptureFixture
) -> None:
    """psycopg_pool keeps only a count of what it lends: a connection dropped without
    ``putconn`` takes its slot with it, and the report of the pool running dry says where."""
    import gc
    import logging

    from psycopg_pool import PoolTimeout

    caplog.set_level(logging.ERROR, logger="pgleak")
    with ConnectionPool(pg.dsn, min_size=0, max_size=2) as small:
        for _ in range(2):
            small.getconn()  # DROPPED
        gc.collect()
        events.wait_for("leak.collected", count=2)
        with pytest.raises(PoolTimeout):
            small.getconn(timeout=0.3)
    [event] = events.of("pool.exhausted")
    assert event.holders == ()
    assert len(event.lost) == 2
    for lost in event.lost:
        assert_site(lost.stack, "DROPPED")
    assert len(event.as_dict()["lost"]) == 2
    [record] = [r for r in caplog.records if r.getMessage().startswith("pool.exhausted")]
    message = record.getMessage()
    assert "0 connection(s) held and 2 slot(s) lost to connections garbage-collected" in message
    assert message.count("lost: garbage-collected after") == 2
