"""psycopg2 pools: ``SimpleConnectionPool``, ``ThreadedConnectionPool`` and their subclasses.

Hooks, and why each:

* ``AbstractConnectionPool._getconn`` / ``_putconn`` / ``_closeall``: where every pool does the
  work. ``ThreadedConnectionPool.getconn``/``putconn``/``closeall`` take the pool's lock and
  call these through ``self``, as do subclasses written the same way; so checkout, checkin and
  close are recorded inside the lock, in the pool's own order: a connection is checked in
  before another thread can be lent it (checkouts are filed under the connection object, which
  the pool lends again and again). The rare reports written at these moments (exhausted,
  closed) are written inside the lock too.
* ``SimpleConnectionPool.getconn`` / ``putconn`` / ``closeall``: class attributes bound at
  import to those same three functions, so patching the underscore names does not reach them;
  they are wrapped on their own. They call the original functions directly, never
  ``self._getconn``, so each public call is recorded exactly once on either class. (A user
  subclass that binds names the same way, defined before ``install()``, keeps the unwrapped
  functions; one defined after binds the wrappers.)

What each call means:

* ``getconn`` is the checkout. It never waits: at ``maxconn`` it raises
  ``PoolError("connection pool exhausted")`` at once, the moment to list every holder (and only
  that ``PoolError``: "connection pool is closed" is no exhaustion).
* ``getconn(key)`` for a key that is out already returns the same connection again and takes no
  slot: not a new checkout. The checkout that took the slot stays on record, with its line, and
  the ``putconn`` that releases the key checks it in.
* ``putconn`` is the checkin, ``close=True`` included (the user gave it back; the pool closes
  it). The two ``PoolError`` it raises ("trying to put unkeyed connection": another pool's
  connection, or one returned already; "connection pool is closed") come before the pool takes
  anything back: no checkin. Anything else comes after the user let go: a checkin. (With
  ``minconn`` > 0 that can be a failed ``rollback()`` of a connection whose server died in a
  transaction; psycopg2 then keeps it in ``_used`` and the slot is lost until ``closeall()``:
  psycopg2's loss, not the user's leak.)
* ``SimpleConnectionPool.getconn`` / ``ThreadedConnectionPool.getconn`` (outermost): a
  ``getconn`` that fails because ``psycopg2.connect()`` inside it was refused by a full server
  is retried with backoff (:func:`pgleak._retry.retry_connect`). Not ``_connect`` itself:
  ``ThreadedConnectionPool`` holds its lock around it, and sleeping there would also block
  every ``putconn`` - the very call that could free a server slot. A refused ``getconn`` has
  changed nothing in the pool (the connect raised before anything was recorded), so calling it
  again is the same as the first call; the connections ``minconn`` opens at pool creation are
  not retried.
* ``closeall`` closes every connection, lent or not: whatever is still out is reported.
* ``AbstractConnectionPool._connect``: the arguments the pool keeps for ``psycopg2.connect()``
  get the ``application_name`` tag, once, before the first connection (``minconn`` ones
  included); the time it takes is ``db.client.connection.create_time``. Its
  ``psycopg2.connect()`` is marked as the pool's (:func:`pgleak.integrations._direct.pool_call`).
* ``psycopg2.connect``: a direct connection, outside any pool
  (:mod:`pgleak.integrations._direct`): tagged, retried, tracked from the line that opened it.
  Its ``close()`` is a C method no hook reaches: ``closed`` is read at ``direct_threshold``,
  at exit and, once reported, at each watchdog pass; a dropped one is never ``leak.collected``.

psycopg2's pools have no ``with`` block, so a checkout's OpenTelemetry span is never current:
it is recorded from ``getconn`` to ``putconn``, under the span that was current at ``getconn``.
Pool state for the metrics is read from the pool itself: ``_pool`` (idle), ``_used``,
``maxconn``, and ``minconn`` (the most idle connections it keeps).

The pool keeps strong references to lent connections (``_used``, ``_rused``), so a dropped
connection is never garbage-collected: it stays out until ``closeall()`` or process exit, where
it is reported with the line that took it.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Mapping
from importlib import metadata
from typing import Any

try:
    import psycopg2
    from psycopg2.extensions import make_dsn
    from psycopg2.pool import (
        AbstractConnectionPool,
        PoolError,
        SimpleConnectionPool,
        ThreadedConnectionPool,
    )
except ImportError as _exc:  # pragma: no cover - exercised by users without psycopg2
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("psycopg2 is not installed") from _exc

from pgleak import _adapter, _forward, _retry, _stack
from pgleak._adapter import Adapter, driver_state, driver_target, tag
from pgleak._appname import tags, untagged
from pgleak._cledger import vars_set
from pgleak._core import PoolKind, PoolStats, core, suppressed
from pgleak._guard import internal_error
from pgleak._redact import redact_dsn
from pgleak.integrations._direct import Driver, pool_call

__all__ = ["Psycopg2Adapter"]

#: ``psycopg2.connect()`` arguments that are not connection parameters.
_NOT_CONNINFO = ("dsn", "connection_factory", "cursor_factory", "async", "async_")


def _installed_distribution() -> str:
    """psycopg2 is published as ``psycopg2`` (built from source) and ``psycopg2-binary``
    (wheels): the same module under two names; the version check reads the one installed."""
    for name in ("psycopg2", "psycopg2-binary"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            metadata.version(name)
            return name
    return "psycopg2"


def _pool_name(pool: Any) -> str:
    """``psycopg2 ThreadedConnectionPool (host=db user=app dbname=shop)``, password hidden.

    The pool keeps what it passes to ``psycopg2.connect()``: a DSN (``key=value`` or URL) and
    keyword parameters, merged here the way ``connect`` merges them.
    """
    conninfo = _target(getattr(pool, "_args", ()), untagged(getattr(pool, "_kwargs", None)) or {})
    target = f" ({conninfo})" if conninfo else ""
    return f"psycopg2 {type(pool).__name__}{target}"


def _target(args: tuple[Any, ...], kwargs: Mapping[str, Any]) -> str:
    """The conninfo ``psycopg2.connect(*args, **kwargs)`` connects with, password redacted."""
    dsn = args[0] if args else kwargs.get("dsn")
    params = {key: value for key, value in kwargs.items() if key not in _NOT_CONNINFO}
    try:
        conninfo = make_dsn(dsn, **params)
    except Exception:  # a DSN libpq cannot parse: connecting with it fails too
        conninfo = dsn if isinstance(dsn, str) else ""
    return redact_dsn(conninfo)


def _is_exhausted(err: BaseException) -> bool:
    return isinstance(err, PoolError) and err.args == ("connection pool exhausted",)


def _lends_again(pool: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> bool:
    """``getconn(key)`` for a key already out: the pool will return that same connection."""
    key = args[0] if args else kwargs.get("key")
    if key is None:
        return False
    try:
        return key in pool._used
    except Exception:  # an unhashable key, a pool without ``_used``: the call itself decides
        return False


#: The names the templates below use: a method parameter spelt the same gets the generic shape.
_RESERVED = frozenset(
    {"pool", "tracked", "original", "suppressed", "lends_again", "token", "conn", "exc", "lease"}
    | {"vars_set"}
    | {"retry", "budget", "succeeded", "tags", "core", "tag", "pool_of", "_retry"}
)

#: ``_relend_untracked``'s wrapper (compiled per method by pgleak._forward: these two run on
#: every checkout, where forwarding ``*args, **kwargs`` would cost more than the pool's call).
_RELEND = """
def {name}({params}):
    pool = {first}
    if not lends_again(pool, {args}, {kwargs}):
        return tracked({call})
    vars_set()
    token = suppressed.set(True)
    try:
        return tracked({call})
    finally:
        suppressed.reset(token)
"""


def _relend_untracked(tracked: Any) -> Any:
    """Wraps the tracked ``getconn``: a re-lend of a key's connection runs untracked."""
    return _forward.compile_wrapper(
        _RELEND,
        getattr(tracked, "__name__", "getconn"),
        _forward.shape_of(tracked, _RESERVED),
        {
            "tracked": tracked,
            "lends_again": _lends_again,
            "suppressed": suppressed,
            "vars_set": vars_set,
        },
        "relend",
    )


#: ``_retrying_getconn``'s wrapper. The retry is entered only after a refusal its first
#: attempt met, so that an error it does not retry is raised with no frame of the retry's.
_RETRYING = """
def {name}({params}):
    pool = {first}
    try:
        conn = original({call})
    except Exception as exc:  # most checkouts open no connection, and none fails
        if not _retry.worth_retrying(exc):
            raise  # the pool's own error, with no frame of pgleak's retry under it
        conn = _retry.retry_connect(
            lambda: original({call}),
            pool=lambda: pool_of(pool),
            refused=exc,
        )
    else:
        if budget._tokens is not None:  # _retry.succeeded()'s test, inlined: every checkout
            _retry.succeeded()
    if tags.call_site:
        lease = core.lease_of(conn)
        if lease is not None:
            tag(conn, lease, "psycopg2")
    return conn
"""


def _retrying_getconn(original: Any) -> Any:
    """``getconn``, retried while the server refuses the connection it opens (outside locks).

    Also where a checkout is tagged with its line (``app_name_call_site``): outside the
    pool's lock, which a round trip must not hold.
    """
    python = _forward.compile_wrapper(
        _RETRYING,
        getattr(original, "__name__", "getconn"),
        _forward.shape_of(original, _RESERVED),
        {
            "original": original,
            "_retry": _retry,
            "budget": _retry.BUDGET,
            "pool_of": _pool_handle,
            "tags": tags,
            "core": core,
            "tag": tag,
        },
        "retrying",
    )
    fast = _adapter._c_wrappers()
    if fast is None:
        return python

    def retried(pool: Any, refused: Exception, args: tuple[Any, ...], kwargs: Any) -> Any:
        # The template's retry, after the C wrapper's first attempt was refused.
        return _retry.retry_connect(
            lambda: original(pool, *args, **kwargs),
            pool=lambda: _pool_handle(pool),
            refused=refused,
        )

    return fast.retry_wrapper(
        original, python, _retry.BUDGET, _retry.succeeded, _retry.worth_retrying, retried, tags
    )


def _pool_handle(pool: Any) -> Any:
    return core.pool(pool, "psycopg2", _pool_name)


def _tagging_connect(original: Any) -> Any:
    """``_connect``: the pool's ``psycopg2.connect()`` arguments get the tag, once."""

    def _connect(pool: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            saved = getattr(pool, "_args", ())
            dsn = saved[0] if saved else getattr(pool, "_kwargs", {}).get("dsn")
            tags.tag_pool_kwargs(pool, "_kwargs", dsn, tags.libpq_kwargs)
        except Exception as exc:
            internal_error("psycopg2.application_name", exc)
        started = time.monotonic() if core.observer is not None else None
        conn = pool_call(original, pool, *args, **kwargs)
        if started is not None:
            try:
                core.connected(core.pool(pool, "psycopg2", _pool_name), started)
            except Exception as exc:
                internal_error("psycopg2.connect", exc)
        return conn

    return _connect


def _retag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    return tags.libpq_kwargs(args[0] if args else kwargs.get("dsn"), kwargs)


def _is_closed(conn: Any) -> bool:
    return bool(conn.closed)


#: ``psycopg2.connect()`` outside a pool. Its connection is a C type whose ``close()`` no hook
#: reaches, and whose deallocation closes it before any weak reference hears of it: closed or
#: leaked, a collected connection looks the same, so none is reported as ``leak.collected``.
#: ``closed`` is read instead at ``direct_threshold`` and at exit, which is exact.
_DIRECT = Driver(
    "psycopg2.direct", describe=_target, retag=_retag, closed=_is_closed, unseen_close=True
)


def _stats(pool: Any) -> PoolStats | None:
    if pool.closed:
        return None
    return PoolStats(
        idle=len(pool._pool), used=len(pool._used), max=pool.maxconn, idle_max=pool.minconn
    )


def _reclaim(pool: Any) -> Any:
    """``putconn(conn, close=True)``: the pool forgets it and closes it, under its own lock.

    Only ``ThreadedConnectionPool`` has that lock; ``SimpleConnectionPool`` is not thread-safe,
    so its connections are never reclaimed from the watchdog thread.
    """
    if not isinstance(pool, ThreadedConnectionPool):
        return None

    def give_back(conn: Any, announce: Callable[[], None]) -> None:
        announce()
        pool.putconn(conn, close=True)

    return give_back


class Psycopg2Adapter(Adapter):
    name = "psycopg2"
    module = "psycopg2"
    distribution = _installed_distribution()
    min_version = (2, 8)

    def _install(self) -> None:
        _stack.register_library(os.path.dirname(psycopg2.__file__ or ""))
        for cls, acquire, release, close in (
            (AbstractConnectionPool, "_getconn", "_putconn", "_closeall"),
            (SimpleConnectionPool, "getconn", "putconn", "closeall"),
        ):
            # Over the checkout wrapper: a keyed re-lend runs it with tracking suppressed.
            self.track_acquire(
                cls,
                acquire,
                namer=_pool_name,
                is_timeout=_is_exhausted,
                timeout_arg=None,
                keyed=_relend_untracked,
            )
            self.track_release(cls, release, refused=(PoolError,))
            self.track_close(cls, close, namer=_pool_name, detail="pool.closeall()")
        self.patch(AbstractConnectionPool, "_connect", _tagging_connect)
        self.patch(SimpleConnectionPool, "getconn", _retrying_getconn)
        self.patch(ThreadedConnectionPool, "getconn", _retrying_getconn)
        core.register_kind(
            self.name,
            PoolKind(stats=_stats, target=driver_target, state=driver_state, reclaim=_reclaim),
        )
        # Where the pools connect too (``psycopg2.connect`` is looked up at each call), inside
        # ``_connect``, which marks its connects as the pool's.
        self.patch(psycopg2, "connect", _DIRECT.wrap("psycopg2.connect"))
        _DIRECT.register()
