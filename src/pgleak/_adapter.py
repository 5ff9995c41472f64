"""What every adapter shares: exact patching and un-patching, listeners, a version check.

An adapter's own module only says which of its library's events mean "checkout", "checkin",
"discarded", "exhausted" and "closed", and forwards them to the core. The bookkeeping that makes
``install()`` idempotent and ``uninstall()`` exact lives here, once:

* each patch is recorded as (owner, attribute, what was in the owner's ``__dict__``, wrapper);
  uninstall puts back exactly that object, or deletes the attribute if the owner had inherited
  it, and leaves alone (with a warning) an attribute someone re-wrapped after us;
* each listener is recorded with a callable that removes it.
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, ClassVar

from pgleak._appname import tags
from pgleak._core import allowance, core
from pgleak._guard import internal_error

__all__ = ["Adapter", "AdapterUnavailable"]

_log = logging.getLogger("pgleak")
_MISSING = object()


class AdapterUnavailable(RuntimeError):
    """The adapter's library is not installed, or is a version pgleak does not support."""

    __module__ = "pgleak"


def _version_tuple(text: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in text.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        if not digits:
            break
        parts.append(int(digits))
        if not piece.isdigit():
            break
    return tuple(parts)


def tag(conn: Any, lease: Any, kind: str) -> None:
    """Tag a sync checkout with its line (``app_name_call_site``); never raises an error."""
    try:
        tags.tag_checkout(conn, lease)
    except Exception as exc:
        internal_error(f"{kind}.application_name", exc)


async def atag(
    pool: Any, conn: Any, lease: Any, give_back: Callable[[Any], Awaitable[Any]], kind: str
) -> None:
    """Tag an asyncio checkout with its line; never raises an error of its own.

    A cancellation (``asyncio.timeout()`` around the acquire, say) arrives while the
    connection is already out: it is given back to the pool before the cancellation goes on,
    since the caller will never see it to release it.
    """
    try:
        await tags.atag_checkout(conn, lease)
    except Exception as exc:
        internal_error(f"{kind}.application_name", exc)
    except BaseException:
        try:
            await give_back(conn)
        except Exception as exc:
            internal_error(f"{kind}.application_name", exc)
        raise


class Adapter:
    """Base class of the per-library adapters; subclasses implement ``_install``.

    Attributes:
        name: The adapter's name in ``integrations=`` and in reports.
        module: The top-level module whose import makes the adapter installable.
        distribution: The PyPI distribution whose version is checked.
        min_version: The oldest supported version.
    """

    name: ClassVar[str]
    module: ClassVar[str]
    distribution: ClassVar[str]
    min_version: ClassVar[tuple[int, ...]] = ()

    def __init__(self) -> None:
        self._patches: list[tuple[Any, str, Any, Any]] = []
        self._undo: list[Callable[[], None]] = []
        self.installed = False

    def check_version(self) -> None:
        try:
            version = metadata.version(self.distribution)
        except metadata.PackageNotFoundError:
            return  # vendored or renamed; trust the import
        if self.min_version and _version_tuple(version) < self.min_version:
            wanted = ".".join(map(str, self.min_version))
            raise AdapterUnavailable(
                f"{self.distribution} {version} is older than pgleak supports (>= {wanted})"
            )

    def install(self) -> None:
        if self.installed:
            return
        self.check_version()
        try:
            self._install()
        except BaseException:
            self.uninstall()
            raise
        self.installed = True

    def uninstall(self) -> None:
        for undo in reversed(self._undo):
            try:
                undo()
            except Exception as exc:  # a library that refuses to remove a listener
                _log.warning("pgleak: could not remove a %s hook: %s", self.name, exc)
        self._undo.clear()
        for owner, attr, original, wrapper in reversed(self._patches):
            current = owner.__dict__.get(attr, _MISSING)
            if current is not wrapper:
                _log.warning(
                    "pgleak: %s.%s was replaced after pgleak patched it; leaving it as it is",
                    getattr(owner, "__qualname__", owner),
                    attr,
                )
                continue
            if original is _MISSING:
                delattr(owner, attr)
            else:
                setattr(owner, attr, original)
        self._patches.clear()
        self.installed = False

    # -- helpers for subclasses --------------------------------------------------------------

    def _install(self) -> None:
        raise NotImplementedError

    def patch(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        """Replace ``owner.attr`` with ``make(original)``, to be restored exactly later."""
        original = owner.__dict__.get(attr, _MISSING)
        current = getattr(owner, attr)
        inner = current.__func__ if isinstance(original, (classmethod, staticmethod)) else current
        wrapper = make(inner)
        functools.update_wrapper(wrapper, inner)
        wrapper.__pgleak_wrapped__ = True
        if isinstance(original, classmethod):
            wrapper = classmethod(wrapper)
        elif isinstance(original, staticmethod):
            wrapper = staticmethod(wrapper)
        setattr(owner, attr, wrapper)
        self._patches.append((owner, attr, original, wrapper))

    def on_uninstall(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def originals(self) -> list[tuple[Any, str, Any]]:
        """``(owner, attribute, original)`` for every patch in place; for tests."""
        return [(owner, attr, original) for owner, attr, original, _ in self._patches]

    # -- the shapes most pools have: acquire / release / close -------------------------------
    #
    # A pool that lends out the connection object itself (psycopg_pool, psycopg2, asyncpg)
    # needs the same three wrappers; they live here, once, with the rule they all follow: the
    # user's call runs outside pgleak's guard and its result or exception passes through
    # untouched; pgleak's bookkeeping runs inside the guard.

    def track_acquire(
        self,
        owner: Any,
        attr: str,
        *,
        namer: Callable[[Any], str],
        is_timeout: Callable[[BaseException], bool],
        timeout_arg: int | None = 0,
        is_async: bool = False,
        give_back: str | None = None,
    ) -> None:
        """Wrap ``owner.attr(pool, ...) -> connection``: a checkout, or a timed-out wait.

        Args:
            owner: The pool class.
            attr: The acquiring method.
            namer: Gives a pool its readable name, at report time.
            is_timeout: Whether an exception from the method means the wait ran out.
            timeout_arg: Position of the method's ``timeout`` argument (also looked up by
                name, then as ``pool.timeout``), to say how long the wait was; ``None``: the
                method does not wait.
            is_async: The method is a coroutine function.
            give_back: The pool's method that takes a connection back (``putconn``); given,
                checkouts are also tagged with their line when ``app_name_call_site`` is on
                (outside the pool's locks: the method must not hold one), and a tag cut short
                by a cancellation gives the connection back before the cancellation goes on.
        """
        kind = self.name

        def checked_out(pool: Any, conn: Any) -> Any:
            try:
                return core.checkout(core.pool(pool, kind, namer), conn, index=True)
            except Exception as exc:
                internal_error(f"{kind}.checkout", exc)
                return None

        def gave_up(
            pool: Any, err: BaseException, args: tuple[Any, ...], kwargs: dict[str, Any]
        ) -> None:
            try:
                if is_timeout(err):
                    waited: Any = None
                    if timeout_arg is not None:
                        waited = kwargs.get("timeout")
                        if waited is None and len(args) > timeout_arg:
                            waited = args[timeout_arg]
                        if waited is None:
                            waited = getattr(pool, "timeout", None)
                    if isinstance(waited, bool) or not isinstance(waited, (int, float)):
                        waited = None
                    core.exhausted(
                        core.pool(pool, kind, namer), waited, f"{type(err).__name__}: {err}"
                    )
            except Exception as exc:
                internal_error(f"{kind}.exhausted", exc)

        if is_async:

            def make(original: Any) -> Any:
                async def acquire(pool: Any, *args: Any, **kwargs: Any) -> Any:
                    try:
                        conn = await original(pool, *args, **kwargs)
                    except BaseException as err:
                        gave_up(pool, err, args, kwargs)
                        raise
                    lease = checked_out(pool, conn)
                    if give_back is not None and tags.call_site and lease is not None:
                        await atag(pool, conn, lease, getattr(pool, give_back), kind)
                    return conn

                return acquire

        else:

            def make(original: Any) -> Any:
                def acquire(pool: Any, *args: Any, **kwargs: Any) -> Any:
                    try:
                        conn = original(pool, *args, **kwargs)
                    except BaseException as err:
                        gave_up(pool, err, args, kwargs)
                        raise
                    lease = checked_out(pool, conn)
                    if give_back is not None and tags.call_site and lease is not None:
                        tag(conn, lease, kind)
                    return conn

                return acquire

        self.patch(owner, attr, make)

    def track_release(
        self,
        owner: Any,
        attr: str,
        *,
        conn_param: str = "conn",
        refused: tuple[type[BaseException], ...] = (),
        is_async: bool = False,
    ) -> None:
        """Wrap ``owner.attr(pool, conn, ...)``: the connection is back.

        It counts as back when the call returns, and also when it fails for any reason but
        one in ``refused`` (the pool's "not my connection"): the user has let go of it, and a
        failed reset is the pool's business, not a leak.
        """
        kind = self.name

        def lease_of(conn: Any) -> Any:
            # Looked up before the pool has the connection back: a pool may lend the same
            # object to a waiting thread at once, whose new lease must not be the one closed.
            try:
                return core.lease_of(conn)
            except Exception as exc:
                internal_error(f"{kind}.checkin", exc)
                return None

        def checked_in(lease: Any) -> None:
            if lease is None:
                return
            try:
                core.checkin(lease)
            except Exception as exc:
                internal_error(f"{kind}.checkin", exc)

        def conn_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
            return args[0] if args else kwargs.get(conn_param)

        if is_async:

            def make(original: Any) -> Any:
                async def release(pool: Any, *args: Any, **kwargs: Any) -> Any:
                    lease = lease_of(conn_of(args, kwargs))
                    try:
                        result = await original(pool, *args, **kwargs)
                    except refused:
                        raise
                    except BaseException:
                        checked_in(lease)
                        raise
                    checked_in(lease)
                    return result

                return release

        else:

            def make(original: Any) -> Any:
                def release(pool: Any, *args: Any, **kwargs: Any) -> Any:
                    lease = lease_of(conn_of(args, kwargs))
                    try:
                        result = original(pool, *args, **kwargs)
                    except refused:
                        raise
                    except BaseException:
                        checked_in(lease)
                        raise
                    checked_in(lease)
                    return result

                return release

        self.patch(owner, attr, make)

    def track_close(
        self,
        owner: Any,
        attr: str,
        *,
        namer: Callable[[Any], str],
        detail: str,
        is_async: bool = False,
    ) -> None:
        """Wrap ``owner.attr(pool, ...)``: report what the pool still lends out, then close."""
        kind = self.name

        def closing(pool: Any) -> None:
            try:
                core.pool_closed(core.pool(pool, kind, namer), detail)
            except Exception as exc:
                internal_error(f"{kind}.close", exc)

        if is_async:

            def make(original: Any) -> Any:
                async def close(pool: Any, *args: Any, **kwargs: Any) -> Any:
                    closing(pool)
                    return await original(pool, *args, **kwargs)

                return close

        else:

            def make(original: Any) -> Any:
                def close(pool: Any, *args: Any, **kwargs: Any) -> Any:
                    closing(pool)
                    return original(pool, *args, **kwargs)

                return close

        self.patch(owner, attr, make)

    def hold_unlimited(self, owner: Any, attrs: tuple[str, ...], *, is_async: bool) -> None:
        """Wrap pool methods that check out and return a connection by themselves.

        ``asyncpg.Pool.fetch()`` and its kin acquire, query and release inside one call: the
        pool is never the user's to leak, so such checkouts are tracked (they hold a slot, and
        a ``pool.exhausted`` report must list them) but never reported as held too long.
        """
        for attr in attrs:
            if attr not in owner.__dict__:
                continue
            if is_async:

                def make(original: Any) -> Any:
                    async def shortcut(*args: Any, **kwargs: Any) -> Any:
                        token = allowance.set(math.inf)
                        try:
                            return await original(*args, **kwargs)
                        finally:
                            allowance.reset(token)

                    return shortcut

            else:

                def make(original: Any) -> Any:
                    def shortcut(*args: Any, **kwargs: Any) -> Any:
                        token = allowance.set(math.inf)
                        try:
                            return original(*args, **kwargs)
                        finally:
                            allowance.reset(token)

                    return shortcut

            self.patch(owner, attr, make)
