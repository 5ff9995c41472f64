"""Django adapter: per-request and persistent connections, Django's native pool, the request.

Django lends no connection from a pool of its own: each thread (each ASGI request) has one
``DatabaseWrapper`` per alias, which opens a server connection on first use and closes it when
the request ends (``CONN_MAX_AGE = 0``), keeps it for the thread's next request
(``CONN_MAX_AGE > 0``), or borrows it from a ``psycopg_pool.ConnectionPool`` (Django 5.1+,
``OPTIONS["pool"]``). So pgleak's checkout is a *use span* of a wrapper's connection: from the
first use after it was opened or parked until Django closes it or parks it at a request
boundary. Every request, command or thread that uses the database is one span; a span that
outlives its request, its thread or ``leak_threshold`` is what gets reported. The rules, per
mode, are in ``docs/django.md``.

Hooks, and why each:

* ``DatabaseWrapper.ensure_connection`` (postgresql backend): every query, cursor and
  ``atomic()`` goes through it, so the first one after a connect or a park is the checkout,
  with the user's line on the stack. Nothing happens on later calls but a dict lookup.
* ``DatabaseWrapper.close``: the checkin (also when closed inside an ``atomic()`` block,
  which closes the driver connection but keeps the wrapper's reference to it).
* ``DatabaseWrapper.close_if_unusable_or_obsolete``: Django's request boundary
  (``close_old_connections``, run on ``request_started``/``request_finished`` and by Celery
  around tasks). Its own ``ensure_connection`` calls are not checkouts; a connection it keeps
  (persistent) is *parked*: checked in, since the thread's next request reuses it - unless
  the thread ends with the request (ASGI runs each request's sync code in a thread of its
  own): then nothing will ever reuse or close it, and the span stays open to be reported.
* ``DatabaseWrapper.get_new_connection``: a direct connect is retried while the server is
  full (:func:`pgleak._retry.retry_connect`, inside Django's error wrapper, so a final refusal
  reaches the application exactly as without pgleak). In pool mode the pool connects, in its
  own workers with its own backoff; the psycopg_pool adapter makes the checkout and this hook
  only names the pool, tags its connect arguments and lets the lease say the transaction state.
  Either way the driver's ``connect()`` run inside it is marked as the adapter's own, so it
  is not also tracked as a direct connection.
* ``DatabaseWrapper.get_connection_params``: the ``application_name`` tag, as libpq's
  ``fallback_application_name`` (the user's ``OPTIONS["application_name"]`` or ``PGAPPNAME``
  wins). Not in pool mode: the pool keeps the arguments for the process's life, so they are
  tagged per process (a forked worker gets its own pid) where the pool connects.
* ``BaseHandler.get_response`` / ``get_response_async``: the request (``GET /orders/42/``)
  becomes ``pgleak.context()`` for the checkouts made while it is handled. A context variable
  set here reaches sync views under ASGI too (``sync_to_async`` copies the context), which a
  ``request_started`` receiver cannot do. ``BaseHandler.resolve_request`` adds the view.
* ``BaseCommand.execute``: ``command <name>`` as the context of a management command.
"""

from __future__ import annotations

import functools
import logging
import os
import threading
import weakref
from collections.abc import Callable, Mapping
from typing import Any

try:
    import django
except ImportError as _exc:  # pragma: no cover - exercised by users without Django
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("Django is not installed") from _exc

from pgleak import _retry, _stack
from pgleak._adapter import Adapter, tag
from pgleak._appname import tags
from pgleak._cledger import vars_set
from pgleak._core import Lease, PoolHandle, core
from pgleak._core import context as _context
from pgleak._guard import internal_error, say
from pgleak.integrations._direct import pool_call

__all__ = ["DjangoAdapter"]

_log = logging.getLogger("pgleak")
_KIND = "django"

# Per-wrapper state, in the wrapper's own __dict__ (one wrapper per thread and alias).
_LEASE = "_pgleak_lease"  # the open use span, if pgleak made it
_POOLED = "_pgleak_pooled"  # the connection came from a pool that pgleak tracks itself
_HOUSEKEEPING = "_pgleak_housekeeping"  # inside close_if_unusable_or_obsolete()
_LABEL = "_pgleak_label"  # on the request: the context label its handler set

#: The longest request label kept (method and path); a path is the client's to choose.
_MAX_LABEL = 200

# libpq's PQtransactionStatus, in pg_stat_activity's words.
_TX_STATES = {
    0: "idle",
    1: "active",
    2: "idle in transaction",
    3: "idle in transaction (aborted)",
    4: "broken",
}


# -- the "pool" of a non-pooled alias ------------------------------------------------------------


class _Database:
    """One Django database alias of this process: what its direct connections are lent from."""

    __slots__ = ("__weakref__", "alias", "settings")

    def __init__(self, alias: str, settings: Mapping[str, Any]) -> None:
        self.alias = alias
        self.settings = settings


_databases: dict[str, _Database] = {}


def _target(settings: Mapping[str, Any]) -> str:
    """``host=db port=5432 dbname=shop user=app``: where an alias connects; never a password."""
    options = settings.get("OPTIONS") or {}
    parts = [
        f"{key}={value}"
        for key, value in (
            ("service", options.get("service")),
            ("host", settings.get("HOST")),
            ("port", settings.get("PORT")),
            ("dbname", settings.get("NAME")),
            ("user", settings.get("USER")),
        )
        if value
    ]
    return " ".join(parts)


def _database_name(db: _Database) -> str:
    target = _target(db.settings)
    return f"django {db.alias!r}" + (f" ({target})" if target else "")


def _database(wrapper: Any) -> PoolHandle:
    alias = wrapper.alias
    db = _databases.get(alias)
    if db is None:
        db = _databases.setdefault(alias, _Database(alias, wrapper.settings_dict))
    return core.pool(db, _KIND, _database_name)


# -- the connection's state, read at report time -----------------------------------------------


class _Probe:
    """Says what a leased connection is doing, from the watchdog thread, without any I/O.

    Holds only weak references: a strong one to the wrapper or the driver connection would
    keep a dropped connection alive, and ``leak.collected`` would never come.
    """

    __slots__ = ("conn", "wrapper")

    def __init__(self, wrapper: Any, conn: Any) -> None:
        self.wrapper = weakref.ref(wrapper)
        self.conn = weakref.ref(conn)

    def __call__(self) -> str | None:
        conn = self.conn()
        if conn is None:
            return None
        if conn.closed:
            return "closed"
        pgconn = getattr(conn, "pgconn", None)  # psycopg 3; psycopg2 has its own accessor
        status = pgconn.transaction_status if pgconn is not None else conn.get_transaction_status()
        state = _TX_STATES.get(int(status), f"transaction status {status}")
        wrapper = self.wrapper()
        if status in (2, 3) and wrapper is not None and wrapper.connection is conn:
            if wrapper.in_atomic_block:
                state += ", inside transaction.atomic()"
            elif not wrapper.autocommit:
                state += ", autocommit off"
        return state


# -- checkout, checkin, park ---------------------------------------------------------------------


def _check_out(wrapper: Any) -> None:
    conn = wrapper.connection
    try:
        lease = core.checkout(_database(wrapper), conn)
        if lease is None:
            return
        lease.probe = _Probe(wrapper, conn)
        wrapper.__dict__[_LEASE] = lease
    except Exception as exc:
        internal_error("django.checkout", exc)
        return
    if tags.call_site:
        tag(conn, lease, _KIND)


def _check_in(wrapper: Any) -> None:
    state = wrapper.__dict__
    state.pop(_POOLED, None)
    lease: Lease | None = state.pop(_LEASE, None)
    if lease is not None:
        try:
            core.checkin(lease)
        except Exception as exc:
            internal_error("django.checkin", exc)


def _ensure_connection(original: Any) -> Any:
    def ensure_connection(self: Any) -> None:
        original(self)
        state = self.__dict__
        if (
            state.get(_LEASE) is None
            and not state.get(_POOLED)
            and not state.get(_HOUSEKEEPING)
            and self.connection is not None
            and not self.closed_in_transaction
        ):
            _check_out(self)

    return ensure_connection


def _close(original: Any) -> Any:
    def close(self: Any) -> None:
        # Kept alive until the checkin: the core takes a connection already garbage-collected
        # at checkin for one that was dropped, not closed.
        conn = self.connection
        try:
            original(self)
        finally:
            # Also after a failed close: Django has let go of the connection either way.
            if conn is not None and (self.connection is None or self.closed_in_transaction):
                _check_in(self)

    return close


#: asgiref's per-context thread executors (set in ``_install``).
_thread_sensitive_context: Any = None
_context_executors: Any = None
_warned_asgi: set[str] = set()


def _thread_ends_with_request() -> bool:
    """True in the thread ASGI runs one request's sync code in: it ends with the request.

    Django's ``ASGIHandler`` wraps each request in asgiref's ``ThreadSensitiveContext``, whose
    single-thread executor is created for the request and shut down after it. A connection
    parked there is never reused; it stays open until the garbage collector frees it.
    """
    if _thread_sensitive_context is None:
        return False
    request_context = _thread_sensitive_context.get(None)
    if request_context is None or getattr(request_context, "_executor", None) is not None:
        return False  # none, or an executor its creator keeps (and reuses)
    executor = _context_executors.get(request_context)
    return threading.current_thread() in getattr(executor, "_threads", ())


def _park(wrapper: Any) -> None:
    if not _thread_ends_with_request():
        _check_in(wrapper)
        return
    alias = wrapper.alias
    if alias not in _warned_asgi:
        _warned_asgi.add(alias)
        say(
            _log,
            logging.WARNING,
            "pgleak: Django database %r keeps connections open after a request "
            "(CONN_MAX_AGE=%r), but under ASGI each request runs in a thread of its own that "
            "ends with it: every such connection stays open, unused, until the garbage "
            "collector frees it, and pgleak reports each one as held by a finished holder. "
            "Use CONN_MAX_AGE=0, or Django's connection pool (OPTIONS['pool'])",
            alias,
            wrapper.settings_dict.get("CONN_MAX_AGE"),
        )


def _housekeeping(original: Any) -> Any:
    def close_if_unusable_or_obsolete(self: Any) -> None:
        state = self.__dict__
        state[_HOUSEKEEPING] = True
        try:
            original(self)
        finally:
            state[_HOUSEKEEPING] = False
            if state.get(_LEASE) is not None and self.connection is not None:
                try:
                    _park(self)
                except Exception as exc:
                    internal_error("django.park", exc)

    return close_if_unusable_or_obsolete


# -- connecting: retry, the native pool, application_name ----------------------------------------


def _pool_of(wrapper: Any) -> Any:
    """The native pool the wrapper connects through, or ``None`` (direct connections)."""
    if not _HAS_POOL or not (wrapper.settings_dict.get("OPTIONS") or {}).get("pool"):
        return None
    try:
        return wrapper.pool
    except Exception:
        return None  # misconfigured: Django raises its own error when it connects


_named_pools: weakref.WeakSet[Any] = weakref.WeakSet()


def _prepare_pool(wrapper: Any, pool: Any) -> None:
    """Name Django's pool after its alias, and tag its connect arguments, before it opens."""
    try:
        tags.tag_pool_kwargs(pool, "kwargs", None, tags.libpq_kwargs)
        if pool not in _named_pools:
            _named_pools.add(pool)
            target = _target(wrapper.settings_dict)
            name = f"django {wrapper.alias!r} {getattr(pool, 'name', 'pool')}"
            core.pool(pool, "psycopg_pool").rename(f"{name} ({target})" if target else name)
    except Exception as exc:
        internal_error("django.pool", exc)


def _adopt_pool_lease(wrapper: Any, conn: Any) -> None:
    """Give the psycopg_pool adapter's lease the transaction state; make no second lease."""
    try:
        lease = core.lease_of(conn)
        if lease is not None:
            lease.probe = _Probe(wrapper, conn)
            wrapper.__dict__[_POOLED] = True
    except Exception as exc:
        internal_error("django.pool", exc)


def _get_new_connection(original: Any) -> Any:
    def get_new_connection(self: Any, conn_params: Any) -> Any:
        pool = _pool_of(self)
        if pool is not None:
            _prepare_pool(self, pool)
            conn = pool_call(original, self, conn_params)
            _adopt_pool_lease(self, conn)
            return conn
        return _retry.retry_connect(
            functools.partial(pool_call, original, self, conn_params),
            pool=functools.partial(_database, self),
        )

    return get_new_connection


def _get_connection_params(original: Any) -> Any:
    def get_connection_params(self: Any) -> Any:
        params = original(self)
        if not tags.enabled:
            return params
        try:
            if _HAS_POOL and (self.settings_dict.get("OPTIONS") or {}).get("pool"):
                return params  # the pool's arguments: tagged in _prepare_pool, per process
            tagged = tags.libpq_kwargs(None, params)
        except Exception as exc:
            internal_error("django.application_name", exc)
            return params
        return params if tagged is None else tagged

    return get_connection_params


# -- what the code holding a connection is doing -------------------------------------------------


def _printable(label: str) -> str:
    if len(label) <= _MAX_LABEL and label.isprintable():
        return label
    return "".join(ch if ch.isprintable() else "?" for ch in label[:_MAX_LABEL])


def _enter_request(request: Any) -> Any:
    """Set the request as the context of the checkouts made for it; the token to reset."""
    try:
        label = _printable(f"{request.method} {request.path}")
        setattr(request, _LABEL, label)
        vars_set()
        return _context.set(label)
    except Exception as exc:
        internal_error("django.request", exc)
        return None


def _leave(token: Any) -> None:
    if token is not None:
        try:
            _context.reset(token)
        except Exception as exc:
            internal_error("django.request", exc)


def _get_response(original: Any) -> Any:
    def get_response(self: Any, request: Any) -> Any:
        token = _enter_request(request)
        try:
            return original(self, request)
        finally:
            _leave(token)

    return get_response


def _get_response_async(original: Any) -> Any:
    async def get_response_async(self: Any, request: Any) -> Any:
        token = _enter_request(request)
        try:
            return await original(self, request)
        finally:
            _leave(token)

    return get_response_async


def _resolve_request(original: Any) -> Any:
    def resolve_request(self: Any, request: Any) -> Any:
        resolved = original(self, request)
        try:
            label = getattr(request, _LABEL, None)
            # Only over the label this request's handler set, not a user's pgleak.context().
            if label is not None and _context.get() is label:
                view = getattr(request.resolver_match, "_func_path", None)
                if view:
                    # Not reset here: get_response's reset puts back what was there before.
                    vars_set()
                    _context.set(_printable(f"{label} ({view})"))
        except Exception as exc:
            internal_error("django.request", exc)
        return resolved

    return resolve_request


def _execute(original: Any) -> Any:
    def execute(self: Any, *args: Any, **options: Any) -> Any:
        token = None
        try:
            vars_set()
            token = _context.set(f"command {type(self).__module__.rpartition('.')[2]}")
        except Exception as exc:
            internal_error("django.command", exc)
        try:
            return original(self, *args, **options)
        finally:
            _leave(token)

    return execute


# -- installation --------------------------------------------------------------------------------

_HAS_POOL = False


class DjangoAdapter(Adapter):
    name = "django"
    module = "django"
    distribution = "django"
    min_version = (4, 2)

    def _install(self) -> None:
        global _HAS_POOL, _context_executors, _thread_sensitive_context
        import asgiref
        from asgiref.sync import SyncToAsync
        from django.core.handlers.base import BaseHandler
        from django.core.management.base import BaseCommand

        _stack.register_library(os.path.dirname(django.__file__ or ""))
        _stack.register_library(os.path.dirname(asgiref.__file__ or ""))
        _thread_sensitive_context = getattr(SyncToAsync, "thread_sensitive_context", None)
        _context_executors = getattr(SyncToAsync, "context_to_thread_executor", {})

        self.patch(BaseHandler, "get_response", _get_response)
        self.patch(BaseHandler, "get_response_async", _get_response_async)
        self.patch(BaseHandler, "resolve_request", _resolve_request)
        self.patch(BaseCommand, "execute", _execute)

        try:
            from django.db.backends.postgresql.base import DatabaseWrapper
        except Exception as exc:  # no psycopg/psycopg2: Django cannot use PostgreSQL here
            say(
                _log,
                logging.DEBUG,
                "pgleak: Django's postgresql backend is not importable: %s",
                exc,
            )
            return
        _HAS_POOL = hasattr(DatabaseWrapper, "pool")
        hooks: tuple[tuple[str, Callable[[Any], Any]], ...] = (
            ("ensure_connection", _ensure_connection),
            ("close", _close),
            ("close_if_unusable_or_obsolete", _housekeeping),
            ("get_new_connection", _get_new_connection),
            ("get_connection_params", _get_connection_params),
        )
        for attr, make in hooks:
            self.patch(DatabaseWrapper, attr, make)
