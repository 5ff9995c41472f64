"""An error from the library reaches the user with as few of pgleak's frames in its traceback
as the hooks allow: one per hooked call, and none of the retry machinery's unless the error
was one it retries (issue 15)."""

from __future__ import annotations

import re
import traceback
from collections.abc import Callable
from typing import Any

import pytest

import pgleak
from pgleak import _adapter
from tests.conftest import Server


def _pgleak_frames(call: Callable[[], Any], error: type[BaseException]) -> list[str]:
    with pytest.raises(error) as caught:
        call()
    # A compiled wrapper's file is "<acquire #7>" (pgleak._forward): the number is dropped.
    return [
        f"{re.sub(r' #[0-9]+>$', '>', frame.filename.rsplit('/pgleak/', 1)[1])} {frame.name}"
        for frame in traceback.extract_tb(caught.value.__traceback__)
        if "/src/pgleak/" in frame.filename or "/site-packages/pgleak/" in frame.filename
    ]


def _acquire(name: str) -> list[str]:
    """The checkout wrapper's frame: the Python template's, or none for the C wrapper."""
    return [] if _adapter._c_wrappers() is not None else [f"<acquire> {name}"]


def test_psycopg2_pool_exhausted(pg: Server, installed: pgleak.Settings) -> None:
    from psycopg2.pool import PoolError, ThreadedConnectionPool

    pool = ThreadedConnectionPool(1, 1, pg.dsn)
    held = pool.getconn()
    try:
        frames = _pgleak_frames(pool.getconn, PoolError)
    finally:
        pool.putconn(held)
        pool.closeall()
    # getconn (retry, outside the pool's lock), then _getconn's keyed re-lend layer and the
    # checkout: the C wrappers (pgleak._speedups.Tracked) run no Python frame for an error the
    # retry does not retry, nor for a call without a key.
    if _adapter._c_wrappers() is not None:
        assert frames == []
    else:
        assert frames == ["<retrying> getconn", "<relend> _getconn", "<acquire> _getconn"]


def test_psycopg2_connect_refused(installed: pgleak.Settings) -> None:
    import psycopg2

    refused = "host=127.0.0.1 port=1 connect_timeout=2"  # nothing listens on port 1
    frames = _pgleak_frames(lambda: psycopg2.connect(refused), psycopg2.OperationalError)
    assert frames == ["integrations/_direct.py connect"]


def test_psycopg_pool_timeout(pg: Server, installed: pgleak.Settings) -> None:
    from psycopg_pool import ConnectionPool, PoolTimeout

    with ConnectionPool(pg.dsn, min_size=1, max_size=1, timeout=0.1) as pool:
        held = pool.getconn()
        try:
            frames = _pgleak_frames(pool.getconn, PoolTimeout)
        finally:
            pool.putconn(held)
    assert frames == _acquire("getconn")


def test_sqlalchemy_pool_timeout(pg: Server, installed: pgleak.Settings) -> None:
    import sqlalchemy

    engine = sqlalchemy.create_engine(pg.url(), pool_size=1, max_overflow=0, pool_timeout=0.1)
    held = engine.connect()
    try:
        frames = _pgleak_frames(engine.connect, sqlalchemy.exc.TimeoutError)
    finally:
        held.close()
        engine.dispose()
    # _ConnectionFairy._checkout's wrapper: none for the C one.
    in_c = _adapter._c_wrappers() is not None
    assert frames == ([] if in_c else ["integrations/sqlalchemy.py _checkout"])


def test_psycopg_pool_async_timeout(pg: Server, installed: pgleak.Settings) -> None:
    """asyncio: the C awaitable (pgleak._speedups) leaves no frame of pgleak's in the
    traceback; without it, the ``async def`` template's one."""
    import asyncio

    from psycopg_pool import AsyncConnectionPool, PoolTimeout

    from pgleak._adapter import c_awaitables

    async def main() -> list[str]:
        pool = AsyncConnectionPool(pg.dsn, min_size=1, max_size=1, timeout=0.1, open=False)
        await pool.open(wait=True)
        held = await pool.getconn()
        try:
            with pytest.raises(PoolTimeout) as caught:
                await pool.getconn()
        finally:
            await pool.putconn(held)
            await pool.close()
        return [
            f"{re.sub(r' #[0-9]+>$', '>', frame.filename.rsplit('/pgleak/', 1)[1])} {frame.name}"
            for frame in traceback.extract_tb(caught.value.__traceback__)
            if "/src/pgleak/" in frame.filename or "/site-packages/pgleak/" in frame.filename
        ]

    frames = asyncio.run(main())
    assert frames == ([] if c_awaitables() is not None else ["<acquire> getconn"])
