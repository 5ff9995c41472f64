"""asyncpg pools: ``asyncpg.Pool`` / ``asyncpg.create_pool()``.

Hooks, and why each:

* ``Pool._acquire``: the checkout. ``pool.acquire()`` returns a ``PoolAcquireContext`` whose
  ``__aenter__`` (``async with``) and ``__await__`` (``await``) both call it, in the caller's
  task. With ``acquire(timeout=...)`` it raises ``asyncio.TimeoutError`` when the wait runs out
  (the builtin ``TimeoutError`` on 3.11+, another class on 3.10): the moment to list every
  holder. Without a timeout it waits for as long as it takes, and nothing is reported; nor
  when the ``TimeoutError`` is a connection attempt's (the server is down), not the wait's.
* ``PoolConnectionHolder._release``: the checkin, at the moment the slot goes back into the
  pool's queue. ``Pool.release()`` gets there through a shielded task (so a cancelled
  ``release()`` still returns the connection, a little later), and the next waiter can take the
  very same connection before ``release()`` returns to its caller: checking in when
  ``release()`` returns would, in between, find the new checkout instead. ``release()`` of a
  connection from another pool raises ``InterfaceError`` before reaching it, and releasing
  twice is a no-op: neither touches the ledger.
* ``PoolConnectionHolder._release_on_close``: the pool discards a lent connection (closed by the
  server, ``pg_terminate_backend``, broken, a failed reset, ``close()`` / ``terminate()`` called
  on the connection itself). asyncpg then puts the slot back by itself and detaches the proxy,
  whether or not the application ever calls ``release()``: the checkout leaves the ledger as
  discarded, with no report.
* ``Pool.close`` (which waits until every connection is released) and ``Pool.terminate``:
  whatever is still out is reported as ``leak.at_exit`` at once, before ``close()`` waits.
* ``Pool._get_new_connection``: where the pool opens a server connection, in the caller's task
  (from ``acquire()``, and for ``min_size`` at ``create_pool()``). A connection the server
  refuses for being full (``TooManyConnectionsError``, SQLSTATE 53300) or not ready
  (``CannotConnectNowError``, 57P03) is retried with backoff by
  :func:`pgleak._retry.aretry_connect`, sleeping with ``asyncio.sleep``; a refused attempt
  raises before the pool's ``init`` callback runs, so calling the method again is the same as
  the first call. ``acquire(timeout=)`` still bounds the whole wait, retries included.
* The shortcuts ``execute``, ``executemany``, ``fetch``, ``fetchval``, ``fetchrow``,
  ``fetchmany`` and ``copy_*``: they acquire and release inside one call, so their checkouts are
  tracked (they hold a slot, and ``pool.exhausted`` lists them) but never held "too long".
* ``PoolAcquireContext.__aenter__`` / ``__aexit__``: the user-facing ``async with
  pool.acquire()``. With OpenTelemetry on, the checkout's span is current inside the block (so
  the asyncpg instrumentation's query spans nest under it): attached in the caller's task once
  ``_acquire`` has returned, detached before ``release()`` hands over to its shielded task.
  ``await pool.acquire()`` has no block, and its span is never current.
* ``connect_utils._connect``: what ``asyncpg.connect()`` awaits (looked up at each call, so a
  ``from asyncpg import connect`` made before ``install()`` is covered): a direct connection
  outside any pool (:mod:`pgleak.integrations._direct`), tagged through ``server_settings``,
  retried, tracked from the line that opened it. The pool's own connects run inside
  ``_get_new_connection``, marked as the pool's. ``Connection.close()`` / ``terminate()``
  end it, except the ``terminate()`` that ``Connection.__del__`` runs on a connection nobody
  closed: that one is ``leak.collected``.
* Pool state for the metrics: ``get_size()``, ``get_idle_size()``, ``get_min_size()``,
  ``get_max_size()``.

The object the application holds is a ``PoolConnectionProxy`` (a new one per checkout), which
cannot be weakly referenced (``__slots__`` without ``__weakref__``). The ledger therefore files
each checkout under the proxy's ``asyncpg.Connection``: one physical connection is lent to one
holder at a time, it is what the holder's ``_con`` names until the slot is back, and it can be
weakly referenced. That is why acquire and release have their own wrappers here rather than the
shared ``Adapter.track_acquire`` / ``track_release``, whose rules they follow: the library's
call runs outside pgleak's guard, and its result or exception passes through untouched.

A lent connection is referenced by its holder inside the pool, so it is never
garbage-collected: a connection the application never releases is reported by
``leak.suspected`` and, at ``close()`` / ``terminate()`` / process exit, by ``leak.at_exit``.
"""

from __future__ import annotations

import asyncio
import os
import sys
import time
from collections.abc import Callable
from typing import Any

try:
    import asyncpg
    from asyncpg import connect_utils
    from asyncpg.connection import Connection
    from asyncpg.pool import Pool, PoolAcquireContext, PoolConnectionHolder, PoolConnectionProxy
except ImportError as _exc:  # pragma: no cover - exercised by users without asyncpg
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("asyncpg is not installed") from _exc

from pgleak import _forward, _retry, _stack
from pgleak._adapter import (
    Adapter,
    atag,
    c_awaitables,
    c_wrappers,
    driver_state,
    driver_target,
)
from pgleak._appname import tags
from pgleak._core import PoolKind, PoolStats, core
from pgleak._guard import internal_error
from pgleak._reclaim import on_loop as _reclaim_on_loop
from pgleak._redact import redact_dsn
from pgleak.integrations._direct import Driver, apool_call, checked_in

__all__ = ["SHORTCUTS", "AsyncpgAdapter"]

_KIND = "asyncpg"

#: ``Pool`` methods that acquire, run one command and release (those the version has).
SHORTCUTS = (
    "execute",
    "executemany",
    "fetch",
    "fetchval",
    "fetchrow",
    "fetchmany",
    "copy_from_table",
    "copy_from_query",
    "copy_to_table",
    "copy_records_to_table",
)

# Two classes on 3.10, one on 3.11+.
_TIMEOUTS = (asyncio.TimeoutError, TimeoutError)
_TARGET_KEYS = ("host", "port", "user", "database")


def _pool_name(pool: Any) -> str:
    """``asyncpg Pool (host=db port=5432 user=app database=shop)``, no password.

    asyncpg keeps what ``create_pool`` was given: a DSN (positional or ``dsn=``), keyword
    arguments, or both (keywords override the DSN's parts).
    """
    where = _target(
        tuple(getattr(pool, "_connect_args", None) or ()),
        dict(getattr(pool, "_connect_kwargs", None) or {}),
    )
    target = f" ({where})" if where else ""
    return f"asyncpg {type(pool).__name__}{target}"


def _target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    """``host=db port=5432 user=app database=shop`` of connect arguments, no password."""
    parts: list[str] = []
    dsn = args[0] if args else kwargs.get("dsn")
    if isinstance(dsn, str) and dsn:
        parts.append(redact_dsn(dsn))
    for key in _TARGET_KEYS:
        value = kwargs.get(key)
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = ",".join(map(str, value))
        parts.append(f"{key}={value}")
    return " ".join(parts)


_pools = core._pools


def _waiting(pool: Any) -> tuple[Any, float | None]:
    try:
        handle = core.pool(pool, _KIND, _pool_name)
        return handle, core.wait_start(handle)
    except Exception as exc:
        internal_error("asyncpg.checkout", exc)
        return None, None


def _gave_up(pool: Any, err: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
    """Report ``pool.exhausted`` if ``err`` means the wait for a free slot ran out.

    ``_acquire`` also raises ``TimeoutError`` when *connecting* takes too long (the ``timeout``
    connect argument; the server is down or unreachable), with or without ``acquire(timeout=)``.
    That is no exhaustion: after a timed-out connection attempt, the slot it had taken is back
    in the pool's queue, while a wait for a slot leaves the queue empty.
    """
    try:
        if not isinstance(err, _TIMEOUTS):
            return
        waited = kwargs.get("timeout", args[0] if args else None)
        if isinstance(waited, bool) or not isinstance(waited, (int, float)):
            return  # no acquire(timeout=): the timeout was the connection attempt's
        queue = getattr(pool, "_queue", None)
        if queue is not None and not queue.empty():
            return  # a slot was free: connecting to the server timed out
        # asyncpg's TimeoutError has no message: say what ran out.
        said = str(err) or f"no connection released within acquire(timeout={waited})"
        core.exhausted(core.pool(pool, _KIND, _pool_name), waited, f"{type(err).__name__}: {said}")
    except Exception as exc:
        internal_error("asyncpg.exhausted", exc)


def _lease_lent_by(holder: Any) -> Any:
    """The open lease of the connection ``holder`` lends out, if it is lent and tracked."""
    if getattr(holder, "_in_use", None) is None:  # idle: nothing was checked out
        return None
    con = getattr(holder, "_con", None)
    return None if con is None else core.lease_of(con)


#: The names the templates below use: a method parameter spelt the same gets the generic shape.
_RESERVED = frozenset(
    {"pool", "holder", "original", "core", "pools", "kind", "namer", "waiting", "gave_up"}
    | {"internal_error", "tags", "atag", "proxy_type", "handle", "since", "proxy", "err"}
    | {"con", "lease", "exc", "result", "by_conn", "acquiring", "spec", "slow"}
)

#: ``Pool._acquire(timeout)``: a checkout, or a wait that ran out. Compiled with the method's
#: own parameters (pgleak._forward), and ``core.pool()`` and ``Core.lease_of`` inlined: this is
#: every checkout.
_ACQUIRE = """
async def {name}({params}):
    pool = {first}
    handle = since = None
    if core.observer is not None:  # only an observer needs the wait's start
        handle, since = waiting(pool)
    try:
        proxy = await original({call})
    except BaseException as err:
        if handle is not None:
            core.wait_end(handle)
        gave_up(pool, err, {args}, {kwargs})
        raise
    if handle is not None:
        core.wait_end(handle)
    lease = None
    try:
        con = proxy._con if isinstance(proxy, proxy_type) else None
        if con is not None:
            if handle is None:
                handle = pools.get(id(pool))
                if handle is None or handle.ref() is not pool:
                    handle = core.pool(pool, kind, namer)
            lease = core.checkout(handle, con, True, since)
    except Exception as exc:
        internal_error("asyncpg.checkout", exc)
    if tags.call_site and lease is not None:
        await atag(pool, proxy._con, lease, lambda _con: pool.release(proxy), kind)
    return proxy
"""

#: ``_ACQUIRE`` where the C extension is there: no coroutine of pgleak's (see
#: ``pgleak._adapter._AACQUIRE_FAST``). ``acquiring`` drives ``Pool._acquire``'s coroutine and
#: files the checkout under the proxy's connection when it returns, in the awaiting task; an
#: observer or a call-site tag takes ``slow``, the ``async def`` above. Where the C ledger is
#: bound too, this function is a C object instead (``aacquire_wrapper``, which keeps an
#: observer's checkout too), as is ``_RELEASE`` (``holder_release_wrapper``): no frame of
#: pgleak's on a checkout or a checkin.
_ACQUIRE_FAST = """
def {name}({params}):
    if core.observer is None and not tags.call_site:
        return acquiring(spec, original({call}), {first}, {args}, {kwargs})
    return slow({call})
"""

#: ``PoolConnectionHolder._release()``: the slot is back in the pool's queue. The lease is
#: looked up before the call (``_lease_lent_by``, inlined): once the holder is back in the
#: queue, the next checkout may take the very same connection.
_RELEASE = """
def {name}({params}):
    holder = {first}
    lease = None
    try:
        if getattr(holder, "_in_use", None) is not None:
            con = getattr(holder, "_con", None)
            if con is not None:
                lease = by_conn.get(id(con))
                if lease is not None and (lease.ref is None or lease.ref() is not con):
                    lease = None  # an id reused after its connection died
    except Exception as exc:
        internal_error("asyncpg.checkin", exc)
    result = original({call})
    if lease is not None:
        try:
            core.checkin(lease)
        except Exception as exc:
            internal_error("asyncpg.checkin", exc)
    return result
"""


def _wrap_acquire(original: Any) -> Any:
    """``Pool._acquire(timeout)``: a checkout, or a wait that ran out."""
    shape = _forward.shape_of(original, _RESERVED)
    wrapper = _forward.compile_wrapper(
        _ACQUIRE,
        "_acquire",
        shape,
        {
            "original": original,
            "core": core,
            "pools": _pools,
            "kind": _KIND,
            "namer": _pool_name,
            "waiting": _waiting,
            "gave_up": _gave_up,
            "internal_error": internal_error,
            "tags": tags,
            "atag": atag,
            "proxy_type": PoolConnectionProxy,
        },
        "acquire",
    )
    fast = c_awaitables()
    if fast is None:
        return wrapper
    tracked = c_wrappers()
    if tracked is not None and hasattr(tracked, "aacquire_wrapper"):
        # _ACQUIRE_FAST, as a C object (pgleak._speedups.Tracked): no frame of pgleak's
        return tracked.aacquire_wrapper(
            original,
            wrapper,
            core,
            _pools,
            _KIND,
            _pool_name,
            "asyncpg.checkout",
            _gave_up,
            internal_error,
            tags,
            PoolConnectionProxy,
        )
    spec = (core, _pools, _KIND, _pool_name, PoolConnectionProxy, _gave_up, internal_error)
    return _forward.compile_wrapper(
        _ACQUIRE_FAST,
        "_acquire",
        shape,
        {
            "original": original,
            "core": core,
            "tags": tags,
            "acquiring": fast.acquiring,
            "spec": (*spec, "asyncpg.checkout"),
            "slow": wrapper,
        },
        "acquire",
    )


def _wrap_release(original: Any) -> Any:
    """``PoolConnectionHolder._release()``: the slot is back in the pool's queue."""
    python = _forward.compile_wrapper(
        _RELEASE,
        "_release",
        _forward.shape_of(original, _RESERVED),
        {
            "original": original,
            "core": core,
            "by_conn": core.by_conn,
            "internal_error": internal_error,
        },
        "release",
    )
    fast = c_wrappers() if c_awaitables() is not None else None
    if fast is None or not hasattr(fast, "holder_release_wrapper"):
        return python
    # _RELEASE, as a C object (pgleak._speedups.Tracked)
    return fast.holder_release_wrapper(
        original, python, core, core.by_conn, "asyncpg.checkin", internal_error
    )


def _wrap_release_on_close(original: Any) -> Any:
    """``PoolConnectionHolder._release_on_close()``: the lent connection is gone.

    Discarded before the call, so that the ``_release()`` inside it finds nothing to check in.
    """

    def _release_on_close(holder: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            lease = _lease_lent_by(holder)
            if lease is not None:
                core.discard(lease)
        except Exception as exc:
            internal_error("asyncpg.discard", exc)
        return original(holder, *args, **kwargs)

    return _release_on_close


def _wrap_get_new_connection(original: Any) -> Any:
    """``Pool._get_new_connection()``, retried while the server refuses the connection.

    The connect arguments the pool keeps get the ``application_name`` tag here, once, in
    ``server_settings``. The successful attempt's duration is ``create_time``.
    """

    async def _get_new_connection(pool: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            saved = getattr(pool, "_connect_args", None) or ()
            dsn = saved[0] if saved else (pool._connect_kwargs or {}).get("dsn")
            tags.tag_pool_kwargs(pool, "_connect_kwargs", dsn, tags.asyncpg_kwargs)
        except Exception as exc:
            internal_error("asyncpg.application_name", exc)
        handle = core.pool(pool, _KIND, _pool_name)

        async def attempt() -> Any:
            started = time.monotonic() if core.observer is not None else None
            con = await apool_call(original, pool, *args, **kwargs)
            if started is not None:
                core.connected(handle, started)
            return con

        return await _retry.aretry_connect(attempt, pool=handle)

    return _get_new_connection


def _scope(proxy: Any, entering: bool) -> None:
    # The lease's lookup (Core.lease_of) and enter_scope() / exit_scope(), inlined: every
    # block while an observer runs.
    try:
        con = proxy._con if isinstance(proxy, PoolConnectionProxy) else None
        lease = None if con is None else _by_conn.get(id(con))
        if lease is None or lease.ref is None or lease.ref() is not con:
            return  # not tracked, or an id reused after its connection died
        observer = core.observer
        if observer is not None:
            if entering:
                observer.enter(lease)
            else:
                observer.exit(lease)
    except Exception as exc:
        internal_error("asyncpg.scope", exc)


_by_conn = core.by_conn


def _wrap_aenter(original: Any) -> Any:
    """``PoolAcquireContext.__aenter__``: the checkout's span is current in the block.

    A plain function: without an observer it hands back the library's own coroutine, so that
    ``async with pool.acquire()`` gains no coroutine (and no frame for a stack to cross).
    """

    async def traced(ctx: Any) -> Any:
        proxy = await original(ctx)
        _scope(proxy, True)
        return proxy

    def __aenter__(ctx: Any) -> Any:
        return original(ctx) if core.observer is None else traced(ctx)

    return _c_block(original, __aenter__, entering=True)


def _wrap_aexit(original: Any) -> Any:
    """``PoolAcquireContext.__aexit__``: detached here, in the caller's task, before
    ``release()`` continues in a shielded task of its own."""

    def __aexit__(ctx: Any, typ: Any, value: Any, tb: Any) -> Any:
        if core.observer is not None:
            _scope(getattr(ctx, "connection", None), False)
        return original(ctx, typ, value, tb)

    return _c_block(original, __aexit__, entering=False)


def _c_block(original: Any, python: Any, *, entering: bool) -> Any:
    """``python`` (``__aenter__`` / ``__aexit__`` above) as a C object where the C wrappers
    run (``pgleak._speedups.Tracked``): the same steps with no frame of pgleak's, and no
    ``traced`` coroutine; ``python`` itself otherwise."""
    fast = c_wrappers() if c_awaitables() is not None else None
    if fast is None or not hasattr(fast, "ablock_wrapper"):
        return python
    return fast.ablock_wrapper(
        original,
        python,
        core,
        _by_conn,
        PoolConnectionProxy,
        "asyncpg.scope",
        internal_error,
        entering,
    )


def _retag(_args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    return tags.asyncpg_kwargs(kwargs.get("dsn"), kwargs)


def _is_closed(conn: Any) -> bool:
    return bool(conn.is_closed())


#: ``asyncpg.connect()`` outside a pool (hooked at ``connect_utils._connect``, which it looks
#: up at each call: also reached through a ``from asyncpg import connect`` made earlier).
_DIRECT = Driver("asyncpg.direct", describe=_target, retag=_retag, closed=_is_closed)


def _wrap_close(original: Any) -> Any:
    """``Connection.close()``: a direct connection's checkin, however the close ends."""

    async def close(con: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(con, *args, **kwargs)
        finally:
            checked_in(_DIRECT, con)

    return close


def _wrap_terminate(original: Any) -> Any:
    """``Connection.terminate()``: a checkin too, unless ``__del__`` is terminating a
    connection nobody closed: that one is about to be ``leak.collected``."""

    def terminate(con: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(con, *args, **kwargs)
        finally:
            if sys._getframe(1).f_code is not _DEL_CODE:
                checked_in(_DIRECT, con)

    return terminate


_DEL_CODE = getattr(getattr(Connection, "__del__", None), "__code__", None)


def _stats(pool: Any) -> PoolStats | None:
    if pool.is_closing():
        return None
    size, idle = pool.get_size(), pool.get_idle_size()
    return PoolStats(
        idle=idle,
        used=max(0, size - idle),
        max=pool.get_max_size(),
        idle_max=pool.get_max_size(),
        idle_min=pool.get_min_size(),
    )


def _reclaim(pool: Any) -> Any:
    """``Connection.terminate()`` on the pool's loop: asyncpg then releases the holder itself
    (``_release_on_close``) and opens a new connection for the slot when next needed."""
    loop = getattr(pool, "_loop", None)
    if loop is None:
        return None

    def give_back_on_loop(con: Any, announce: Callable[[], None]) -> None:
        async def give_back() -> None:
            con.terminate()

        _reclaim_on_loop(loop, give_back, "asyncpg.reclaim", announce)

    return give_back_on_loop


class AsyncpgAdapter(Adapter):
    name = "asyncpg"
    module = "asyncpg"
    distribution = "asyncpg"
    min_version = (0, 29)

    def _install(self) -> None:
        _stack.register_library(os.path.dirname(asyncpg.__file__ or ""))
        self.patch(Pool, "_acquire", _wrap_acquire)
        self.patch(Pool, "_get_new_connection", _wrap_get_new_connection)
        self.patch(PoolConnectionHolder, "_release", _wrap_release)
        self.patch(PoolConnectionHolder, "_release_on_close", _wrap_release_on_close)
        self.track_close(Pool, "close", namer=_pool_name, detail="pool.close()", is_async=True)
        self.track_close(Pool, "terminate", namer=_pool_name, detail="pool.terminate()")
        self.hold_unlimited(Pool, SHORTCUTS, is_async=True)
        self.patch_scope(PoolAcquireContext, "__aenter__", _wrap_aenter)
        self.patch_scope(PoolAcquireContext, "__aexit__", _wrap_aexit)
        core.register_kind(
            self.name,
            PoolKind(stats=_stats, target=driver_target, state=driver_state, reclaim=_reclaim),
        )
        self.patch(connect_utils, "_connect", _DIRECT.awrap("asyncpg.connect"))
        self.patch(Connection, "close", _wrap_close)
        self.patch(Connection, "terminate", _wrap_terminate)
        _DIRECT.register()
