"""A held connection whose transaction failed says so: it holds its locks until rolled back."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

import pgleak
from pgleak.testing import EventCapture
from tests.conftest import Server


def _psycopg_pool(pg: Server) -> tuple[Any, Any, Callable[[], None]]:
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool(pg.dsn, min_size=1, max_size=1, open=True)
    conn = pool.getconn()

    def close() -> None:
        pool.putconn(conn)
        pool.close()

    return conn, conn.execute, close


def _psycopg2(pg: Server) -> tuple[Any, Any, Callable[[], None]]:
    from psycopg2.pool import ThreadedConnectionPool

    pool = ThreadedConnectionPool(1, 1, pg.dsn)
    conn = pool.getconn()

    def close() -> None:
        pool.putconn(conn)
        pool.closeall()

    return conn, conn.cursor().execute, close


def _sqlalchemy(pg: Server) -> tuple[Any, Any, Callable[[], None]]:
    import sqlalchemy as sa

    engine = sa.create_engine(pg.url("psycopg"), pool_size=1)
    conn = engine.connect()

    def close() -> None:
        conn.close()
        engine.dispose()

    return conn, conn.exec_driver_sql, close


@pytest.mark.parametrize(
    "opener", [_psycopg_pool, _psycopg2, _sqlalchemy], ids=lambda f: f.__name__
)
def test_a_failed_transaction_is_reported_as_such(
    opener: Callable[[Server], tuple[Any, Any, Callable[[], None]]],
    pg: Server,
    installed: pgleak.Settings,
    events: EventCapture,
) -> None:
    _, execute, close = opener(pg)
    try:
        with pytest.raises(Exception, match="division by zero"):
            execute("select 1/0")
        [event] = events.wait_for("leak.suspected")
    finally:
        close()
    assert event.checkout is not None
    assert event.checkout.state == "in a failed transaction"
    assert event.as_dict()["state"] == "in a failed transaction"
