"""psycopg 3 pools: ``ConnectionPool``, ``AsyncConnectionPool`` and their ``Null*`` variants.

Hooks, and why each:

* ``getconn`` (sync and async): the checkout. ``connection()`` is ``getconn`` + ``putconn``
  around a ``with`` block, so it is covered too, and the Null pools inherit both methods. A
  ``PoolTimeout`` here is the moment to list every holder.
* ``putconn``: the checkin. A ``ValueError`` (a connection from another pool) is no checkin.
* ``close``: whatever is still out when the pool closes is reported.

The pool keeps no reference to a lent connection (only a count), so a connection the
application drops is garbage-collected and its slot silently lost: pgleak's weak reference to
it is what turns that into a ``leak.collected`` report. Connections the pool throws away (broken,
closed by the server) are still handed to ``putconn`` by the application, which checks them in.
"""

from __future__ import annotations

import os
from typing import Any

try:
    import psycopg
    import psycopg_pool
    from psycopg_pool import AsyncConnectionPool, ConnectionPool, PoolTimeout
except ImportError as _exc:  # pragma: no cover - exercised by users without psycopg_pool
    from pgleak._adapter import AdapterUnavailable

    raise AdapterUnavailable("psycopg_pool is not installed") from _exc

from pgleak import _stack
from pgleak._adapter import Adapter
from pgleak._redact import redact_dsn

__all__ = ["PsycopgPoolAdapter"]


def _pool_name(pool: Any) -> str:
    """``pool-1 (host=db user=app dbname=shop)``: the pool's own name and its target."""
    conninfo = getattr(pool, "conninfo", "") or ""
    target = f" ({redact_dsn(conninfo)})" if conninfo else ""
    return f"{getattr(pool, 'name', type(pool).__name__)}{target}"


def _is_timeout(err: BaseException) -> bool:
    return isinstance(err, PoolTimeout)


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
                cls, "getconn", namer=_pool_name, is_timeout=_is_timeout, is_async=is_async
            )
            self.track_release(cls, "putconn", refused=(ValueError,), is_async=is_async)
            self.track_close(
                cls, "close", namer=_pool_name, detail="pool.close()", is_async=is_async
            )
