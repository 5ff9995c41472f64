"""One small "kit" per pool API, so that shared behaviour is tested once for every pool.

A kit opens a pool on the test server and checks connections out and in the way that library's
users do. ``take`` is a one-line lambda: a report about a connection it took names that line
(``Kit.take_site``), with the test's own line just before it.

Kits are built lazily and only for libraries that are installed; CI installs all of them.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import importlib.util
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from typing import Any

from tests.conftest import Server


@dataclasses.dataclass(frozen=True)
class Kit:
    """How one pool API is driven in the shared tests.

    Attributes:
        name: Test id.
        library: Module that must be importable.
        open: ``(server, size, timeout) -> pool``; ``timeout`` is the checkout wait, if any.
        take: ``pool -> connection`` (sync kits) or an awaitable of it (async kits).
        give: Returns a connection taken with ``take``.
        use: ``pool -> context manager`` (``async with`` for async kits) yielding a connection.
        query: Runs ``SELECT 1`` on a connection (awaitable for async kits).
        close: Closes the pool (awaitable for async kits).
        pid: The server process id behind a connection (awaitable for async kits).
        exhausted: What the pool raises when no connection comes within the timeout.
        collectable: The pool keeps no reference to a lent connection, so a dropped one is
            garbage-collected (``leak.collected``); else it stays out until close or exit.
        is_async: The kit's callables are coroutine functions.
        states: The transaction state reported for a connection just taken, and after
            ``query`` (the libpq drivers begin a transaction with the first statement; asyncpg
            does not, and its words are plainer: it keeps no "busy" or "failed" state).
    """

    name: str
    library: str
    open: Callable[[Server, int, float], Any]
    take: Callable[[Any], Any]
    give: Callable[[Any, Any], Any]
    use: Callable[[Any], Any]
    query: Callable[[Any], Any]
    close: Callable[[Any], Any]
    pid: Callable[[Any], Any]
    exhausted: tuple[type[BaseException], ...]
    collectable: bool
    is_async: bool = False
    states: tuple[str, str] = ("idle", "idle in transaction")

    @property
    def take_site(self) -> str:
        """``"file:line"`` of the ``take`` lambda: the checkout line in reports."""
        code = self.take.__code__
        return f"{code.co_filename}:{code.co_firstlineno}"

    def __str__(self) -> str:
        return self.name


#: Kills every other client backend of the test database: the server-side failure
#: ("terminating connection due to administrator command") the shared tests inflict mid-load.
TERMINATE_OTHERS = (
    "select pg_terminate_backend(pid) from pg_stat_activity "
    "where backend_type = 'client backend' and pid <> pg_backend_pid() "
    "and datname = current_database()"
)


def _available(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# -- SQLAlchemy -----------------------------------------------------------------------------


def _sa_open(driver: str) -> Callable[[Server, int, float], Any]:
    def open_engine(pg: Server, size: int, timeout: float) -> Any:
        import sqlalchemy as sa

        return sa.create_engine(
            pg.url(driver), pool_size=size, max_overflow=0, pool_timeout=timeout
        )

    return open_engine


def _sa_async_open(driver: str) -> Callable[[Server, int, float], Any]:
    def open_engine(pg: Server, size: int, timeout: float) -> Any:
        from sqlalchemy.ext.asyncio import create_async_engine

        return create_async_engine(
            pg.url(driver), pool_size=size, max_overflow=0, pool_timeout=timeout
        )

    return open_engine


def _sa_pid(conn: Any) -> int:
    return int(conn.exec_driver_sql("select pg_backend_pid()").scalar())


async def _sa_async_pid(conn: Any) -> int:
    return int((await conn.exec_driver_sql("select pg_backend_pid()")).scalar())


def _sa_exhausted() -> tuple[type[BaseException], ...]:
    import sqlalchemy as sa

    return (sa.exc.TimeoutError,)


async def _sa_async_query(conn: Any) -> Any:
    return await conn.exec_driver_sql("select 1")


async def _dispose(engine: Any) -> None:
    await engine.dispose()


async def _close_async(conn: Any) -> None:
    await conn.close()


def sqlalchemy_kits() -> list[Kit]:
    if not _available("sqlalchemy"):
        return []
    kits = [
        Kit(
            name="sqlalchemy",
            library="sqlalchemy",
            open=_sa_open("psycopg"),
            take=lambda engine: engine.connect(),
            give=lambda engine, conn: conn.close(),
            use=lambda engine: engine.connect(),
            query=lambda conn: conn.exec_driver_sql("select 1"),
            close=lambda engine: engine.dispose(),
            pid=_sa_pid,
            exhausted=_sa_exhausted(),
            collectable=True,
        )
    ]
    if _available("greenlet") and _available("asyncpg"):
        kits.append(
            Kit(
                name="sqlalchemy-async",
                library="sqlalchemy",
                open=_sa_async_open("asyncpg"),
                take=lambda engine: engine.connect(),
                give=lambda engine, conn: _close_async(conn),
                use=lambda engine: engine.connect(),
                query=_sa_async_query,
                close=_dispose,
                pid=_sa_async_pid,
                exhausted=_sa_exhausted(),
                collectable=True,
                is_async=True,
                states=("not in a transaction", "in a transaction"),
            )
        )
    return kits


# -- psycopg 3 pools ------------------------------------------------------------------------


def _pp_open(null: bool) -> Callable[[Server, int, float], Any]:
    def open_pool(pg: Server, size: int, timeout: float) -> Any:
        from psycopg_pool import ConnectionPool, NullConnectionPool

        cls = NullConnectionPool if null else ConnectionPool
        return cls(pg.dsn, min_size=0 if null else 1, max_size=size, timeout=timeout, open=True)

    return open_pool


def _pp_async_open(null: bool) -> Callable[[Server, int, float], Awaitable[Any]]:
    async def open_pool(pg: Server, size: int, timeout: float) -> Any:
        from psycopg_pool import AsyncConnectionPool, AsyncNullConnectionPool

        cls = AsyncNullConnectionPool if null else AsyncConnectionPool
        pool = cls(pg.dsn, min_size=0 if null else 1, max_size=size, timeout=timeout, open=False)
        await pool.open()
        return pool

    return open_pool


def _pp_pid(conn: Any) -> int:
    return int(conn.info.backend_pid)


async def _pp_async_pid(conn: Any) -> int:
    return int(conn.info.backend_pid)


async def _pp_async_query(conn: Any) -> Any:
    return await conn.execute("select 1")


async def _pp_async_close(pool: Any) -> None:
    await pool.close()


def psycopg_pool_kits() -> list[Kit]:
    if not _available("psycopg_pool"):
        return []
    from psycopg_pool import PoolTimeout

    kits: list[Kit] = []
    for null in (False, True):
        suffix = "-null" if null else ""
        kits.append(
            Kit(
                name=f"psycopg_pool{suffix}",
                library="psycopg_pool",
                open=_pp_open(null),
                take=lambda pool: pool.getconn(),
                give=lambda pool, conn: pool.putconn(conn),
                use=lambda pool: pool.connection(),
                query=lambda conn: conn.execute("select 1"),
                close=lambda pool: pool.close(),
                pid=_pp_pid,
                exhausted=(PoolTimeout,),
                collectable=True,
            )
        )
        kits.append(
            Kit(
                name=f"psycopg_pool-async{suffix}",
                library="psycopg_pool",
                open=_pp_async_open(null),
                take=lambda pool: pool.getconn(),
                give=lambda pool, conn: pool.putconn(conn),
                use=lambda pool: pool.connection(),
                query=_pp_async_query,
                close=_pp_async_close,
                pid=_pp_async_pid,
                exhausted=(PoolTimeout,),
                collectable=True,
                is_async=True,
            )
        )
    return kits


# -- psycopg2 pools -------------------------------------------------------------------------


def _p2_open(threaded: bool) -> Callable[[Server, int, float], Any]:
    def open_pool(pg: Server, size: int, timeout: float) -> Any:
        import threading

        from psycopg2 import pool

        cls = pool.ThreadedConnectionPool if threaded else pool.SimpleConnectionPool
        opened = cls(0, size, pg.dsn)
        # psycopg2's getconn() never waits: it raises PoolError at once when all ``size``
        # connections are out. Applications that share a pool between more threads than it has
        # connections bound them with a semaphore, and so does ``use``: the shared tests that
        # run more threads than connections test pgleak, not psycopg2's refusal.
        opened.kit_slots = threading.BoundedSemaphore(size)
        opened.kit_timeout = timeout
        return opened

    return open_pool


@contextlib.contextmanager
def _p2_use(pool: Any) -> Iterator[Any]:
    slot = pool.kit_slots.acquire(timeout=pool.kit_timeout)  # the wait psycopg2 does not have
    try:
        conn = pool.getconn()  # without a slot, the pool's own PoolError says "exhausted"
        try:
            yield conn
        finally:
            pool.putconn(conn)
    finally:
        if slot:
            pool.kit_slots.release()


def _p2_query(conn: Any) -> Any:
    with conn.cursor() as cur:
        cur.execute("select 1")
        return cur.fetchone()


def psycopg2_kits() -> list[Kit]:
    if not _available("psycopg2"):
        return []
    from psycopg2.pool import PoolError

    return [
        Kit(
            name=f"psycopg2-{'threaded' if threaded else 'simple'}",
            library="psycopg2",
            open=_p2_open(threaded),
            take=lambda pool: pool.getconn(),
            give=lambda pool, conn: pool.putconn(conn),
            use=_p2_use,
            query=_p2_query,
            close=lambda pool: pool.closeall(),
            pid=lambda conn: int(conn.get_backend_pid()),
            exhausted=(PoolError,),
            collectable=False,
        )
        for threaded in (False, True)
    ]


# -- asyncpg --------------------------------------------------------------------------------


async def _apg_open(pg: Server, size: int, timeout: float) -> Any:
    import asyncpg

    return await asyncpg.create_pool(
        host=pg.host, port=pg.port, user=pg.user, database=pg.dbname, min_size=0, max_size=size
    )


@contextlib.asynccontextmanager
async def _apg_use(pool: Any) -> AsyncIterator[Any]:
    async with pool.acquire(timeout=_APG_TIMEOUT) as conn:
        yield conn


_APG_TIMEOUT = 0.5


async def _apg_query(conn: Any) -> Any:
    return await conn.fetchval("select 1")


async def _apg_close(pool: Any) -> None:
    pool.terminate()  # close() would wait forever for the leaked connections under test


async def _apg_pid(conn: Any) -> int:
    return int(conn.get_server_pid())


def asyncpg_kits() -> list[Kit]:
    if not _available("asyncpg"):
        return []
    return [
        Kit(
            name="asyncpg",
            library="asyncpg",
            open=_apg_open,
            take=lambda pool: pool.acquire(timeout=_APG_TIMEOUT),
            give=lambda pool, conn: pool.release(conn),
            use=_apg_use,
            query=_apg_query,
            close=_apg_close,
            pid=_apg_pid,
            exhausted=(asyncio.TimeoutError,),
            collectable=False,
            is_async=True,
            states=("not in a transaction", "not in a transaction"),
        )
    ]


def all_kits() -> list[Kit]:
    return sqlalchemy_kits() + psycopg_pool_kits() + psycopg2_kits() + asyncpg_kits()


SYNC_KITS = [kit for kit in all_kits() if not kit.is_async]
ASYNC_KITS = [kit for kit in all_kits() if kit.is_async]
