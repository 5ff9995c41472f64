"""SQLAlchemy adapter: sync ``Engine`` and asyncio ``AsyncEngine``, every pool class.

Hooks, and why each:

* Checkout and checkin, on SQLAlchemy 2.0 and 2.1: ``_ConnectionFairy._checkout`` and
  ``Pool._return_conn``, private methods, wrapped exactly where the ``checkout`` and ``checkin``
  events fire (after the checkout's listeners; after the record's finalizers, before the pool
  has the connection back). Listening to the events cost SQLAlchemy's dispatch to pgleak's
  listeners (two ``_ListenerCollection.__call__`` frames a cycle, ~40% of what pgleak added
  to a checkout without the stack), and kept its slower checkout path, which it skips when no
  one listens. Each is checked at install for the shape these wrappers are written for
  (``_direct_hooks_fit``); any other version or shape gets the events, as below.
* Pool events ``checkout`` / ``checkin`` (only where the private methods are not as expected)
  and ``detach``, listened on the ``Pool`` class so that
  engines created before ``install()`` are covered too. ``checkout`` fires once per fairy
  (nested checkouts of one connection do not re-fire), ``checkin`` once when it comes back.
  The lease rides in an attribute of the pool's ``ConnectionPoolEntry``, which lives as long as
  the DBAPI connection, so a checkin in another task than the checkout (``async with
  engine.connect()`` closes in a new task) still finds it. Not in its ``.info``: that is the
  user's dictionary (``Connection.info``), and applications and SQLAlchemy's own tests compare
  it whole.
* Garbage-collected fairies: sync pools reset them and fire ``checkin`` from a weakref callback;
  async pools fire ``detach`` and no ``checkin``. The core sees in both cases that the
  user-facing fairy is dead and reports ``leak.collected``.
* ``_ConnectionFairy._checkout`` (or, with the events, ``Pool.connect``) also sees
  ``sqlalchemy.exc.TimeoutError`` (``QueuePool limit of size N overflow M reached``), the
  moment to dump every holder: no pool event exists for it.
* The ``do_connect`` dialect event, listened on the ``Engine`` class (so engines created before
  ``install()`` are covered too), is where SQLAlchemy opens a server connection: pgleak opens it
  there, through :func:`pgleak._retry.retry_connect`, so a connection refused because the
  server is full is retried with backoff (never a statement). Class-level listeners run before
  an engine's own ``do_connect`` listeners (which often set a fresh password or token), and the
  first listener to return a connection ends the chain; so pgleak's listener runs the listeners
  after it itself, on fresh copies of the arguments at each attempt, exactly as SQLAlchemy
  would. On an asyncio dialect the sleep awaits ``asyncio.sleep`` through SQLAlchemy's
  greenlet bridge and does not block the event loop.
* ``Dialect.engine_created`` (the hook ``create_engine()`` calls on every new engine) and
  ``Engine.dispose`` give the pool a readable name (the URL, password hidden) and tell the
  core when a pool is disposed with connections still out. Never ``Engine.__init__``:
  ``create_engine()`` decides which keywords are the engine's by reading that function's own
  code object, which a wrapper would change.
* ``_ConnectionRecord.__connect``: where the pool opens every connection, through
  ``do_connect`` or a ``creator=`` function (which bypasses ``do_connect``); the driver
  ``connect()`` run inside it is marked as the pool's, so it is not tracked as a direct one.

OpenTelemetry (only does anything with an observer installed):

* ``_ConnectionFairy._checkout`` (or ``Pool.connect``) marks the start of the wait for a
  connection (the checkout span's start, ``db.client.connection.wait_time``, pending
  requests). With the events, the checkout event inside ``Pool.connect`` is a few calls
  deeper, so the start travels there in a context variable (a thread-local would
  be wrong: in asyncio mode other tasks' checkouts interleave on the thread while this one
  awaits a new connection).
* ``Connection.__enter__`` / ``__exit__`` and ``AsyncConnection.__aenter__`` / ``__aexit__``
  are the user's ``with engine.connect()`` / ``engine.begin()`` block: the checkout's span is
  made current there, *after* ``Engine.connect`` has returned. The SQLAlchemy instrumentation
  wraps ``Engine.connect`` in a span of its own and resets the context when it returns, which
  would undo anything attached inside it (the checkout event); outside it, the order in which
  the two were installed does not matter. ``AsyncConnection.__aexit__`` detaches before the
  connection is closed in a shielded task of its own. A ``Session`` checks out inside
  ``session.execute()`` with no block of its own, so its checkouts' spans are not current.
* Pool state for the metrics: ``QueuePool`` (and the asyncio one) says ``checkedin()``,
  ``checkedout()``, ``size()`` and its overflow; other pool classes only what pgleak sees.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import gc
import inspect
import os
import time
from collections.abc import Callable
from typing import Any

try:
    import sqlalchemy
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Connection, Dialect, Engine
    from sqlalchemy.pool import Pool, QueuePool
    from sqlalchemy.pool.base import _ConnectionFairy, _ConnectionRecord
except ImportError as _exc:  # pragma: no cover - exercised by users without SQLAlchemy
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("SQLAlchemy is not installed") from _exc

from pgleak import _adapter, _retry, _stack
from pgleak._adapter import Adapter, driver_state, driver_target
from pgleak._appname import tags
from pgleak._core import PoolHandle, PoolKind, PoolStats, core
from pgleak._guard import internal_error
from pgleak._reclaim import on_loop as _reclaim_on_loop
from pgleak._redact import redact_dsn
from pgleak.integrations._direct import pool_call

__all__ = ["SQLAlchemyAdapter"]

_KEY = "_pgleak_lease"
_KIND = "sqlalchemy"

#: When the ``Pool.connect`` running in this context started waiting (only with an observer).
_since: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "pgleak_sqlalchemy_since", default=None
)


def _engine_of(pool: Any) -> Any:
    """The engine whose pool ``pool`` is, found through the garbage collector's referrers.

    Only for pools of engines created before ``install()`` (the others are named as they are
    made), once per pool, when its name is first needed for a report: it scans every tracked
    object, which costs milliseconds on a large heap. On 3.10 the engine refers to its pool
    through its ``__dict__``; from 3.11 the engine itself is the referrer.
    """
    for referrer in gc.get_referrers(pool):
        if isinstance(referrer, Engine) and referrer.pool is pool:
            return referrer
        if isinstance(referrer, dict) and referrer.get("pool") is pool:
            for owner in gc.get_referrers(referrer):
                if isinstance(owner, Engine) and owner.pool is pool:
                    return owner
    return None


def _pool_name(pool: Any) -> str:
    engine = _engine_of(pool)
    if engine is not None:
        return _engine_name(engine)
    dialect: Any = getattr(pool, "_dialect", None)
    name = getattr(dialect, "name", None)
    driver = f" {name}+{getattr(dialect, 'driver', '?')}" if name else ""
    return f"sqlalchemy {type(pool).__name__}@{id(pool):#x}{driver}"


_pools = core._pools


def _handle(pool: Any) -> PoolHandle:
    # core.pool()'s first lines, inlined: every checkout asks, and the pool is nearly always
    # known already.
    handle = _pools.get(id(pool))
    if handle is None or handle.ref() is not pool:
        handle = core.pool(pool, _KIND, _pool_name)
    return handle


def _engine_name(engine: Any) -> str:
    return redact_dsn(str(engine.url.render_as_string(hide_password=True)))


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    try:
        since = _since.get() if core.observer is not None else None
        pool = proxy._pool
        handle = _pools.get(id(pool))  # _handle(), inlined: this is every checkout
        if handle is None or handle.ref() is not pool:
            handle = core.pool(pool, _KIND, _pool_name)
        lease = core.checkout(handle, proxy, False, since)
        if lease is not None:
            setattr(record, _KEY, lease)
    except Exception as err:
        internal_error("sqlalchemy.checkout", err)
        return
    if tags.call_site and lease is not None:
        _tag_checkout(dbapi_connection, proxy, lease)


def _tag_checkout(dbapi_connection: Any, proxy: Any, lease: Any) -> None:
    """Tag the connection with the checkout's line; asyncio drivers through the greenlet.

    A cancellation (asyncio) propagates: SQLAlchemy then returns the connection to its pool.
    """
    try:
        dialect = getattr(proxy._pool, "_dialect", None)
        if getattr(dialect, "is_async", False):
            driver_connection = getattr(dbapi_connection, "driver_connection", None)
            if driver_connection is None:
                return
            from sqlalchemy.util import concurrency

            await_ = getattr(concurrency, "await_", None) or concurrency.await_only
            await_(tags.atag_checkout(driver_connection, lease))
        else:
            tags.tag_checkout(dbapi_connection, lease)
    except Exception as err:
        internal_error("sqlalchemy.application_name", err)


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    try:
        lease = vars(record).pop(_KEY, None)
        if lease is not None:
            core.checkin(lease)
    except Exception as err:
        internal_error("sqlalchemy.checkin", err)


def _on_detach(dbapi_connection: Any, record: Any) -> None:
    try:
        lease = vars(record).pop(_KEY, None)
        if lease is not None:
            core.discard(lease)
    except Exception as err:
        internal_error("sqlalchemy.detach", err)


#: The SQLAlchemy versions whose private checkout and checkin the direct hooks were written for.
_DIRECT_VERSIONS = frozenset({(2, 0), (2, 1)})


def _code_names(fn: Any) -> frozenset[str]:
    return frozenset(getattr(getattr(fn, "__code__", None), "co_names", ()))


def _params(fn: Any) -> tuple[str, ...]:
    return tuple(inspect.signature(fn).parameters)


def _direct_hooks_fit() -> bool:
    """Whether SQLAlchemy's private checkout and checkin are the ones the direct hooks fit.

    ``_ConnectionFairy._checkout`` must be the classmethod that fires the ``checkout`` event
    (``(cls, pool, threadconns=None, fairy=None)``, a fairy's ``_counter`` deciding whether the
    checkout is new), ``_ConnectionRecord.checkin`` the method that fires ``checkin`` and then
    hands the record to ``Pool._return_conn(record)``, defined on ``Pool`` alone (no pool class
    of SQLAlchemy's overrides it). Anything else (another version, a changed shape): the
    public events, which cost more but cannot break.
    """
    try:
        version = tuple(int(part) for part in sqlalchemy.__version__.split(".")[:2])
        if version not in _DIRECT_VERSIONS:
            return False
        checkout = _ConnectionFairy.__dict__.get("_checkout")
        checkin = _ConnectionRecord.__dict__.get("checkin")
        return_conn = Pool.__dict__.get("_return_conn")
        if not (
            isinstance(checkout, classmethod)
            and inspect.isfunction(checkout.__func__)
            and _params(checkout.__func__) == ("cls", "pool", "threadconns", "fairy")
            and {"_counter", "dispatch", "checkout"} <= _code_names(checkout.__func__)
            and inspect.isfunction(checkin)
            and {"dispatch", "checkin", "_return_conn"} <= _code_names(checkin)
            and inspect.isfunction(return_conn)
            and _params(return_conn) == ("self", "record")
            and callable(getattr(_ConnectionRecord, "_checkin_failed", None))
        ):
            return False
        classes, seen = list(Pool.__subclasses__()), set()
        while classes:  # SQLAlchemy's own pool classes (and any defined by now)
            cls = classes.pop()
            if cls in seen:
                continue
            seen.add(cls)
            if "_return_conn" in cls.__dict__:
                return False
            classes.extend(cls.__subclasses__())
    except Exception:
        return False
    return True


def _make_checkout(original: Any) -> Any:
    """``_ConnectionFairy._checkout``: the checkout, where the ``checkout`` event would fire.

    Listening to the event costs SQLAlchemy's dispatch to the listener on every checkout (and
    keeps its slower path, which it skips when nobody listens); this is one frame, and it also
    sees the pool give up waiting (``TimeoutError``), which no event reports. Recorded once
    ``_checkout`` has returned a new fairy (a nested checkout of a fairy already out is not
    one), after any checkout listeners of the application's: a listener's
    ``DisconnectionError`` retried inside makes one checkout, not two.
    """

    def _checkout(cls: Any, pool: Any, threadconns: Any = None, fairy: Any = None) -> Any:
        if fairy:  # the same test as SQLAlchemy's: a nested checkout, no event either
            return original(cls, pool, threadconns, fairy)
        waited = since = None
        if core.observer is not None:
            waited, since = _wait_started(pool)
        try:
            fairy = original(cls, pool, threadconns)
        except exc.TimeoutError as err:
            _timed_out(pool, err)
            if waited is not None:
                core.wait_end(waited)
            raise
        except BaseException:
            if waited is not None:
                core.wait_end(waited)
            raise
        # _on_checkout(), inlined: this is every checkout.
        try:
            handle = _pools.get(id(pool))
            if handle is None or handle.ref() is not pool:
                handle = core.pool(pool, _KIND, _pool_name)
            lease = core.checkout(handle, fairy, False, since)
            if lease is not None:
                fairy._connection_record.__dict__[_KEY] = lease
        except Exception as err:
            internal_error("sqlalchemy.checkout", err)
            lease = None
        if waited is not None:
            core.wait_end(waited)
        if tags.call_site and lease is not None:
            try:
                _tag_checkout(fairy.dbapi_connection, fairy, lease)
            except BaseException as err:
                # A cancellation: SQLAlchemy gives the connection back when its own checkout
                # event is cut short so, and so does this.
                fairy._connection_record._checkin_failed(err, _fairy_was_created=True)
                raise
        return fairy

    return _fast(False, original, _checkout)


def _make_return_conn(original: Any) -> Any:
    """``Pool._return_conn``: the checkin, called right where the ``checkin`` event fires
    (after the record's finalizers, before the pool has the connection back), for every
    checkin, a collected fairy's included."""

    def _return_conn(self: Any, record: Any) -> None:
        try:
            lease = record.__dict__.pop(_KEY, None)
            if lease is not None:
                core.checkin(lease)
        except Exception as err:
            internal_error("sqlalchemy.checkin", err)
        return original(self, record)  # type: ignore[no-any-return]

    return _fast(True, original, _return_conn)


def _fast(checkin: bool, original: Any, python: Any) -> Any:
    """The C wrapper (``pgleak._speedups.Tracked``) that runs ``python``'s common case with no
    Python frame, handing it everything else; ``python`` itself without the extension."""
    fast = _adapter._c_wrappers()
    if fast is None:
        return python
    return fast.sqlalchemy_wrapper(
        checkin,
        original,
        python,
        core,
        _pools,
        _KIND,
        _pool_name,
        _timed_out,
        internal_error,
        tags,
        exc.TimeoutError,
        _KEY,
    )


def _wait_started(pool: Any) -> tuple[PoolHandle | None, float | None]:
    """The pool's handle and the wait's start (both ``None`` unless the observer took the
    start, which then needs a :meth:`Core.wait_end` however the wait ends)."""
    try:
        handle = _handle(pool)
        since = core.wait_start(handle)
    except Exception as err:
        internal_error("sqlalchemy.checkout", err)
        return None, None
    return (None, None) if since is None else (handle, since)


def _timed_out(pool: Any, err: BaseException) -> None:
    try:
        # The pool waited its whole timeout; no clock is read on the hot path.
        core.exhausted(_handle(pool), getattr(pool, "_timeout", None), str(err))
    except Exception as inner:
        internal_error("sqlalchemy.exhausted", inner)


def _greenlet_sleep() -> Callable[[float], object] | None:
    """A sleep for code inside SQLAlchemy's asyncio greenlet: awaits, so the loop runs on."""
    from sqlalchemy.util import concurrency

    await_ = getattr(concurrency, "await_", None) or getattr(concurrency, "await_only", None)
    in_greenlet = getattr(concurrency, "in_greenlet", None)
    if await_ is None or in_greenlet is None or not in_greenlet():
        return None

    def sleep(seconds: float) -> object:
        return await_(asyncio.sleep(seconds))

    return sleep


#: SQLAlchemy drivers that connect through libpq, which takes ``fallback_application_name``.
_LIBPQ_DRIVERS = frozenset({"psycopg", "psycopg_async", "psycopg2", "psycopg2cffi"})


def _tag_params(dialect: Any, args: list[Any], params: dict[str, Any]) -> None:
    """Add the ``application_name`` tag to the DBAPI ``connect()`` arguments, in place.

    Runs before the engine's own ``do_connect`` listeners, which may still change it.
    """
    if not tags.enabled:
        return
    try:
        driver = getattr(dialect, "driver", "")
        if driver in _LIBPQ_DRIVERS:
            dsn = args[0] if args else params.get("dsn") or params.get("conninfo")
            tagged = tags.libpq_kwargs(dsn, params)
        elif driver == "asyncpg":
            tagged = tags.asyncpg_kwargs(args[0] if args else params.get("dsn"), params)
        elif driver == "pg8000":
            value = tags.for_user_value(params.get("application_name"))
            tagged = None if value is None else {**params, "application_name": value}
        else:
            return
        if tagged is not None:
            params.clear()
            params.update(tagged)
    except Exception as err:
        internal_error("sqlalchemy.application_name", err)


def _on_do_connect(dialect: Any, record: Any, cargs: list[Any], cparams: dict[str, Any]) -> Any:
    """Open the DBAPI connection (retried while the server refuses it for being full)."""
    try:
        listeners = list(dialect.dispatch.do_connect)
        later = listeners[listeners.index(_on_do_connect) + 1 :]
    except Exception:  # not found (wrapped by a newer SQLAlchemy): no later listeners known
        later = []
    pool: Any = getattr(record, "_ConnectionRecord__pool", None)
    target = _handle(pool) if pool is not None else f"sqlalchemy {dialect.name}+{dialect.driver}"

    def attempt() -> Any:
        args, params = list(cargs), dict(cparams)
        _tag_params(dialect, args, params)
        started = time.monotonic() if core.observer is not None else None
        connection = None
        for fn in later:
            connection = fn(dialect, record, args, params)
            if connection is not None:
                break
        else:
            connection = dialect.connect(*args, **params)
        if started is not None and isinstance(target, PoolHandle):
            core.connected(target, started)
        return connection

    sleep = (_greenlet_sleep() if getattr(dialect, "is_async", False) else None) or time.sleep
    return _retry.retry_connect(attempt, pool=target, sleep=sleep)


def _record_connect(original: Any) -> Any:
    def __connect(record: Any, *args: Any, **kwargs: Any) -> Any:
        return pool_call(original, record, *args, **kwargs)

    return __connect


def _scope(connection: Any, entering: bool) -> None:
    # The lease's lookup and enter_scope() / exit_scope(), inlined: every block while an
    # observer runs.
    try:
        fairy = getattr(connection, "_dbapi_connection", None)
        record = getattr(fairy, "_connection_record", None)
        lease = None if record is None else getattr(record, _KEY, None)
        observer = core.observer
        if lease is not None and observer is not None:
            if entering:
                observer.enter(lease)
            else:
                observer.exit(lease)
    except Exception as err:
        internal_error("sqlalchemy.scope", err)


def _make_enter(original: Any) -> Any:
    # The Python fallback of the C wrapper below (which carries the hot path).
    def __enter__(self: Any) -> Any:
        result = original(self)
        if core.observer is not None:
            _scope(self, True)
        return result

    return _c_sync_block(original, __enter__, entering=True)


def _make_exit(original: Any) -> Any:
    def __exit__(self: Any, typ: Any, value: Any, tb: Any) -> Any:
        if core.observer is not None:
            _scope(self, False)
        return original(self, typ, value, tb)

    return _c_sync_block(original, __exit__, entering=False)


def _c_sync_block(original: Any, python: Any, *, entering: bool) -> Any:
    """``python`` (``__enter__`` / ``__exit__`` above) as a C object where the C wrappers run
    (``pgleak._speedups.Tracked``): the same steps with no frame of pgleak's on either side of
    every traced block; ``python`` itself otherwise."""
    fast = _adapter._c_wrappers()
    if fast is None or not hasattr(fast, "ablock_wrapper"):
        return python
    return fast.ablock_wrapper(
        original, python, core, _KEY, None, "sqlalchemy.scope", internal_error, entering, True
    )


def _make_aenter(original: Any) -> Any:
    # A plain function returning the library's coroutine: without an observer, ``async with
    # engine.connect()`` gains no coroutine of pgleak's (nor a frame for stacks to cross).
    async def traced(self: Any) -> Any:
        result = await original(self)
        _scope(getattr(self, "sync_connection", None), True)
        return result

    def __aenter__(self: Any) -> Any:
        return original(self) if core.observer is None else traced(self)

    return _c_block(original, __aenter__, entering=True)


def _make_aexit(original: Any) -> Any:
    def __aexit__(self: Any, *exc_info: Any) -> Any:
        # Before the original, which closes the connection in a shielded task of its own.
        if core.observer is not None:
            _scope(getattr(self, "sync_connection", None), False)
        return original(self, *exc_info)

    return _c_block(original, __aexit__, entering=False)


def _c_block(original: Any, python: Any, *, entering: bool) -> Any:
    """``python`` (``__aenter__`` / ``__aexit__`` above) as a C object where the C wrappers
    run (``pgleak._speedups.Tracked``, asyncpg's block modes): the same steps with no frame of
    pgleak's and no ``traced`` coroutine, the library's coroutine in an awaitable that makes
    the span current when it returns; ``python`` itself otherwise."""
    fast = _adapter._c_wrappers() if _adapter.c_awaitables() is not None else None
    if fast is None or not hasattr(fast, "ablock_wrapper"):
        return python
    return fast.ablock_wrapper(
        original, python, core, _KEY, None, "sqlalchemy.scope", internal_error, entering
    )


def _stats(pool: Any) -> PoolStats | None:
    """What the pool itself can say; ``used`` left to pgleak's ledger where it cannot."""
    if isinstance(pool, QueuePool):
        size = pool.size()
        overflow = getattr(pool, "_max_overflow", -1)
        return PoolStats(
            idle=pool.checkedin(),
            used=pool.checkedout(),
            max=size + overflow if overflow >= 0 else None,
            idle_max=size,
        )
    if type(pool).__name__ == "NullPool":
        return PoolStats(idle=0, idle_max=0)
    return PoolStats()


def _target(fairy: Any) -> tuple[str | None, int | None, str | None]:
    return driver_target(getattr(fairy, "driver_connection", None))


def _reclaim(pool: Any) -> Any:
    """``invalidate()`` the pooled connection: SQLAlchemy closes it and checks the slot back in.

    An asyncio engine's close awaits the driver, so there it runs in SQLAlchemy's greenlet
    bridge on the connection's own event loop, which asyncpg's connection names (psycopg's
    async connection does not: those are not reclaimed).
    """
    if not getattr(getattr(pool, "_dialect", None), "is_async", False):

        def give_back(fairy: Any, announce: Callable[[], None]) -> None:
            announce()
            fairy.invalidate()

        return give_back

    def give_back_on_loop(fairy: Any, announce: Callable[[], None]) -> None:
        from sqlalchemy.util import greenlet_spawn

        loop = getattr(getattr(fairy, "driver_connection", None), "_loop", None)

        async def invalidate() -> None:
            await greenlet_spawn(fairy.invalidate)

        _reclaim_on_loop(loop, invalidate, "sqlalchemy.reclaim", announce)

    return give_back_on_loop


def _state(fairy: Any) -> str | None:
    driver_connection = getattr(fairy, "driver_connection", None)
    return None if driver_connection is None else driver_state(driver_connection)


class SQLAlchemyAdapter(Adapter):
    name = "sqlalchemy"
    module = "sqlalchemy"
    distribution = "SQLAlchemy"
    min_version = (2, 0)

    def _install(self) -> None:
        _stack.register_library(os.path.dirname(sqlalchemy.__file__ or ""))
        greenlet_spec = _find_dir("greenlet")
        if greenlet_spec:
            _stack.register_library(greenlet_spec)
        direct = _direct_hooks_fit()
        listeners: list[tuple[str, Callable[..., None]]] = [("detach", _on_detach)]
        if not direct:
            listeners += [("checkout", _on_checkout), ("checkin", _on_checkin)]
        for name, fn in listeners:
            event.listen(Pool, name, fn)
            self.on_uninstall(functools.partial(event.remove, Pool, name, fn))
        event.listen(Engine, "do_connect", _on_do_connect)
        self.on_uninstall(functools.partial(event.remove, Engine, "do_connect", _on_do_connect))

        def make_connect(original: Any) -> Any:
            def connect(self: Any) -> Any:
                handle: PoolHandle | None = None
                token: contextvars.Token[float | None] | None = None
                if core.observer is not None:
                    try:
                        handle = _handle(self)
                        since = core.wait_start(handle)
                        if since is not None:
                            token = _since.set(since)
                    except Exception as err:
                        internal_error("sqlalchemy.checkout", err)
                try:
                    return original(self)
                except exc.TimeoutError as err:
                    _timed_out(self, err)
                    raise
                finally:
                    if token is not None and handle is not None:
                        _since.reset(token)
                        core.wait_end(handle)

            return connect

        def make_engine_created(original: Any) -> Any:
            def engine_created(cls: Any, engine: Any) -> None:
                try:
                    _handle(engine.pool).rename(_engine_name(engine))
                except Exception as err:
                    internal_error("sqlalchemy.engine_created", err)
                original(cls, engine)

            return engine_created

        def make_dispose(original: Any) -> Any:
            def dispose(self: Any, *args: Any, **kwargs: Any) -> None:
                old = self.pool
                try:
                    core.pool_closed(_handle(old), "engine.dispose()")
                except Exception as err:
                    internal_error("sqlalchemy.dispose", err)
                original(self, *args, **kwargs)
                try:
                    if self.pool is not old:
                        _handle(self.pool).rename(_handle(old).name)
                except Exception as err:
                    internal_error("sqlalchemy.dispose", err)

            return dispose

        if direct:
            self.patch(_ConnectionFairy, "_checkout", _make_checkout)
            self.patch(Pool, "_return_conn", _make_return_conn)
        else:
            self.patch(Pool, "connect", make_connect)
        self.patch(_ConnectionRecord, "_ConnectionRecord__connect", _record_connect)
        # Not ``Engine.__init__``: ``create_engine()`` reads the keywords it accepts off the
        # code object of ``Engine.__init__`` itself, and a wrapper's ``*args, **kwargs`` would
        # make it refuse ``execution_options=``, ``logging_name=`` and the rest.
        self.patch(Dialect, "engine_created", make_engine_created)
        self.patch(Engine, "dispose", make_dispose)
        self.patch_scope(Connection, "__enter__", _make_enter)
        self.patch_scope(Connection, "__exit__", _make_exit)
        self.when_imported("sqlalchemy.ext.asyncio", self._install_asyncio)
        core.register_kind(
            self.name, PoolKind(stats=_stats, target=_target, state=_state, reclaim=_reclaim)
        )

    def _install_asyncio(self) -> None:
        from sqlalchemy.ext.asyncio import AsyncConnection

        self.patch_scope(AsyncConnection, "__aenter__", _make_aenter)
        self.patch_scope(AsyncConnection, "__aexit__", _make_aexit)


def _find_dir(module: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations), None)
