"""SQLAlchemy adapter: sync ``Engine`` and asyncio ``AsyncEngine``, every pool class.

Hooks, and why each:

* Pool events ``checkout`` / ``checkin`` / ``detach``, listened on the ``Pool`` class so that
  engines created before ``install()`` are covered too. ``checkout`` fires once per fairy
  (nested checkouts of one connection do not re-fire), ``checkin`` once when it comes back.
  The lease rides in ``ConnectionPoolEntry.info``, which lives as long as the DBAPI connection,
  so a checkin in another task than the checkout (``async with engine.connect()`` closes in a
  new task) still finds it.
* Garbage-collected fairies: sync pools reset them and fire ``checkin`` from a weakref callback;
  async pools fire ``detach`` and no ``checkin``. The core sees in both cases that the
  user-facing fairy is dead and reports ``leak.collected``.
* ``Pool.connect`` is wrapped only to see ``sqlalchemy.exc.TimeoutError`` (``QueuePool limit of
  size N overflow M reached``), the moment to dump every holder: no pool event exists for it.
* ``Engine.__init__`` and ``Engine.dispose`` give the pool a readable name (the URL, password
  hidden) and tell the core when a pool is disposed with connections still out.
"""

from __future__ import annotations

import functools
import os
from typing import Any

try:
    import sqlalchemy
    from sqlalchemy import event, exc
    from sqlalchemy.engine import Engine
    from sqlalchemy.pool import Pool
except ImportError as _exc:  # pragma: no cover - exercised by users without SQLAlchemy
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("SQLAlchemy is not installed") from _exc

from pgleak import _stack
from pgleak._adapter import Adapter
from pgleak._core import PoolHandle, core
from pgleak._guard import internal_error
from pgleak._redact import redact_dsn

__all__ = ["SQLAlchemyAdapter"]

_KEY = "_pgleak_lease"
_KIND = "sqlalchemy"


def _pool_name(pool: Any) -> str:
    dialect: Any = getattr(pool, "_dialect", None)
    name = getattr(dialect, "name", None)
    driver = f" {name}+{getattr(dialect, 'driver', '?')}" if name else ""
    return f"sqlalchemy {type(pool).__name__}@{id(pool):#x}{driver}"


def _handle(pool: Any) -> PoolHandle:
    return core.pool(pool, _KIND, _pool_name)


def _engine_name(engine: Any) -> str:
    return redact_dsn(str(engine.url.render_as_string(hide_password=True)))


def _on_checkout(dbapi_connection: Any, record: Any, proxy: Any) -> None:
    try:
        lease = core.checkout(_handle(proxy._pool), proxy)
        if lease is not None:
            record.info[_KEY] = lease
    except Exception as err:
        internal_error("sqlalchemy.checkout", err)


def _on_checkin(dbapi_connection: Any, record: Any) -> None:
    try:
        lease = record.info.pop(_KEY, None)
        if lease is not None:
            core.checkin(lease)
    except Exception as err:
        internal_error("sqlalchemy.checkin", err)


def _on_detach(dbapi_connection: Any, record: Any) -> None:
    try:
        lease = record.info.pop(_KEY, None)
        if lease is not None:
            core.discard(lease)
    except Exception as err:
        internal_error("sqlalchemy.detach", err)


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
        for name, fn in (
            ("checkout", _on_checkout),
            ("checkin", _on_checkin),
            ("detach", _on_detach),
        ):
            event.listen(Pool, name, fn)
            self.on_uninstall(functools.partial(event.remove, Pool, name, fn))

        def make_connect(original: Any) -> Any:
            def connect(self: Any) -> Any:
                try:
                    return original(self)
                except exc.TimeoutError as err:
                    try:
                        # The pool waited its whole timeout; no clock is read on the hot path.
                        waited = getattr(self, "_timeout", None)
                        core.exhausted(_handle(self), waited, str(err))
                    except Exception as inner:
                        internal_error("sqlalchemy.exhausted", inner)
                    raise

            return connect

        def make_init(original: Any) -> Any:
            def __init__(self: Any, pool: Any, *args: Any, **kwargs: Any) -> None:
                original(self, pool, *args, **kwargs)
                try:
                    _handle(self.pool).rename(_engine_name(self))
                except Exception as err:
                    internal_error("sqlalchemy.engine_init", err)

            return __init__

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

        self.patch(Pool, "connect", make_connect)
        self.patch(Engine, "__init__", make_init)
        self.patch(Engine, "dispose", make_dispose)


def _find_dir(module: str) -> str | None:
    import importlib.util

    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.submodule_search_locations:
        return None
    return next(iter(spec.submodule_search_locations), None)
