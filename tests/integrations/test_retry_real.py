"""Connection retry against real servers, for every adapter.

A dedicated server with ``max_connections=3`` is filled with direct connections (opened under
``pgleak.suppress()``, outside any pool); a request through each library's pool must then be
refused for real (53300), retried, and succeed once a slot is freed - or give up at the
deadline with the driver's own error. A second dedicated server is put into a smart shutdown
with a session still open, which makes it refuse new connections with 57P03 for as long as the
session stays. Neither disturbs the session server other tests use.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pgleak
from pgleak._events import CONNECT_GAVE_UP, CONNECT_RETRY
from pgleak._retry import classify
from pgleak.embedded import EmbeddedPostgres
from pgleak.testing import EventCapture, capture_events
from tests.integrations.kits import _available

MAX = 3


@dataclasses.dataclass(frozen=True)
class Target:
    host: str
    port: int
    user: str
    dbname: str

    def dsn(self, dbname: str | None = None) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={dbname or self.dbname}"

    def url(self, driver: str, dbname: str | None = None) -> str:
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{dbname or self.dbname}"


# -- one request per adapter: open a pool, take a connection, run SELECT 1, close --------------


def _sa(driver: str) -> Callable[[Target, str | None], Any]:
    def request(t: Target, dbname: str | None) -> Any:
        import sqlalchemy as sa

        engine = sa.create_engine(t.url(driver, dbname))
        try:
            with engine.connect() as conn:
                return conn.exec_driver_sql("select 1").scalar()
        finally:
            engine.dispose()

    return request


def _sa_async(t: Target, dbname: str | None) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> Any:
        engine = create_async_engine(t.url("asyncpg", dbname))
        try:
            async with engine.connect() as conn:
                return (await conn.exec_driver_sql("select 1")).scalar()
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _pp_null(t: Target, dbname: str | None) -> Any:
    from psycopg_pool import NullConnectionPool

    pool = NullConnectionPool(t.dsn(dbname), min_size=0, max_size=5, timeout=10, open=True)
    with pool, pool.connection() as conn:
        row = conn.execute("select 1").fetchone()
        return None if row is None else row[0]


def _pp_async_null(t: Target, dbname: str | None) -> Any:
    from psycopg_pool import AsyncNullConnectionPool

    async def run() -> Any:
        pool = AsyncNullConnectionPool(
            t.dsn(dbname), min_size=0, max_size=5, timeout=10, open=False
        )
        await pool.open()
        try:
            async with pool.connection() as conn:
                row = await (await conn.execute("select 1")).fetchone()
                return None if row is None else row[0]
        finally:
            await pool.close()

    return asyncio.run(run())


def _p2(threaded: bool) -> Callable[[Target, str | None], Any]:
    def request(t: Target, dbname: str | None) -> Any:
        from psycopg2 import pool as p2pool

        cls = p2pool.ThreadedConnectionPool if threaded else p2pool.SimpleConnectionPool
        pool = cls(0, 5, t.dsn(dbname))
        try:
            conn = pool.getconn()
            try:
                with conn.cursor() as cur:
                    cur.execute("select 1")
                    return cur.fetchone()[0]
            finally:
                pool.putconn(conn)
        finally:
            pool.closeall()

    return request


def _apg(t: Target, dbname: str | None) -> Any:
    import asyncpg

    async def run() -> Any:
        pool = await asyncpg.create_pool(
            host=t.host, port=t.port, user=t.user, database=dbname or t.dbname, min_size=0
        )
        try:
            async with pool.acquire() as conn:
                return await conn.fetchval("select 1")
        finally:
            await pool.close()

    return asyncio.run(run())


def _driver_errors(name: str) -> tuple[type[BaseException], ...]:
    """What the application sees from each library when the server refuses (unwrapped)."""
    if name.startswith("sqlalchemy"):
        import sqlalchemy as sa

        return (sa.exc.DBAPIError, *(_driver_errors("asyncpg") if "async" in name else ()))
    if name.startswith("psycopg_pool"):
        import psycopg

        return (psycopg.OperationalError,)
    if name.startswith("psycopg2"):
        import psycopg2

        return (psycopg2.OperationalError,)
    import asyncpg

    return (asyncpg.PostgresError,)


REQUESTS: list[Any] = []
for _name, _lib, _fn in (
    ("sqlalchemy-psycopg", "psycopg", _sa("psycopg")),
    ("sqlalchemy-psycopg2", "psycopg2", _sa("psycopg2")),
    ("sqlalchemy-asyncpg", "greenlet", _sa_async),
    ("psycopg_pool-null", "psycopg_pool", _pp_null),
    ("psycopg_pool-async-null", "psycopg_pool", _pp_async_null),
    ("psycopg2-simple", "psycopg2", _p2(False)),
    ("psycopg2-threaded", "psycopg2", _p2(True)),
    ("asyncpg", "asyncpg", _apg),
):
    if _available(_lib) and (not _name.startswith("sqlalchemy") or _available("sqlalchemy")):
        REQUESTS.append(pytest.param(_name, _fn, id=_name))


# -- servers ------------------------------------------------------------------------------------


def _target(srv: EmbeddedPostgres) -> Target:
    return Target(srv.host, srv.port, srv.user, srv.dbname)


@pytest.fixture(scope="module")
def small() -> Iterator[Target]:
    with EmbeddedPostgres(max_connections=MAX) as srv:
        yield _target(srv)


@pytest.fixture(scope="module")
def shutting_down() -> Iterator[Target]:
    """A server in smart shutdown: the open session keeps it there, refusing with 57P03."""
    import psycopg

    with EmbeddedPostgres(max_connections=MAX) as srv:
        session = psycopg.connect(srv.dsn())
        try:
            assert srv._proc is not None
            srv._proc.send_signal(signal.SIGTERM)  # the postmaster's smart shutdown
            deadline = time.monotonic() + 10
            while True:
                try:
                    psycopg.connect(srv.dsn()).close()
                except psycopg.OperationalError as exc:
                    if "shutting down" in str(exc):
                        break
                assert time.monotonic() < deadline, "server never started its smart shutdown"
                time.sleep(0.05)
            yield _target(srv)
        finally:
            session.close()


@contextlib.contextmanager
def full(t: Target) -> Iterator[list[Any]]:
    """Every slot of ``t`` taken by direct connections, closed on exit (those still open)."""
    import psycopg

    conns: list[Any] = []
    with pgleak.suppress():
        try:
            for _ in range(MAX):
                conns.append(psycopg.connect(t.dsn()))
            with pytest.raises(psycopg.OperationalError, match="too many clients"):
                psycopg.connect(t.dsn())
            yield conns
        finally:
            for conn in conns:
                conn.close()


# -- tests --------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "request_"), REQUESTS)
def test_refused_53300_is_retried_until_a_slot_frees(
    name: str, request_: Callable[[Target, str | None], Any], small: Target, retrying: EventCapture
) -> None:
    with full(small) as conns:
        done = threading.Event()

        def free_one() -> None:
            # Only once the request has been refused for real, plus a little: it must wait.
            while not retrying.of(CONNECT_RETRY) and not done.wait(0.01):
                pass
            time.sleep(0.3)
            conns.pop().close()

        freer = threading.Thread(target=free_one)
        freer.start()
        t0 = time.monotonic()
        try:
            assert request_(small, None) == 1
        finally:
            done.set()
            freer.join()
        elapsed = time.monotonic() - t0
    retries = retrying.of(CONNECT_RETRY)
    assert retries, f"{name}: no connect.retry"
    assert {e.as_dict()["sqlstate"] for e in retries} == {"53300"}
    assert all(isinstance(e.as_dict()["held"], int) for e in retries)
    assert not retrying.of(CONNECT_GAVE_UP)
    assert 0.3 <= elapsed < 5.0


@pytest.mark.parametrize(("name", "request_"), REQUESTS)
def test_never_freed_gives_up_at_the_deadline_with_the_driver_error(
    name: str, request_: Callable[[Target, str | None], Any], small: Target, retrying: EventCapture
) -> None:
    pgleak.install(retry_deadline=0.6, retry_max_attempts=100, retry_max_delay=0.2)
    with full(small):
        t0 = time.monotonic()
        with pytest.raises(_driver_errors(name)) as raised:
            request_(small, None)
        elapsed = time.monotonic() - t0
    assert classify(raised.value) == "53300"
    assert "too many clients" in str(raised.value)
    (gave_up,) = retrying.of(CONNECT_GAVE_UP)
    assert gave_up.as_dict()["reason"] == "deadline"
    assert gave_up.as_dict()["sqlstate"] == "53300"
    assert len(retrying.of(CONNECT_RETRY)) >= 2
    assert 0.6 <= elapsed < 3.0


@pytest.mark.parametrize(("name", "request_"), REQUESTS)
def test_unknown_database_fails_at_once_without_retry(
    name: str, request_: Callable[[Target, str | None], Any], small: Target, retrying: EventCapture
) -> None:
    t0 = time.monotonic()
    with pytest.raises(_driver_errors(name)) as raised:
        request_(small, "no_such_db")
    assert time.monotonic() - t0 < 2.0
    assert "no_such_db" in str(raised.value)
    assert classify(raised.value) is None
    assert not retrying.of(CONNECT_RETRY)
    assert not retrying.of(CONNECT_GAVE_UP)


@pytest.mark.parametrize(("name", "request_"), REQUESTS)
def test_server_shutting_down_57p03_is_retried(
    name: str,
    request_: Callable[[Target, str | None], Any],
    shutting_down: Target,
    retrying: EventCapture,
) -> None:
    pgleak.install(retry_deadline=0.3, retry_max_attempts=100, retry_max_delay=0.1)
    with pytest.raises(_driver_errors(name)) as raised:
        request_(shutting_down, None)
    assert classify(raised.value) == "57P03"
    retries = retrying.of(CONNECT_RETRY)
    assert retries
    assert {e.as_dict()["sqlstate"] for e in retries} == {"57P03"}
    assert retrying.of(CONNECT_GAVE_UP)[0].as_dict()["sqlstate"] == "57P03"


def test_sqlalchemy_engine_created_before_install_is_retried(small: Target) -> None:
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(small.url("psycopg"))
    pgleak.install(retry_deadline=5.0, retry_max_attempts=100, retry_max_delay=0.2)
    try:
        with capture_events() as events, full(small) as conns:
            threading.Timer(0.3, lambda: conns.pop().close()).start()
            with engine.connect() as conn:
                assert conn.exec_driver_sql("select 1").scalar() == 1
        assert events.of(CONNECT_RETRY)
    finally:
        engine.dispose()
        pgleak.uninstall()


def test_sqlalchemy_engine_do_connect_listeners_still_run_on_every_attempt(small: Target) -> None:
    sa = pytest.importorskip("sqlalchemy")
    engine = sa.create_engine(small.url("psycopg"))
    seen: list[str] = []

    def set_name(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
        seen.append(cparams.get("application_name", ""))
        cparams["application_name"] = "from-listener"

    sa.event.listen(engine, "do_connect", set_name)

    pgleak.install(retry_deadline=5.0, retry_max_attempts=100, retry_max_delay=0.2)
    try:
        with full(small) as conns:
            threading.Timer(0.3, lambda: conns.pop().close()).start()
            with engine.connect() as conn:
                name = conn.exec_driver_sql("show application_name").scalar()
        assert name == "from-listener"
        assert len(seen) >= 2  # once per attempt
        assert set(seen) == {""}  # each attempt starts from SQLAlchemy's own arguments
    finally:
        engine.dispose()
        pgleak.uninstall()


def test_asyncio_loop_keeps_running_while_sqlalchemy_async_retries(small: Target) -> None:
    pytest.importorskip("greenlet")
    pytest.importorskip("asyncpg")
    from sqlalchemy.ext.asyncio import create_async_engine

    pgleak.install(retry_deadline=5.0, retry_max_attempts=100, retry_max_delay=0.2)
    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.005)

    async def run() -> Any:
        engine = create_async_engine(small.url("asyncpg"))
        task = asyncio.create_task(ticker())
        try:
            async with engine.connect() as conn:
                return (await conn.exec_driver_sql("select 1")).scalar()
        finally:
            task.cancel()
            await engine.dispose()

    try:
        with capture_events() as events, full(small) as conns:
            threading.Timer(0.5, lambda: conns.pop().close()).start()
            assert asyncio.run(run()) == 1
        assert events.of(CONNECT_RETRY)
        assert ticks >= 30  # ~0.5 s of retries did not block the loop
    finally:
        pgleak.uninstall()


def test_retry_off_fails_at_once(small: Target) -> None:
    pytest.importorskip("psycopg2")
    pgleak.install(retry_connect=False)
    try:
        with capture_events() as events, full(small):
            t0 = time.monotonic()
            with pytest.raises(_driver_errors("psycopg2")):
                _p2(True)(small, None)
            assert time.monotonic() - t0 < 1.0
        assert not events.events
    finally:
        pgleak.uninstall()


def test_storm_rides_out_with_retry_and_fails_fast_with_the_budget_spent(small: Target) -> None:
    """Four times more clients than slots, holders releasing over time, default settings."""
    pytest.importorskip("psycopg2")
    from pgleak import _retry

    pgleak.install()
    try:
        for spent in (False, True):
            if spent:
                for _ in range(int(pgleak.settings().retry_budget)):
                    _retry.BUDGET.failed(pgleak.settings().retry_budget)
            failures: list[float] = []
            done: list[float] = []
            with full(small) as conns:

                def release(conns: list[Any] = conns) -> None:
                    while conns:
                        time.sleep(0.2)
                        conns.pop().close()

                def client(failures: list[float] = failures, done: list[float] = done) -> None:
                    t0 = time.monotonic()
                    try:
                        _p2(True)(small, None)
                    except Exception:
                        failures.append(time.monotonic() - t0)
                    else:
                        done.append(time.monotonic() - t0)

                threads = [threading.Thread(target=client) for _ in range(4 * MAX)]
                releaser = threading.Thread(target=release)
                for thread in [*threads, releaser]:
                    thread.start()
                for thread in [*threads, releaser]:
                    thread.join()
            if spent:
                assert len(failures) >= 4 * MAX - MAX  # at most the first freed slots won
                assert max(failures) < 0.5  # one attempt each: fast
            else:
                assert failures == []
                assert max(done) < pgleak.settings().retry_deadline
    finally:
        pgleak.uninstall()
