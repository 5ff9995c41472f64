"""Direct connections: a driver's own ``connect()``, outside any pool.

Scripts and workers that call ``psycopg2.connect()``, ``psycopg.connect()`` or
``asyncpg.connect()`` and never close the connection exhaust a server as surely as a leaky
pool. Each such connection is tracked like a checkout of a pool named after its DSN
(``psycopg2.connect (host=db dbname=shop user=app)``, password redacted): open is checked
out, ``close()`` is the checkin, garbage-collected unclosed is ``leak.collected`` with the line
that opened it, still open at exit is ``leak.at_exit``, and held past ``direct_threshold``
(off by default) is ``leak.suspected``. The connect gets the ``application_name`` tag and is
retried while the server refuses it for being full, as a pool's connects are.

A connect that a pool makes runs with :data:`pgleak._core.pooled` set by that pool's adapter
and is left alone here: the pool's own tracking covers it.

Each driver adapter supplies what differs: where the connect arguments are, how to tag them,
how to name the target, whether ``close()`` can be seen, and how to read ``closed`` off a
live connection (asked at a deadline and at exit only, so a connection the server broke, or
psycopg2's, whose ``close()`` is a C method no hook reaches, is not reported as open).
"""

from __future__ import annotations

import math
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from pgleak import _retry
from pgleak._adapter import atag, driver_state, driver_target, tag
from pgleak._appname import tags
from pgleak._core import Lease, PoolHandle, PoolKind, PoolStats, core, pooled, suppressed
from pgleak._guard import internal_error

__all__ = ["Driver", "apool_call", "checked_in", "pool_call"]

T = TypeVar("T")

#: The most distinct targets named; beyond it, one shared name per driver keeps memory bounded
#: (a program that connects to ever new DSNs is rare, and still gets its reports).
_MAX_TARGETS = 256


class _Target:
    """The "pool" of one driver's direct connections to one DSN; lives as long as the process."""

    __slots__ = ("__weakref__", "name")

    def __init__(self, name: str) -> None:
        self.name = name


def _target_name(target: _Target) -> str:
    return target.name


def _no_stats(_target: _Target) -> PoolStats:
    # No pool: nothing idle, no limit; in use is counted from the ledger.
    return PoolStats()


class Driver:
    """One driver's direct connections: its kind and the few facts that differ per driver.

    Args:
        kind: The pool kind (``psycopg2.direct``), also the adapter-facing name in logs.
        describe: ``(args, kwargs) -> "host=... dbname=..."`` of the connect call, no password.
        retag: ``(args, kwargs) -> kwargs`` tagged with ``application_name``, or ``None``.
        closed: Reads whether a live connection is closed.
        unseen_close: ``close()`` cannot be hooked (psycopg2): no ``leak.collected``.
    """

    def __init__(
        self,
        kind: str,
        describe: Callable[[tuple[Any, ...], dict[str, Any]], str],
        retag: Callable[[tuple[Any, ...], dict[str, Any]], dict[str, Any] | None],
        closed: Callable[[Any], bool],
        unseen_close: bool = False,
    ) -> None:
        self.kind = kind
        self.describe = describe
        self.retag = retag
        self.closed = closed
        self.unseen_close = unseen_close
        #: By name, and by the connect arguments that gave it (see :meth:`handle`).
        self._targets: dict[Any, tuple[_Target, PoolHandle]] = {}

    def handle(self, label: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> PoolHandle:
        """The handle of the target ``(args, kwargs)`` connect to, named ``label (dsn)``.

        Found by the call's own arguments when they are hashable (a program connects with the
        same few again and again), so that parsing the DSN to name it happens once per target.
        """
        key: Any = None
        try:
            key = (label, args, tuple(kwargs.items()))
            found = self._targets.get(key)
        except TypeError:  # an unhashable argument (a dict of server settings): by name only
            key = found = None
        if found is not None:
            return found[1]
        found = self._named(label, args, kwargs)
        if key is not None and len(self._targets) < _MAX_TARGETS:
            self._targets[key] = found
        return found[1]

    def _named(
        self, label: str, args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[_Target, PoolHandle]:
        try:
            where = self.describe(args, kwargs)
        except Exception as exc:  # a DSN the driver will refuse too
            internal_error(f"{self.kind}.name", exc)
            where = ""
        name = f"{label} ({where})" if where else label
        found = self._targets.get(name)
        if found is not None:
            return found
        if len(self._targets) >= _MAX_TARGETS:
            name = f"{label} (other targets)"
            found = self._targets.get(name)
            if found is not None:
                return found
        target = _Target(name)
        # No lock (a fork could inherit it held): two threads naming one new target at once
        # both build one, and setdefault keeps the first; the other's handle dies with it.
        return self._targets.setdefault(name, (target, core.pool(target, self.kind, _target_name)))

    def active(self) -> bool:
        """Whether a connect now is a direct one pgleak tracks (not a pool's, not suppressed)."""
        settings = core.settings
        return (
            settings.enabled and settings.track_direct and not pooled.get() and not suppressed.get()
        )

    def tagged(self, args: tuple[Any, ...], kwargs: dict[str, Any]) -> dict[str, Any]:
        try:
            new = self.retag(args, kwargs)
        except Exception as exc:
            internal_error(f"{self.kind}.application_name", exc)
            return kwargs
        return kwargs if new is None else new

    def opened(self, handle: PoolHandle, conn: Any) -> Lease | None:
        """Record the new connection ``conn`` as checked out of ``handle``."""
        try:
            hold = core.settings.direct_threshold
            return core.checkout(
                handle,
                conn,
                index=True,
                hold=math.inf if hold is None else hold,
                closed=self.closed,
                unseen_close=self.unseen_close,
            )
        except Exception as exc:
            internal_error(f"{self.kind}.connect", exc)
            return None

    def wrap(self, label: str, skip: int = 0) -> Callable[[Any], Any]:
        """``make`` for :meth:`Adapter.patch`: a sync ``connect(*args, **kwargs)``, tracked.

        ``skip``: leading arguments that are not connect arguments (a classmethod's ``cls``).
        """

        def make(original: Any) -> Any:
            def connect(*args: Any, **kwargs: Any) -> Any:
                if not self.active():
                    return original(*args, **kwargs)
                own = args[skip:]
                handle = self.handle(label, own, kwargs)
                params = self.tagged(own, kwargs)
                try:
                    conn = original(*args, **params)
                except Exception as exc:
                    if not _retry.worth_retrying(exc):
                        raise  # the driver's error, with no frame of pgleak's retry under it
                    conn = _retry.retry_connect(
                        lambda: original(*args, **params), pool=lambda: handle, refused=exc
                    )
                else:
                    _retry.succeeded()
                lease = self.opened(handle, conn)
                if lease is not None and tags.call_site:
                    tag(conn, lease, self.kind)
                return conn

            return connect

        return make

    def awrap(self, label: str, skip: int = 0) -> Callable[[Any], Any]:
        """:meth:`wrap` for a coroutine function ``connect``."""

        def make(original: Any) -> Any:
            async def connect(*args: Any, **kwargs: Any) -> Any:
                if not self.active():
                    return await original(*args, **kwargs)
                own = args[skip:]
                handle = self.handle(label, own, kwargs)
                params = self.tagged(own, kwargs)
                conn = await _retry.aretry_connect(
                    lambda: original(*args, **params), pool=lambda: handle
                )
                lease = self.opened(handle, conn)
                if lease is not None and tags.call_site:
                    await atag(None, conn, lease, _aclose, self.kind)
                return conn

            return connect

        return make

    def register(self) -> None:
        core.register_kind(
            self.kind, PoolKind(stats=_no_stats, target=driver_target, state=driver_state)
        )


async def _aclose(conn: Any) -> None:
    """What a tag cut short by a cancellation does with the connection nobody will see."""
    await conn.close()


def checked_in(driver: Driver, conn: Any) -> None:
    """``conn`` was closed: the end of its direct lease, if it has one (never a pool's)."""
    try:
        lease = core.lease_of(conn)
        if lease is not None and lease.pool.kind == driver.kind:
            core.checkin(lease)
    except Exception as exc:
        internal_error(f"{driver.kind}.close", exc)


def pool_call(fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
    """``fn(*args, **kwargs)``: a pool's own connect, whose driver ``connect()`` is not direct."""
    token = pooled.set(True)
    try:
        return fn(*args, **kwargs)
    finally:
        pooled.reset(token)


async def apool_call(fn: Callable[..., Awaitable[T]], *args: Any, **kwargs: Any) -> T:
    """:func:`pool_call` for a coroutine function."""
    token = pooled.set(True)
    try:
        return await fn(*args, **kwargs)
    finally:
        pooled.reset(token)
