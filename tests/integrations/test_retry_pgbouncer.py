"""Connection retry through a real PgBouncer, for every adapter.

PgBouncer refuses a client beyond ``max_client_conn`` with its own error, SQLSTATE 08P01
``no more connections allowed (max_client_conn)``, before PostgreSQL is involved. The session
bouncer (``max_client_conn=3``, transaction pooling, in front of the session server) is filled
with direct client connections opened under ``pgleak.suppress()``; a request through each
library's pool must then be refused for real, retried (``connect.retry`` with sqlstate 08P01),
and succeed once a thread woken by the first retry event closes one of them - or give up at the
deadline with the driver's own error.

What each driver gives for that refusal (checked by ``test_driver_error_is_classified``):

* psycopg 3: ``psycopg.OperationalError``, ``sqlstate`` ``None``, message ``connection failed:
  connection to server at "127.0.0.1", port N failed: FATAL:  no more connections allowed
  (max_client_conn)``;
* psycopg2: ``psycopg2.OperationalError``, ``pgcode`` ``None``, the same libpq text (without
  psycopg's ``connection failed:`` prefix, with a trailing newline);
* asyncpg: ``asyncpg.exceptions.ProtocolViolationError`` (a ``PostgresConnectionError``),
  ``sqlstate`` ``"08P01"``, message ``no more connections allowed (max_client_conn)``.

So the libpq drivers are classified by the message alone, asyncpg by SQLSTATE plus message.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

import pgleak
from pgleak._events import CONNECT_GAVE_UP, CONNECT_RETRY, LeakEvent
from pgleak._retry import classify
from pgleak.testing import EventCapture
from tests.bouncer import PgBouncer
from tests.integrations.kits import _available
from tests.integrations.test_retry_real import (
    Target,
    _driver_errors,
    _p2,
    _pp_async_null,
    _pp_null,
    _sa,
)

LIMIT_TEXT = "no more connections allowed (max_client_conn)"
LIMIT_STATE = "08P01"


# -- requests through the bouncer: asyncpg needs its statement cache off in transaction mode ----

#: asyncpg's named prepared statements do not survive PgBouncer's transaction pooling: no
#: statement cache, and SQLAlchemy's own prepared statements under names no other client uses.
_APG_BOUNCER_ARGS: dict[str, Any] = {"statement_cache_size": 0}


def _sa_async(t: Target, dbname: str | None) -> Any:
    from sqlalchemy.ext.asyncio import create_async_engine

    async def run() -> Any:
        engine = create_async_engine(
            t.url("asyncpg", dbname),
            connect_args={
                **_APG_BOUNCER_ARGS,
                "prepared_statement_cache_size": 0,
                "prepared_statement_name_func": lambda: f"__asyncpg_{uuid.uuid4()}__",
            },
        )
        try:
            async with engine.connect() as conn:
                return (await conn.exec_driver_sql("select 1")).scalar()
        finally:
            await engine.dispose()

    return asyncio.run(run())


def _apg(t: Target, dbname: str | None) -> Any:
    import asyncpg

    async def run() -> Any:
        pool = await asyncpg.create_pool(
            host=t.host,
            port=t.port,
            user=t.user,
            database=dbname or t.dbname,
            min_size=0,
            **_APG_BOUNCER_ARGS,
        )
        try:
            async with pool.acquire() as conn:
                return await conn.fetchval("select 1")
        finally:
            await pool.close()

    return asyncio.run(run())


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


# -- fixtures and helpers -------------------------------------------------------------------------


@pytest.fixture
def target(bouncer: PgBouncer) -> Target:
    return Target(bouncer.host, bouncer.port, bouncer.user, bouncer.dbname)


@contextlib.contextmanager
def full(bouncer: PgBouncer) -> Iterator[list[Any]]:
    """Every client slot of the bouncer taken by direct connections, closed on exit."""
    import psycopg

    conns: list[Any] = []
    with pgleak.suppress():
        try:
            for _ in range(bouncer.max_client_conn):
                conns.append(psycopg.connect(bouncer.dsn()))
            with pytest.raises(psycopg.OperationalError, match=r"\(max_client_conn\)"):
                psycopg.connect(bouncer.dsn())
            yield conns
        finally:
            for conn in conns:
                conn.close()


@contextlib.contextmanager
def free_one_on_first_retry(events: EventCapture, conns: list[Any]) -> Iterator[list[LeakEvent]]:
    """A thread that closes one of ``conns`` as soon as the first ``connect.retry`` arrives.

    Yields the events seen when it did (empty if it never did); the block's end stops it.
    """
    done = threading.Event()
    seen: list[LeakEvent] = []

    def free_one() -> None:
        try:
            events.wait_until(
                lambda evs: done.is_set() or any(e.event == CONNECT_RETRY for e in evs)
            )
        except AssertionError:
            return  # no retry within the wait: the test's own assertions say what went wrong
        if not done.is_set():
            seen.extend(events.events)
            conns.pop().close()

    freer = threading.Thread(target=free_one, name="free-one-slot")
    freer.start()
    try:
        yield seen
    finally:
        done.set()
        freer.join(timeout=15)
        assert not freer.is_alive()


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's exception: SQLAlchemy's ``.orig`` when it wrapped one, else ``exc``."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


# -- tests ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(("name", "request_"), REQUESTS)
def test_max_client_conn_08p01_is_retried_until_a_client_leaves(
    name: str,
    request_: Callable[[Target, str | None], Any],
    bouncer: PgBouncer,
    target: Target,
    retrying: EventCapture,
) -> None:
    with full(bouncer) as conns, free_one_on_first_retry(retrying, conns) as seen:
        assert request_(target, None) == 1
    assert seen, f"{name}: succeeded without being refused first"
    assert len(conns) == bouncer.max_client_conn - 1  # the freer's close made the room
    retries = retrying.of(CONNECT_RETRY)
    assert {e.as_dict()["sqlstate"] for e in retries} == {LIMIT_STATE}
    assert all(LIMIT_TEXT in (e.detail or "") for e in retries)
    assert all(isinstance(e.as_dict()["held"], int) for e in retries)
    assert not retrying.of(CONNECT_GAVE_UP)


@pytest.mark.parametrize(("name", "request_"), REQUESTS)
def test_never_freed_gives_up_with_the_driver_error_unchanged(
    name: str,
    request_: Callable[[Target, str | None], Any],
    bouncer: PgBouncer,
    target: Target,
    retrying: EventCapture,
) -> None:
    pgleak.install(retry_deadline=0.6, retry_max_attempts=100, retry_max_delay=0.2)
    with full(bouncer):
        t0 = time.monotonic()
        with pytest.raises(_driver_errors(name)) as raised:
            request_(target, None)
        elapsed = time.monotonic() - t0
    assert classify(raised.value) == LIMIT_STATE
    assert LIMIT_TEXT in str(raised.value)
    (gave_up,) = retrying.of(CONNECT_GAVE_UP)
    assert gave_up.as_dict()["reason"] == "deadline"
    assert gave_up.as_dict()["sqlstate"] == LIMIT_STATE
    # The error pgleak gave up on is the one the caller got: same class, same first line.
    driver = _driver_error(raised.value)
    assert gave_up.detail == f"{type(driver).__name__}: {str(driver).strip().splitlines()[0]}"
    assert len(retrying.of(CONNECT_RETRY)) >= 2
    assert 0.6 <= elapsed < 3.0


def _psycopg(b: PgBouncer) -> None:
    import psycopg

    psycopg.connect(b.dsn()).close()


def _psycopg2(b: PgBouncer) -> None:
    import psycopg2

    psycopg2.connect(b.dsn()).close()


def _asyncpg(b: PgBouncer) -> None:
    import asyncpg

    async def run() -> None:
        conn = await asyncpg.connect(
            host=b.host, port=b.port, user=b.user, database=b.dbname, **_APG_BOUNCER_ARGS
        )
        await conn.close()

    asyncio.run(run())


def _error_class(name: str) -> type[BaseException]:
    if name == "psycopg":
        import psycopg

        return psycopg.OperationalError
    if name == "psycopg2":
        import psycopg2

        return psycopg2.OperationalError  # type: ignore[no-any-return]
    import asyncpg

    return asyncpg.exceptions.ProtocolViolationError  # type: ignore[no-any-return]


@pytest.mark.parametrize(
    ("driver", "connect", "sqlstate"),
    [
        pytest.param(name, fn, state, id=name)
        for name, fn, state in (
            ("psycopg", _psycopg, None),  # libpq gives no SQLSTATE for a failed connect
            ("psycopg2", _psycopg2, None),
            ("asyncpg", _asyncpg, LIMIT_STATE),
        )
        if _available(name)
    ],
)
def test_driver_error_is_classified(
    driver: str, connect: Callable[[PgBouncer], None], sqlstate: str | None, bouncer: PgBouncer
) -> None:
    """What each driver raises for PgBouncer's limit, without pgleak: ``classify`` knows it."""
    with full(bouncer), pytest.raises(_error_class(driver)) as raised:
        connect(bouncer)
    exc = raised.value
    assert type(exc) is _error_class(driver)
    assert (getattr(exc, "sqlstate", None) or getattr(exc, "pgcode", None)) == sqlstate
    assert LIMIT_TEXT in str(exc)
    assert classify(exc) == LIMIT_STATE


def test_bouncer_serves_queries_and_frees_client_slots(bouncer: PgBouncer) -> None:
    """The harness itself: a client gets through to PostgreSQL, a closed client's slot is free."""
    for _ in range(2):  # a second fill works: the first one's clients were all released
        with full(bouncer) as conns:
            row = conns[0].execute("select current_setting('port')").fetchone()
            assert row is not None
            assert int(row[0]) == bouncer.server_port
