"""Direct connections (a driver's own ``connect()``, outside any pool), against the real server.

Each driver's direct connection is a checkout of a pool named after its DSN: closed, nothing
is reported; dropped unclosed, ``leak.collected`` names the line that opened it (not for
psycopg2, whose C ``close()`` no hook sees: its limit is tested too); open at exit,
``leak.at_exit``; held past ``direct_threshold`` (off by default), ``leak.suspected``. The
connections pools open are never counted as direct ones.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import json
import subprocess
import sys
import threading
import warnings
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pgleak
from pgleak._appname import tags
from pgleak._core import core
from pgleak._events import CONNECT_RETRY
from pgleak.testing import EventCapture, capture_events
from tests.conftest import Server
from tests.helpers import assert_site, site_of
from tests.integrations.test_retry_real import MAX, Target, small

__all__ = ["small"]  # the fixture, imported to be used here

asyncpg = pytest.importorskip("asyncpg")
psycopg = pytest.importorskip("psycopg")
psycopg2 = pytest.importorskip("psycopg2")

# Bound before pgleak is installed: asyncpg's direct connections are hooked further in.
from asyncpg import connect as early_asyncpg_connect  # noqa: E402

_loop = asyncio.new_event_loop()


def _run(coro: Any) -> Any:
    return _loop.run_until_complete(coro)


# -- one kit per way of opening a direct connection ---------------------------------------------


@dataclasses.dataclass(frozen=True)
class Kit:
    name: str
    label: str  # the pool name's start
    marker: str  # the line that opens, in this file
    open: Callable[[str], Any]
    close: Callable[[Any], None]
    app_name: Callable[[Any], str]
    closes_visibly: bool = True  # psycopg2: close() unseen, so no leak.collected

    def __repr__(self) -> str:
        return self.name


def _p2_open(dsn: str) -> Any:
    return psycopg2.connect(dsn)  # OPEN-psycopg2


def _p2_app_name(conn: Any) -> str:
    with conn.cursor() as cur:
        cur.execute("SHOW application_name")
        value: str = cur.fetchone()[0]
    return value


def _pg_open(dsn: str) -> Any:
    return psycopg.connect(dsn)  # OPEN-psycopg


def _pg_class_open(dsn: str) -> Any:
    return psycopg.Connection.connect(dsn)  # OPEN-psycopg-class


def _pg_app_name(conn: Any) -> str:
    row = conn.execute("SHOW application_name").fetchone()
    return str(row[0])


async def _apg_open_async(dsn: str) -> Any:
    return await psycopg.AsyncConnection.connect(dsn)  # OPEN-psycopg-async


async def _apg_app_name(conn: Any) -> str:
    cur = await conn.execute("SHOW application_name")
    row = await cur.fetchone()
    return str(row[0])


async def _asyncpg_open(dsn: str) -> Any:
    return await asyncpg.connect(dsn)  # OPEN-asyncpg


async def _asyncpg_early_open(dsn: str) -> Any:
    return await early_asyncpg_connect(dsn)  # OPEN-asyncpg-early


def _asyncpg_dsn(libpq: str) -> str:
    parts = dict(item.split("=", 1) for item in libpq.split())
    return f"postgresql://{parts['user']}@{parts['host']}:{parts['port']}/{parts['dbname']}"


KITS = [
    Kit(
        "psycopg2",
        "psycopg2.connect (",
        "OPEN-psycopg2",
        _p2_open,
        lambda c: c.close(),
        _p2_app_name,
        closes_visibly=False,
    ),
    Kit(
        "psycopg", "psycopg.connect (", "OPEN-psycopg", _pg_open, lambda c: c.close(), _pg_app_name
    ),
    Kit(
        "psycopg-class",
        "psycopg.connect (",
        "OPEN-psycopg-class",
        _pg_class_open,
        lambda c: c.close(),
        _pg_app_name,
    ),
    Kit(
        "psycopg-async",
        "psycopg.AsyncConnection.connect (",
        "OPEN-psycopg-async",
        lambda dsn: _run(_apg_open_async(dsn)),
        lambda c: _run(c.close()),
        lambda c: _run(_apg_app_name(c)),
    ),
    Kit(
        "asyncpg",
        "asyncpg.connect (",
        "OPEN-asyncpg",
        lambda dsn: _run(_asyncpg_open(_asyncpg_dsn(dsn))),
        lambda c: _run(c.close()),
        lambda c: str(_run(c.fetchval("SHOW application_name"))),
    ),
    Kit(
        "asyncpg-terminate",
        "asyncpg.connect (",
        "OPEN-asyncpg-early",
        lambda dsn: _run(_asyncpg_early_open(_asyncpg_dsn(dsn))),
        lambda c: c.terminate(),
        lambda c: str(_run(c.fetchval("SHOW application_name"))),
    ),
]


def _direct_leases() -> list[Any]:
    return [lease for lease in core.leases.values() if lease.pool.kind.endswith(".direct")]


def _settle() -> None:
    gc.collect()
    core.flush()


@pytest.fixture(params=KITS, ids=repr)
def kit(request: pytest.FixtureRequest) -> Kit:
    k: Kit = request.param
    return k


# -- the lifecycle ------------------------------------------------------------------------------


def test_opened_and_closed_reports_nothing(kit: Kit, pg: Server, events: EventCapture) -> None:
    conn = kit.open(pg.dsn)
    [held] = pgleak.checked_out()
    assert held.pool.startswith(kit.label)
    assert pg.user in held.pool
    assert str(pg.port) in held.pool
    kit.close(conn)
    assert pgleak.checked_out() == []
    del conn
    _settle()
    assert events.events == []
    assert _direct_leases() == []


# Not psycopg2, whose close() no hook sees: test_psycopg2_dropped_unclosed_is_not_reported.
@pytest.mark.parametrize("kit", [k for k in KITS if k.closes_visibly], ids=repr)
def test_dropped_without_close_is_collected_with_the_opening_line(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    conn = kit.open(pg.dsn)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ResourceWarning)  # the driver's own "unclosed" warning
        del conn
        gc.collect()
    [report] = events.wait_for("leak.collected")
    assert report.pool.startswith(kit.label)
    assert report.checkout is not None
    assert_site(report.checkout.stack, kit.marker)
    assert report.threshold_s is None  # no direct_threshold
    assert _direct_leases() == []


def test_psycopg2_dropped_unclosed_is_not_reported(pg: Server, events: EventCapture) -> None:
    """psycopg2's deallocation closes the connection before any weak reference hears of it,
    so "dropped open" and "closed, then dropped" look alike: neither is reported (and the
    server slot is freed by that deallocation)."""
    conn = psycopg2.connect(pg.dsn)
    pid = conn.get_backend_pid()
    del conn
    _settle()
    assert events.events == []
    assert _direct_leases() == []
    with psycopg.connect(pg.dsn) as check:  # the server slot is free again
        row = check.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE pid = %s", (pid,)
        ).fetchone()
    assert row == (0,)


def test_open_at_exit_is_reported(kit: Kit, pg: Server) -> None:
    code = f"""
import json, pgleak
pgleak.install()
pgleak.add_sink(lambda e: print(json.dumps(e.as_dict()), flush=True))
from tests.integrations import test_direct as t
kit = next(k for k in t.KITS if k.name == {kit.name!r})
kept = kit.open({pg.dsn!r})
closed = kit.open({pg.dsn!r})
kit.close(closed)
"""
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    reports = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["event"] for r in reports] == ["leak.at_exit"], result.stdout
    assert reports[0]["pool"].startswith(kit.label)
    assert reports[0]["detail"] == "process exit"
    assert "test_direct.py" in reports[0]["stack"][-1]


# -- held past direct_threshold -----------------------------------------------------------------


@pytest.fixture
def threshold() -> Iterator[EventCapture]:
    pgleak.install(leak_threshold=30, direct_threshold=0.2, report_interval=60)
    try:
        with capture_events() as events:
            yield events
    finally:
        pgleak.uninstall()


def test_held_past_direct_threshold_is_suspected(
    kit: Kit, pg: Server, threshold: EventCapture
) -> None:
    conn = kit.open(pg.dsn)
    try:
        [report] = threshold.wait_for("leak.suspected")
        assert report.pool.startswith(kit.label)
        assert report.threshold_s == pytest.approx(0.2)
        assert report.checkout is not None
        assert_site(report.checkout.stack, kit.marker)
    finally:
        kit.close(conn)
    threshold.wait_for("leak.returned")


def test_closed_before_direct_threshold_is_not_suspected(
    kit: Kit, pg: Server, threshold: EventCapture
) -> None:
    """Also psycopg2's, whose close() pgleak never sees: ``closed`` is read at the deadline."""
    closed = kit.open(pg.dsn)
    kit.close(closed)
    kept = kit.open(pg.dsn)  # the sentinel: reported once the deadline has passed
    lease = core.lease_of(kept)
    assert lease is not None
    try:
        [report] = threshold.wait_for("leak.suspected")
        assert report.checkout is not None
        assert report.checkout.checkout_id == lease.id
        assert _direct_leases() == [lease]
    finally:
        kit.close(kept)
    threshold.wait_for("leak.returned")
    assert [e.event for e in threshold.events] == ["leak.suspected", "leak.returned"]


def test_without_direct_threshold_a_long_hold_is_no_leak(pg: Server, events: EventCapture) -> None:
    """``leak_threshold`` (0.2 s here) is for pools: a pool checkout held as long is reported,
    the direct connection opened before it is not."""
    from psycopg_pool import ConnectionPool

    conn = psycopg.connect(pg.dsn)
    pool = ConnectionPool(pg.dsn, min_size=1, max_size=1, open=True)
    try:
        held = pool.getconn()
        [report] = events.wait_for("leak.suspected")
        assert not report.pool.startswith("psycopg.connect")
        pool.putconn(held)
        assert [c.pool.startswith("psycopg.connect") for c in pgleak.checked_out()] == [True]
    finally:
        pool.close()
        conn.close()


# -- tags, retry, switches ----------------------------------------------------------------------


def test_connection_carries_the_process_tag(kit: Kit, pg: Server, events: EventCapture) -> None:
    conn = kit.open(pg.dsn)
    try:
        assert kit.app_name(conn) == tags.base
    finally:
        kit.close(conn)


def test_own_application_name_is_kept(pg: Server, events: EventCapture) -> None:
    with psycopg.connect(pg.dsn, application_name="mine") as conn:
        assert _pg_app_name(conn) == "mine"
    with psycopg2.connect(pg.dsn + " application_name=mine2") as conn2:
        assert _p2_app_name(conn2) == "mine2"
    conn2.close()


@contextlib.contextmanager
def _full(t: Target) -> Iterator[list[Any]]:
    """Every slot of ``t`` taken by pgleak-suppressed connections (the caller's are not)."""
    conns: list[Any] = []
    try:
        for _ in range(MAX):
            with pgleak.suppress():
                conns.append(psycopg.connect(t.dsn()))
        yield conns
    finally:
        for conn in conns:
            conn.close()


def test_refused_53300_is_retried(kit: Kit, small: Target, retrying: EventCapture) -> None:
    with _full(small) as conns:
        done = threading.Event()

        def free_one() -> None:
            while not retrying.of(CONNECT_RETRY) and not done.wait(0.01):
                pass
            conns.pop().close()

        freer = threading.Thread(target=free_one)
        freer.start()
        try:
            conn = kit.open(small.dsn())
        finally:
            done.set()
            freer.join()
        kit.close(conn)
    retries = retrying.of(CONNECT_RETRY)
    assert retries
    assert {e.as_dict()["sqlstate"] for e in retries} == {"53300"}
    assert retries[0].pool.startswith(kit.label)


def test_track_direct_off(pg: Server) -> None:
    pgleak.install(track_direct=False)
    try:
        conn = psycopg.connect(pg.dsn)
        try:
            assert pgleak.checked_out() == []
            assert _pg_app_name(conn) != tags.base
        finally:
            conn.close()
    finally:
        pgleak.uninstall()


def test_suppressed_connect_is_left_alone(pg: Server, events: EventCapture) -> None:
    with pgleak.suppress():
        conn = psycopg2.connect(pg.dsn)
    try:
        assert pgleak.checked_out() == []
        assert _p2_app_name(conn) != tags.base
    finally:
        conn.close()


def test_direct_threshold_setting_parses() -> None:
    from pgleak._settings import build_settings

    assert build_settings({}).direct_threshold is None
    assert build_settings({}, {"PGLEAK_DIRECT_THRESHOLD": "2.5"}).direct_threshold == 2.5
    assert build_settings({}, {"PGLEAK_DIRECT_THRESHOLD": "off"}).direct_threshold is None
    with pytest.raises(pgleak.ConfigError, match="direct_threshold"):
        build_settings({"direct_threshold": -1})
    assert build_settings({}, {"PGLEAK_TRACK_DIRECT": "0"}).track_direct is False


# -- the connections pools open are the pools' ----------------------------------------------------


def _sqlalchemy(driver: str) -> Callable[[Server], None]:
    def use(pg: Server) -> None:
        import sqlalchemy as sa

        engine = sa.create_engine(pg.url(driver), pool_size=2)
        try:
            with engine.connect() as conn:
                assert _direct_leases() == []
                conn.exec_driver_sql("select 1")
        finally:
            engine.dispose()

    return use


def _sqlalchemy_creator(pg: Server) -> None:
    import sqlalchemy as sa

    engine = sa.create_engine("postgresql+psycopg2://", creator=lambda: psycopg2.connect(pg.dsn))
    try:
        with engine.connect() as conn:
            assert _direct_leases() == []
            conn.exec_driver_sql("select 1")
    finally:
        engine.dispose()


def _sqlalchemy_async(pg: Server) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def use() -> None:
        engine = create_async_engine(pg.url("asyncpg"))
        try:
            async with engine.connect() as conn:
                assert _direct_leases() == []
                await conn.exec_driver_sql("select 1")
        finally:
            await engine.dispose()

    _run(use())


def _psycopg_pool(pg: Server) -> None:
    from psycopg_pool import ConnectionPool, NullConnectionPool

    for cls in (ConnectionPool, NullConnectionPool):
        pool = cls(pg.dsn, min_size=1 if cls is ConnectionPool else 0, max_size=2)
        with pool, pool.connection():
            assert _direct_leases() == []


def _psycopg_pool_async(pg: Server) -> None:
    from psycopg_pool import AsyncConnectionPool

    async def use() -> None:
        pool = AsyncConnectionPool(pg.dsn, min_size=1, max_size=2, open=False)
        await pool.open(wait=True)
        try:
            async with pool.connection():
                assert _direct_leases() == []
        finally:
            await pool.close()

    _run(use())


def _psycopg2_pool(pg: Server) -> None:
    from psycopg2.pool import ThreadedConnectionPool

    pool = ThreadedConnectionPool(1, 2, pg.dsn)
    try:
        conn = pool.getconn()
        assert _direct_leases() == []
        pool.putconn(conn)
    finally:
        pool.closeall()


def _asyncpg_pool(pg: Server) -> None:
    async def use() -> None:
        pool = await asyncpg.create_pool(_asyncpg_dsn(pg.dsn), min_size=1, max_size=2)
        try:
            async with pool.acquire() as conn:
                assert _direct_leases() == []
                await conn.close()  # a pool connection closed by hand: still no direct lease
        finally:
            await pool.close()

    _run(use())


POOLS = {
    "sqlalchemy-psycopg2": _sqlalchemy("psycopg2"),
    "sqlalchemy-psycopg": _sqlalchemy("psycopg"),
    "sqlalchemy-creator": _sqlalchemy_creator,
    "sqlalchemy-asyncpg": _sqlalchemy_async,
    "psycopg_pool": _psycopg_pool,
    "psycopg_pool-async": _psycopg_pool_async,
    "psycopg2.pool": _psycopg2_pool,
    "asyncpg.Pool": _asyncpg_pool,
}


@pytest.mark.parametrize("name", list(POOLS))
def test_pool_connections_are_never_direct(
    name: str, pg: Server, events: EventCapture, monkeypatch: pytest.MonkeyPatch
) -> None:
    seen: list[str] = []
    original = core.checkout

    def spy(handle: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append(handle.kind)
        return original(handle, *args, **kwargs)

    monkeypatch.setattr(core, "checkout", spy)
    POOLS[name](pg)
    monkeypatch.undo()
    assert seen, "the pool's checkout was not tracked"
    assert not [kind for kind in seen if kind.endswith(".direct")]
    _settle()
    assert events.of("leak.collected") == []
    assert events.of("leak.at_exit") == []


def test_connections_to_one_dsn_share_one_pool(pg: Server, events: EventCapture) -> None:
    conns = [psycopg.connect(pg.dsn) for _ in range(10)]
    try:
        handles = {lease.pool for lease in _direct_leases()}
        assert len(handles) == 1
    finally:
        for conn in conns:
            conn.close()
    assert _direct_leases() == []


def test_call_site_tag_names_the_opening_line(kit: Kit, pg: Server) -> None:
    pgleak.install(app_name_call_site=True, service_name="svc")
    try:
        conn = kit.open(pg.dsn)
        try:
            site = site_of(kit.marker, depth=1).rsplit("/", 1)[-1]
            assert kit.app_name(conn) == f"svc:{site}"
        finally:
            kit.close(conn)
    finally:
        pgleak.uninstall()


def test_target_names_are_bounded() -> None:
    """A program connecting to ever new DSNs keeps a bounded number of targets: past the
    bound, new ones share one name per driver."""
    from pgleak.integrations import _direct
    from pgleak.integrations.psycopg2 import _target

    driver = _direct.Driver(
        "test.direct", describe=_target, retag=lambda a, k: None, closed=lambda c: False
    )
    names = {
        driver.handle("psycopg2.connect", (f"host=h{i} dbname=d password=s3cret",), {}).name
        for i in range(2 * _direct._MAX_TARGETS)
    }
    assert len(driver._targets) <= _direct._MAX_TARGETS + 1
    assert "psycopg2.connect (other targets)" in names
    assert "psycopg2.connect (host=h0 dbname=d password=***)" in names
    assert not any("s3cret" in name for name in names)
