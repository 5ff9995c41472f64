"""psycopg 3 pools: ``ConnectionPool``, ``AsyncConnectionPool`` and their ``Null*`` variants.

Hooks, and why each:

* ``getconn`` (sync and async): the checkout. ``connection()`` is ``getconn`` + ``putconn``
  around a ``with`` block, so it is covered too, and the Null pools inherit both methods. A
  ``PoolTimeout`` here is the moment to list every holder.
* ``putconn``: the checkin. A ``ValueError`` (a connection from another pool) is no checkin.
* ``close``: whatever is still out when the pool closes is reported.
* ``connection()``: the user-facing ``with`` block; with OpenTelemetry on, the checkout's span
  is current inside it (so the psycopg instrumentation's query spans nest under it), attached
  after ``getconn`` returns and detached before ``putconn`` runs, in the caller's context.
* ``_connect`` (sync and async): where the pool opens a server connection, from its workers or
  (Null pools) the caller. The ``kwargs`` the pool keeps get the ``application_name`` tag
  there, once (:meth:`pgleak._appname.Tags.tag_pool_kwargs`), so pools created before
  ``install()`` are tagged too; a ``kwargs`` callable (3.3) is wrapped instead. It is also
  where the time to open a connection is measured (``db.client.connection.create_time``), and
  where the driver's ``connect()`` is marked as the pool's, not a direct connection.
* Pool state for the metrics comes from ``get_stats()`` (available) and the pool's
  ``min_size``/``max_size``, connections in use from the ledger; a Null pool keeps no idle
  connections.

Retrying a connection refused because the server is full (:mod:`pgleak._retry`):

* ``NullConnectionPool`` / ``AsyncNullConnectionPool`` connect in the caller's thread or task,
  inside ``_getconn_unchecked`` (under the pool's lock). That method is wrapped on the Null
  classes only, so the retry and its sleeps run *outside* the lock (a ``putconn`` that closes a
  connection, freeing a server slot, must not wait behind them) and never after the caller's
  own ``timeout``: a refused connect raises before the pool has counted anything, so calling
  the method again is the same as the first call.
* ``ConnectionPool`` / ``AsyncConnectionPool`` connect in background workers and already retry
  with their own exponential backoff (``reconnect_timeout``); the caller only waits for a
  connection and sees ``PoolTimeout``. pgleak adds no second retry loop there.

The pool keeps no reference to a lent connection (only a count), so a connection the
application drops is garbage-collected and its slot silently lost: pgleak's weak reference to
it is what turns that into a ``leak.collected`` report. Connections the pool throws away (broken,
closed by the server) are still handed to ``putconn`` by the application, which checks them in.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from typing import Any

try:
    import psycopg
    import psycopg_pool
    from psycopg_pool import (
        AsyncConnectionPool,
        AsyncNullConnectionPool,
        ConnectionPool,
        NullConnectionPool,
        PoolTimeout,
    )
except ImportError as _exc:  # pragma: no cover - exercised by users without psycopg_pool
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("psycopg_pool is not installed") from _exc

from pgleak import _retry, _stack
from pgleak._adapter import Adapter, driver_state, driver_target
from pgleak._appname import tags
from pgleak._core import PoolKind, PoolStats, core
from pgleak._guard import internal_error
from pgleak._reclaim import on_loop as _reclaim_on_loop
from pgleak._redact import redact_dsn
from pgleak.integrations._direct import apool_call, pool_call

__all__ = ["PsycopgPoolAdapter"]


def _pool_name(pool: Any) -> str:
    """``pool-1 (host=db user=app dbname=shop)``: the pool's own name and its target."""
    conninfo = getattr(pool, "conninfo", "") or ""
    target = f" ({redact_dsn(conninfo)})" if conninfo else ""
    return f"{getattr(pool, 'name', type(pool).__name__)}{target}"


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, PoolTimeout)


#: The least ``timeout`` handed to an attempt, so a retry cut at the caller's deadline still
#: connects instead of failing on a zero wait.
_MIN_WAIT = 0.05


def _retrying_getconn_unchecked(original: Any) -> Any:
    def _getconn_unchecked(pool: Any, timeout: float, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()

        def attempt() -> Any:
            left = max(timeout - (time.monotonic() - start), _MIN_WAIT)
            return original(pool, left, *args, **kwargs)

        return _retry.retry_connect(
            attempt, pool=core.pool(pool, "psycopg_pool", _pool_name), deadline=timeout
        )

    return _getconn_unchecked


def _aretrying_getconn_unchecked(original: Any) -> Any:
    async def _getconn_unchecked(pool: Any, timeout: float, *args: Any, **kwargs: Any) -> Any:
        start = time.monotonic()

        async def attempt() -> Any:
            left = max(timeout - (time.monotonic() - start), _MIN_WAIT)
            return await original(pool, left, *args, **kwargs)

        return await _retry.aretry_connect(
            attempt, pool=core.pool(pool, "psycopg_pool", _pool_name), deadline=timeout
        )

    return _getconn_unchecked


def _tag_kwargs(pool: Any) -> None:
    try:
        tags.tag_pool_kwargs(pool, "kwargs", pool.conninfo, tags.libpq_kwargs)
    except Exception as exc:
        internal_error("psycopg_pool.application_name", exc)


def _stats(pool: Any) -> PoolStats | None:
    """Idle connections and limits from the pool; connections in use from pgleak's ledger.

    ``pool_size - pool_available`` would count a connection the pool is still opening (it
    counts it from the moment it starts growing) as one in use.
    """
    if pool.closed:
        return None
    stats = pool.get_stats()
    null = isinstance(pool, (NullConnectionPool, AsyncNullConnectionPool))
    return PoolStats(
        idle=stats.get("pool_available", 0),
        max=pool.max_size,
        idle_max=0 if null else pool.max_size,
        idle_min=0 if null else pool.min_size,
        waiting=stats.get("requests_waiting", 0),
    )


def _reclaim(pool: Any) -> Any:
    """Close an abandoned connection and put it back: the pool sees it closed, drops it, and
    opens a new one in its place (its own ``putconn`` path, so its counts stay right)."""
    if isinstance(pool, AsyncConnectionPool):
        runner = getattr(pool, "_sched_runner", None)  # an asyncio task on the pool's loop
        loop = runner.get_loop() if runner is not None else None
        if loop is None:
            return None

        def give_back_async(conn: Any, announce: Callable[[], None]) -> None:
            async def give_back() -> None:
                await conn.close()
                await pool.putconn(conn)

            _reclaim_on_loop(loop, give_back, "psycopg_pool.reclaim", announce)

        return give_back_async

    def give_back_sync(conn: Any, announce: Callable[[], None]) -> None:
        announce()
        conn.close()
        pool.putconn(conn)

    return give_back_sync


def _connect_started() -> float | None:
    return time.monotonic() if core.observer is not None else None


def _connected(pool: Any, started: float | None) -> None:
    if started is not None:
        try:
            core.connected(core.pool(pool, "psycopg_pool", _pool_name), started)
        except Exception as exc:
            internal_error("psycopg_pool.connect", exc)


def _tagging_connect(original: Any) -> Any:
    def _connect(pool: Any, *args: Any, **kwargs: Any) -> Any:
        _tag_kwargs(pool)
        started = _connect_started()
        conn = pool_call(original, pool, *args, **kwargs)
        _connected(pool, started)
        return conn

    return _connect


def _atagging_connect(original: Any) -> Any:
    async def _connect(pool: Any, *args: Any, **kwargs: Any) -> Any:
        _tag_kwargs(pool)
        started = _connect_started()
        conn = await apool_call(original, pool, *args, **kwargs)
        _connected(pool, started)
        return conn

    return _connect


class PsycopgPoolAdapter(Adapter):
    name = "psycopg_pool"
    module = "psycopg_pool"
    distribution = "psycopg-pool"
    min_version = (3, 2)

    def _install(self) -> None:
        _stack.register_library(os.path.dirname(psycopg_pool.__file__ or ""))
        _stack.register_library(os.path.dirname(psycopg.__file__ or ""))
        for cls, is_async in ((ConnectionPool, False), (AsyncConnectionPool, True)):
            self.track_acquire(
                cls,
                "getconn",
                namer=_pool_name,
                is_timeout=_is_timeout,
                is_async=is_async,
                give_back="putconn",
            )
            self.track_release(cls, "putconn", refused=(ValueError,), is_async=is_async)
            self.track_close(
                cls, "close", namer=_pool_name, detail="pool.close()", is_async=is_async
            )
            self.track_scope(cls, "connection")
        core.register_kind(
            self.name,
            PoolKind(
                stats=_stats,
                target=driver_target,
                state=driver_state,
                reclaim=_reclaim,
                loses_slots=True,
            ),
        )
        self.patch(ConnectionPool, "_connect", _tagging_connect)
        self.patch(AsyncConnectionPool, "_connect", _atagging_connect)
        self.patch(NullConnectionPool, "_getconn_unchecked", _retrying_getconn_unchecked)
        self.patch(AsyncNullConnectionPool, "_getconn_unchecked", _aretrying_getconn_unchecked)
