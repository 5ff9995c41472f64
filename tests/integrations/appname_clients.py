"""One "who am I?" per adapter: open that library's pool, check a connection out, and read the
``pg_stat_activity.application_name`` the server shows for it.

Shared by the direct and the PgBouncer tests. Each client takes an :class:`Endpoint` and an
optional application name of the user's own (put where that library's users put it: the DSN
for libpq drivers, ``server_settings`` for asyncpg).
"""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Callable
from typing import Any

from tests.integrations.kits import _available

WHO = "select application_name from pg_stat_activity where pid = pg_backend_pid()"


@dataclasses.dataclass(frozen=True)
class Endpoint:
    """A PostgreSQL server, or a PgBouncer in front of one."""

    host: str
    port: int
    user: str
    dbname: str
    #: Behind PgBouncer in transaction mode: no server-side prepared statements.
    bouncer: bool = False

    def dsn(self, app: str | None = None) -> str:
        extra = ""
        if app is not None:
            quoted = app.replace("\\", "\\\\").replace("'", "\\'")
            extra = f" application_name='{quoted}'"
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}{extra}"

    def url(self, driver: str, app: str | None = None) -> str:
        from urllib.parse import quote

        query = f"?application_name={quote(app)}" if app is not None else ""
        return f"postgresql+{driver}://{self.user}@{self.host}:{self.port}/{self.dbname}{query}"


Client = Callable[[Endpoint, "str | None"], str]


def _run(coro: Any) -> Any:
    return asyncio.run(coro)


def _sa(driver: str) -> Client:
    def who(ep: Endpoint, app: str | None) -> str:
        import sqlalchemy as sa

        engine = sa.create_engine(ep.url(driver, app), poolclass=sa.pool.QueuePool)
        try:
            with engine.connect() as conn:  # CHECKOUT
                return str(conn.exec_driver_sql(WHO).scalar())
        finally:
            engine.dispose()

    return who


def _sa_async(driver: str) -> Client:
    def who(ep: Endpoint, app: str | None) -> str:
        from sqlalchemy.ext.asyncio import create_async_engine

        async def main() -> str:
            url = ep.url(driver)
            connect_args: dict[str, Any] = {}
            if driver == "asyncpg":
                if app is not None:
                    connect_args["server_settings"] = {"application_name": app}
                if ep.bouncer:
                    connect_args["statement_cache_size"] = 0
                    connect_args["prepared_statement_cache_size"] = 0
            else:
                url = ep.url(driver, app)
            engine = create_async_engine(url, connect_args=connect_args)
            try:
                async with engine.connect() as conn:  # CHECKOUT
                    return str((await conn.exec_driver_sql(WHO)).scalar())
            finally:
                await engine.dispose()

        return str(_run(main()))

    return who


def _psycopg_pool(null: bool) -> Client:
    def who(ep: Endpoint, app: str | None) -> str:
        from psycopg_pool import ConnectionPool, NullConnectionPool

        cls = NullConnectionPool if null else ConnectionPool
        pool = cls(ep.dsn(app), min_size=0 if null else 1, max_size=2, open=True)
        with pool, pool.connection() as conn:  # CHECKOUT
            row = conn.execute(WHO).fetchone()
        assert row is not None
        return str(row[0])

    return who


def _psycopg_pool_async(null: bool) -> Client:
    def who(ep: Endpoint, app: str | None) -> str:
        from psycopg_pool import AsyncConnectionPool, AsyncNullConnectionPool

        async def main() -> str:
            cls = AsyncNullConnectionPool if null else AsyncConnectionPool
            pool = cls(ep.dsn(app), min_size=0 if null else 1, max_size=2, open=False)
            async with pool, pool.connection() as conn:  # CHECKOUT
                row = await (await conn.execute(WHO)).fetchone()
            assert row is not None
            return str(row[0])

        return str(_run(main()))

    return who


def _psycopg2(threaded: bool) -> Client:
    def who(ep: Endpoint, app: str | None) -> str:
        from psycopg2 import pool as p2

        cls = p2.ThreadedConnectionPool if threaded else p2.SimpleConnectionPool
        pool = cls(1, 2, ep.dsn(app))
        try:
            conn = pool.getconn()  # CHECKOUT
            try:
                with conn.cursor() as cur:
                    cur.execute(WHO)
                    row = cur.fetchone()
            finally:
                pool.putconn(conn)
        finally:
            pool.closeall()
        assert row is not None
        return str(row[0])

    return who


def _asyncpg(ep: Endpoint, app: str | None) -> str:
    import asyncpg

    async def main() -> str:
        kwargs: dict[str, Any] = {}
        if app is not None:
            kwargs["server_settings"] = {"application_name": app}
        if ep.bouncer:
            kwargs["statement_cache_size"] = 0
        pool = await asyncpg.create_pool(
            host=ep.host,
            port=ep.port,
            user=ep.user,
            database=ep.dbname,
            min_size=1,
            max_size=2,
            **kwargs,
        )
        try:
            async with pool.acquire() as conn:  # CHECKOUT
                return str(await conn.fetchval(WHO))
        finally:
            await pool.close()

    return str(_run(main()))


def clients() -> dict[str, Client]:
    found: dict[str, Client] = {}
    if _available("sqlalchemy"):
        if _available("psycopg"):
            found["sqlalchemy+psycopg"] = _sa("psycopg")
        if _available("psycopg2"):
            found["sqlalchemy+psycopg2"] = _sa("psycopg2")
        if _available("greenlet") and _available("asyncpg"):
            found["sqlalchemy-async+asyncpg"] = _sa_async("asyncpg")
        if _available("greenlet") and _available("psycopg"):
            found["sqlalchemy-async+psycopg"] = _sa_async("psycopg")
    if _available("psycopg_pool"):
        for null in (False, True):
            suffix = "-null" if null else ""
            found[f"psycopg_pool{suffix}"] = _psycopg_pool(null)
            found[f"psycopg_pool-async{suffix}"] = _psycopg_pool_async(null)
    if _available("psycopg2"):
        found["psycopg2-simple"] = _psycopg2(False)
        found["psycopg2-threaded"] = _psycopg2(True)
    if _available("asyncpg"):
        found["asyncpg"] = _asyncpg
    return found


CLIENTS = clients()


def checkout_sites() -> set[str]:
    """``appname_clients.py:N`` of every client's checkout line (marked ``# CHECKOUT``)."""
    with open(__file__, encoding="utf-8") as source:
        return {
            f"appname_clients.py:{number}"
            for number, line in enumerate(source, 1)
            if line.rstrip().endswith("# CHECKOUT")
        }
