"""psycopg 3 direct connections: ``psycopg.connect()``, ``Connection.connect()`` and
``AsyncConnection.connect()`` outside any pool (:mod:`pgleak.integrations._direct`).

Hooks, and why each:

* ``Connection.connect`` / ``AsyncConnection.connect`` (classmethods): where every psycopg 3
  connection is opened, subclasses' and psycopg_pool's included (the pool's ``_connect``
  marks its own as the pool's). The connect arguments get the ``application_name`` tag as
  ``fallback_application_name``; a connect refused because the server is full is retried.
* ``psycopg.connect``: bound to the original ``Connection.connect`` when psycopg is imported
  (``connect = Connection.connect``), so patching the class does not reach it; it is wrapped
  on its own. A ``from psycopg import connect`` made before ``install()`` keeps the original.
* ``Connection.close`` / ``AsyncConnection.close``: the checkin. ``with psycopg.connect() as
  conn`` closes through it; a pool's connection (``close()`` giving it back) is not affected.
* ``closed``, read at ``direct_threshold`` and at exit: a connection the server broke counts
  as closed then. One the server broke and the application then dropped without ``close()``
  is reported as ``leak.collected`` (psycopg itself stays silent about it).
"""

from __future__ import annotations

import os
from typing import Any

try:
    import psycopg
    from psycopg import AsyncConnection, Connection
    from psycopg.conninfo import make_conninfo
except ImportError as _exc:  # pragma: no cover - exercised by users without psycopg
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("psycopg is not installed") from _exc

from pgleak import _stack
from pgleak._adapter import Adapter
from pgleak._appname import tags
from pgleak._redact import redact_dsn
from pgleak.integrations._direct import Driver, checked_in

__all__ = ["PsycopgAdapter"]

#: ``Connection.connect()`` keywords that are not connection parameters.
_NOT_CONNINFO = frozenset(
    {"conninfo", "autocommit", "prepare_threshold", "context", "row_factory", "cursor_factory"}
)


def _conninfo(args: tuple[Any, ...]) -> Any:
    return args[0] if args else ""


def _target(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str:
    conninfo = kwargs.get("conninfo", _conninfo(args))
    params = {key: value for key, value in kwargs.items() if key not in _NOT_CONNINFO}
    return redact_dsn(make_conninfo(conninfo or "", **params))


def _retag(args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any] | None:
    return tags.libpq_kwargs(kwargs.get("conninfo", _conninfo(args)), kwargs)


def _is_closed(conn: Any) -> bool:
    return bool(conn.closed)


_DIRECT = Driver("psycopg.direct", describe=_target, retag=_retag, closed=_is_closed)


def _close(original: Any) -> Any:
    def close(conn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return original(conn, *args, **kwargs)
        finally:
            checked_in(_DIRECT, conn)

    return close


def _aclose(original: Any) -> Any:
    async def close(conn: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await original(conn, *args, **kwargs)
        finally:
            checked_in(_DIRECT, conn)

    return close


class PsycopgAdapter(Adapter):
    name = "psycopg"
    module = "psycopg"
    distribution = "psycopg"
    min_version = (3, 1)

    def _install(self) -> None:
        _stack.register_library(os.path.dirname(psycopg.__file__ or ""))
        self.patch(Connection, "connect", _DIRECT.wrap("psycopg.connect", skip=1))
        self.patch(
            AsyncConnection, "connect", _DIRECT.awrap("psycopg.AsyncConnection.connect", skip=1)
        )
        self.patch(psycopg, "connect", _DIRECT.wrap("psycopg.connect"))
        self.patch(Connection, "close", _close)
        self.patch(AsyncConnection, "close", _aclose)
        _DIRECT.register()
