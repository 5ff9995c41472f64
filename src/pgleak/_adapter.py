"""What every adapter shares: exact patching and un-patching, listeners, a version check.

An adapter's own module only says which of its library's events mean "checkout", "checkin",
"discarded", "exhausted" and "closed", and forwards them to the core. The bookkeeping that makes
``install()`` idempotent and ``uninstall()`` exact lives here, once:

* each patch is recorded as (owner, attribute, what was in the owner's ``__dict__``, what the
  wrapper replaced, wrapper); uninstall puts back exactly that object, or deletes the attribute
  if the owner had inherited it, and leaves alone (with a warning) an attribute someone
  re-wrapped after us with anything but a wrapt proxy;
* wrapt proxies (OpenTelemetry's and ddtrace's instrumentations) are stepped through, in both
  directions: pgleak puts its wrapper beneath any it finds, and takes it out from beneath any
  put on top of it, so that their ``unwrap()`` (which only acts on a proxy, and sets the
  attribute to the proxy's ``__wrapped__``) always removes their own layer and nothing else,
  whichever was first (docs/design.md, "Co-existing with wrapt-based instrumentations");
* each listener is recorded with a callable that removes it.

It also holds the two hooks an observer (OpenTelemetry) needs from adapters and cannot get from
the core: when a caller starts waiting for a connection (:meth:`Adapter.track_acquire`), and the
user-facing ``with`` block of a checkout (:func:`enter_scope` / :func:`exit_scope`, called by
the wrappers of the library's own context managers, after its enter and before its exit, so
that the checkout's span is current exactly inside the user's block).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import logging
import math
import sys
import threading
import time
import types
from collections.abc import Awaitable, Callable
from importlib import metadata
from typing import Any, ClassVar, Final

from pgleak import _core, _forward, _stack
from pgleak._appname import tags
from pgleak._cledger import vars_set
from pgleak._core import Lease, allowance, core
from pgleak._guard import internal_error, say
from pgleak._importhook import PostImportFinder

__all__ = [
    "Adapter",
    "AdapterUnavailable",
    "driver_state",
    "driver_target",
    "enter_scope",
    "exit_scope",
]

_log = logging.getLogger("pgleak")
_monotonic = time.monotonic
_MISSING = object()
#: The base class names of wrapt's proxies, in wrapt itself and in the copies some agents vendor
#: (``ddtrace.vendor.wrapt``, ``newrelic.packages.wrapt``): each is a different class object.
_PROXY_BASES = frozenset({"ObjectProxy", "BaseObjectProxy"})
#: How many proxies deep pgleak looks for its own wrapper (wrapt's own chain walk stops at 64).
_MAX_CHAIN = 64
#: Adapters' hooks on their library's optional submodules (``Adapter.when_imported``).
_submodules = PostImportFinder()


def _mark_coroutine_function(wrapper: Any) -> None:
    """Make a plain function that returns a coroutine say it is a coroutine function.

    Some wrappers (``__aenter__`` without an observer) hand back the library's own coroutine
    rather than adding one of their own; frameworks that ask ``iscoroutinefunction()`` of the
    method must still get the answer they got before pgleak.
    """
    mark = getattr(inspect, "markcoroutinefunction", None)  # Python 3.12+
    if mark is not None:
        mark(wrapper)
    else:  # what asyncio.iscoroutinefunction() looks for before 3.12
        wrapper._is_coroutine = asyncio.coroutines._is_coroutine  # type: ignore[attr-defined]


def _is_proxy(obj: Any) -> bool:
    """Whether ``obj`` is a wrapt proxy, whose ``__wrapped__`` is what it calls (and can be set).

    Asked of the type's MRO rather than with ``isinstance``: a proxy reports the ``__class__`` of
    what it wraps, and each vendored copy of wrapt has its own classes. wrapt is never imported:
    a process that has one of its proxies has imported it already. A ``functools.wraps``
    wrapper's ``__wrapped__`` is only a record, so it is never looked through.
    """
    return any(cls.__name__ in _PROXY_BASES for cls in type(obj).__mro__)


def _kind(obj: Any) -> type | None:
    """``classmethod`` or ``staticmethod`` if ``obj`` is one (not a proxy of one), else ``None``."""
    if _is_proxy(obj):
        return None
    if isinstance(obj, classmethod):
        return classmethod
    if isinstance(obj, staticmethod):
        return staticmethod
    return None


def _set_wrapped(proxy: Any, is_old: Callable[[Any], bool], new: Any, owner: Any) -> None:
    """Make ``proxy`` (whose ``__wrapped__`` passes ``is_old``) call ``new`` instead.

    A wrapt proxy bound to no instance (what OpenTelemetry's ``unwrap()`` of an outer proxy
    leaves in a class when another agent's proxy was under it) wraps what ``getattr`` gave
    (a classmethod bound to the class), and binds each call to an instance afresh from its
    parent's ``__wrapped__``: each gets ``new`` in the form it had, the parent only if it
    wraps the same.
    """
    proxy.__wrapped__ = _in_form_of(proxy.__wrapped__, new, owner)
    parent = getattr(proxy, "_self_parent", None)
    if parent is not None and _is_proxy(parent) and is_old(parent.__wrapped__):
        parent.__wrapped__ = _in_form_of(parent.__wrapped__, new, owner)


def _in_form_of(old: Any, new: Any, owner: Any) -> Any:
    """``new``, bound to ``owner`` if ``new`` is a classmethod or staticmethod and ``old`` was
    not (it was what the class hands out for one)."""
    if _kind(new) is not None and _kind(old) is None:
        return new.__get__(None, owner)
    return new


class _Patch:
    """One attribute pgleak patched, and what to put back where."""

    __slots__ = ("attr", "before", "owner", "replaced", "wrapper")

    def __init__(self, owner: Any, attr: str, before: Any, replaced: Any, wrapper: Any) -> None:
        self.owner = owner
        self.attr = attr
        #: ``owner.__dict__[attr]`` when patched (``_MISSING``: inherited).
        self.before = before
        #: What the wrapper took the place of: ``before`` itself, or, beneath wrapt proxies, the
        #: innermost of them's ``__wrapped__``. It goes back wherever the wrapper is found.
        self.replaced = replaced
        self.wrapper = wrapper

    def is_wrapper(self, obj: Any) -> bool:
        """``obj`` is pgleak's wrapper, or what a class hands out for it.

        OpenTelemetry's ``unwrap()`` reads the attribute with ``getattr``, so a classmethod it
        wrapped comes back as the method bound to the class, a staticmethod as its bare
        function; pgleak's own, under its proxy, come back the same way, and are still
        pgleak's to remove.
        """
        wrapper = self.wrapper
        if obj is wrapper:
            return True
        if isinstance(wrapper, staticmethod):
            return obj is wrapper.__func__
        return (
            isinstance(wrapper, classmethod)
            and type(obj) is types.MethodType  # a proxy of one passes isinstance()
            and obj.__func__ is wrapper.__func__
            and obj.__self__ is self.owner
        )

    def undo(self) -> bool:
        """Put back what the wrapper replaced; ``False``: the wrapper is no longer reachable."""
        holder: Any = None
        current = self.owner.__dict__.get(self.attr, _MISSING)
        for _ in range(_MAX_CHAIN):
            if self.is_wrapper(current):
                if holder is not None:
                    _set_wrapped(holder, self.is_wrapper, self.replaced, self.owner)
                elif self.replaced is _MISSING:
                    delattr(self.owner, self.attr)
                else:
                    setattr(self.owner, self.attr, self.replaced)
                return True
            if not _is_proxy(current):
                return False
            holder, current = current, current.__wrapped__
        return False


def _inherited(owner: type, attr: str) -> Callable[..., Any]:
    """``owner``'s inherited method ``attr``, looked up on its bases at each call.

    A wrapper on a subclass shadows the base class's attribute: bound once at patch time, it
    would keep calling the base's method as it was then and miss anyone who swaps the base's
    method later (pytest-django's database blocker swaps ``BaseDatabaseWrapper``'s
    ``ensure_connection`` in and out around every test).
    """

    def call_base(self: Any, *args: Any, **kwargs: Any) -> Any:
        return getattr(super(owner, self), attr)(*args, **kwargs)

    return call_base


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


def enter_scope(lease: Lease | None, kind: str) -> None:
    """The user's ``with`` block around the checkout ``lease`` has begun (its span is current)."""
    observer = core.observer
    if observer is not None and lease is not None:
        try:
            observer.enter(lease)
        except Exception as exc:
            internal_error(f"{kind}.scope", exc)


def exit_scope(lease: Lease | None, kind: str) -> None:
    """The user's ``with`` block around ``lease`` is ending, before the library's own exit."""
    observer = core.observer
    if observer is not None and lease is not None:
        try:
            observer.exit(lease)
        except Exception as exc:
            internal_error(f"{kind}.scope", exc)


class _Scope:
    """A library's checkout context manager, with the checkout's span current inside it.

    A class rather than a generator: its enter and exit add one call each, and the library's
    ``__exit__`` result (whether it suppressed an exception) is passed on untouched. Made by
    :data:`_SCOPE` without an ``__init__`` call; each :meth:`Adapter.track_scope` has a
    subclass that says whose it is.
    """

    __slots__ = ("_cm", "_lease")
    _kind: ClassVar[str] = "scope"
    #: Finds the lease of the connection the block got; ``None``: ``core.lease_of``, inlined.
    _lease_of: ClassVar[Callable[[Any], Lease | None] | None] = None

    def __init__(self, cm: Any) -> None:
        self._cm = cm
        self._lease: Lease | None = None

    def _entered(self, conn: Any) -> None:
        # enter_scope(), inlined (this is every checkout's block while an observer runs)
        try:
            lease_of: Any = self._lease_of  # a staticmethod: called with the connection only
            if lease_of is None:  # core.lease_of(), inlined
                lease = _by_conn.get(id(conn))
                if lease is not None and (lease.ref is None or lease.ref() is not conn):
                    lease = None
            else:
                lease = lease_of(conn)
            self._lease = lease
            observer = core.observer
            if observer is not None and lease is not None:
                observer.enter(lease)
        except Exception as exc:
            internal_error(f"{self._kind}.scope", exc)

    def __enter__(self) -> Any:
        conn = self._cm.__enter__()
        # _entered(), inlined: one call less at every block (the asyncio one stays a call)
        try:
            lease_of: Any = self._lease_of
            if lease_of is None:  # core.lease_of(), inlined
                lease = _by_conn.get(id(conn))
                if lease is not None and (lease.ref is None or lease.ref() is not conn):
                    lease = None
            else:
                lease = lease_of(conn)
            self._lease = lease
            observer = core.observer
            if observer is not None and lease is not None:
                observer.enter(lease)
        except Exception as exc:
            internal_error(f"{self._kind}.scope", exc)
        return conn

    def __exit__(self, typ: Any, value: Any, tb: Any) -> Any:
        observer, lease = core.observer, self._lease  # exit_scope(), inlined
        if observer is not None and lease is not None:
            try:
                observer.exit(lease)
            except Exception as exc:
                internal_error(f"{self._kind}.scope", exc)
        return self._cm.__exit__(typ, value, tb)

    async def __aenter__(self) -> Any:
        conn = await self._cm.__aenter__()
        self._entered(conn)
        return conn

    async def __aexit__(self, typ: Any, value: Any, tb: Any) -> Any:
        exit_scope(self._lease, self._kind)
        return await self._cm.__aexit__(typ, value, tb)


_by_conn = core.by_conn


def _c_scope() -> Any:
    """``_Scope`` with its methods in C (``__enter__``, ``__exit__``, ``__aenter__``,
    ``__aexit__``), the same steps with no Python frame and no coroutine of pgleak's
    (``pgleak._speedups.Scope``); ``None`` without the extension. What
    :meth:`Adapter.track_scope` uses where the C wrappers run; ``_Scope`` stays the
    definition."""
    fast = _stack._fast
    if fast is None or not hasattr(fast, "Scope"):
        return None
    fast.scope_bind(core, _by_conn, internal_error)
    return type(
        "_Scope",
        (fast.Scope,),
        {
            "__slots__": (),
            "__module__": __name__,
            "__doc__": _Scope.__doc__,
            "_kind": _Scope._kind,
            "_lease_of": None,
        },
    )


_CScope: Final = _c_scope()

#: ``Adapter.track_scope``'s wrapper, compiled with the method's own parameters (see
#: pgleak._forward): a ``(pool, *args, **kwargs)`` layer costs more than the rest of it. The
#: scope is made without calling ``__init__`` (one Python call less a checkout).
_SCOPE = """
def {name}({params}):
    cm = original({call})
    if core.observer is None:
        return cm
    scope = new(scope_type)
    scope._cm = cm
    scope._lease = None
    return scope
"""


def driver_target(conn: Any) -> tuple[str | None, int | None, str | None]:
    """``(host, port, database)`` of a psycopg 3, psycopg2 or asyncpg connection.

    Read off the live connection rather than the pool's arguments: libpq has resolved the
    defaults, ``PG*`` variables and service files by then. A Unix socket's directory (libpq)
    or path (asyncpg) is the host.
    """
    info = getattr(conn, "info", None)
    if info is not None and hasattr(info, "dbname"):  # psycopg 3 and psycopg2 ConnectionInfo
        try:
            host, port, dbname = info.host, info.port, info.dbname
        except Exception:  # a closed connection cannot say
            return None, None, None
        return host or None, int(port) if port else None, dbname or None
    addr = getattr(conn, "_addr", None)  # asyncpg.Connection
    if addr is not None:
        database = getattr(getattr(conn, "_params", None), "database", None)
        if isinstance(addr, tuple) and len(addr) >= 2:
            return str(addr[0]), int(addr[1]), database
        return str(addr), None, database
    return None, None, None


#: libpq's ``PQtransactionStatus`` (psycopg 3's ``pq.TransactionStatus``, psycopg2's
#: ``TRANSACTION_STATUS_*``), in the words ``pg_stat_activity`` uses; UNKNOWN (a closed or
#: broken connection) says nothing.
_PQ_STATES: dict[int, str] = {
    0: "idle",
    1: "active",
    2: "idle in transaction",
    3: "in a failed transaction",
}


def driver_state(conn: Any) -> str | None:
    """The transaction state of a psycopg 3, psycopg2 or asyncpg connection, with no round trip.

    Called on the watchdog thread while the holder may be using the connection: libpq's
    ``PQtransactionStatus`` only reads a field of the connection (and says "active" while a
    command runs), asyncpg's ``is_in_transaction()`` reads one attribute of its protocol;
    neither changes anything. asyncpg keeps no "failed" or "busy" state it would show, hence
    its plainer words.
    """
    info = getattr(conn, "info", None)
    status = getattr(info, "transaction_status", None) if info is not None else None
    if status is not None:
        return _PQ_STATES.get(int(status))
    in_transaction = getattr(conn, "is_in_transaction", None)  # asyncpg.Connection
    if in_transaction is not None and not conn.is_closed():
        return "in a transaction" if in_transaction() else "not in a transaction"
    return None


#: The names the templates below use: a method parameter spelt the same gets the generic shape.
_RESERVED = frozenset(
    {
        "pool",
        "original",
        "core",
        "pools",
        "waiting",
        "gave_up",
        "kind",
        "namer",
        "site",
        "internal_error",
        "give_back",
        "tags",
        "tag",
        "by_conn",
        "refused",
        "checked_in",
        "conn_param",
        "handle",
        "since",
        "conn",
        "err",
        "exc",
        "lease",
        "result",
        "atag",
        "acquiring",
        "releasing",
        "spec",
        "slow",
    }
)

#: ``Adapter.track_acquire``'s wrapper (see pgleak._forward); ``{async_}``/``{await_}`` make
#: it a coroutine function for a coroutine method, ``{tag}`` is the call-site tag's call.
_ACQUIRE = """
{async_}def {name}({params}):
    pool = {first}
    handle = since = None
    if core.observer is not None:
        handle, since = waiting(pool)
    try:
        conn = {await_}original({call})
    except BaseException as err:
        if handle is not None:
            core.wait_end(handle)
        gave_up(pool, err, {args}, {kwargs})
        raise
    if handle is not None:
        core.wait_end(handle)
    # checked_out(), inlined: this wrapper is every checkout.
    try:
        if handle is None:
            handle = pools.get(id(pool))
            if handle is None or handle.ref() is not pool:
                handle = core.pool(pool, kind, namer)
        lease = core.checkout(handle, conn, True, since)
    except Exception as exc:
        internal_error(site, exc)
        lease = None
    if give_back is not None and tags.call_site and lease is not None:
        {tag}
    return conn
"""
_TAG = "tag(conn, lease, kind)"
_ATAG = "await atag(pool, conn, lease, getattr(pool, give_back), kind)"

#: ``Adapter.track_release``'s wrapper. ``{conn}``: the connection, by its parameter's name,
#: or from ``args`` / ``kwargs`` in the generic shape.
_RELEASE = """
{async_}def {name}({params}):
    conn = {conn}
    lease = by_conn.get(id(conn))
    if lease is not None and (lease.ref is None or lease.ref() is not conn):
        lease = None  # an id reused after its connection died
    try:
        result = {await_}original({call})
    except refused:
        raise
    except BaseException:
        checked_in(lease)
        raise
    if lease is not None:
        try:
            core.checkin(lease)
        except Exception as exc:
            internal_error(site, exc)
    return result
"""
_GENERIC_CONN = "args[0] if args else kwargs.get(conn_param)"

#: The asyncio flavour of ``_ACQUIRE`` where the C extension is there: no coroutine of
#: pgleak's. The library's own coroutine is handed to ``acquiring`` (pgleak._speedups), which
#: drives it and files the checkout the moment it returns, in the awaiting task. An observer
#: (the wait's start) or a call-site tag (an await after the checkout) takes ``slow``: the
#: ``async def`` above. Where the C ledger is bound too, the wrapper is this function as a C
#: object (``aacquire_wrapper``, a ``pgleak._speedups.Tracked``): no frame of pgleak's, and
#: an observer's wait taken by its awaitable (only a call-site tag takes the ``async def``).
_AACQUIRE_FAST = """
def {name}({params}):
    if core.observer is None{untagged}:
        return acquiring(spec, original({call}), {first}, {args}, {kwargs})
    return slow({call})
"""

#: The asyncio flavour of ``_RELEASE`` where the C extension is there: the lease is looked up
#: before the call, as there, and ``releasing`` checks it in when the library's coroutine ends.
#: A connection pgleak does not track gets the library's coroutine as it is. Where the C ledger
#: is bound too, the wrapper is this function as a C object (``arelease_wrapper``), which hands
#: the calls it cannot read (a connection it cannot find among the arguments) to it.
_ARELEASE_FAST = """
def {name}({params}):
    conn = {conn}
    lease = by_conn.get(id(conn))
    if lease is not None and lease.ref is not None and lease.ref() is conn:
        return releasing(spec, original({call}), lease)
    return original({call})  # untracked (or an id reused after its connection died)
"""


def c_awaitables() -> Any:
    """``pgleak._speedups`` if it has the C awaitables the fast asyncio templates need."""
    fast = _stack._fast
    return fast if fast is not None and hasattr(fast, "acquiring") else None


#: Whether sync checkout and checkin wrappers may be the C ones (tests turn it off to compare).
use_c_wrappers = True


def _c_wrappers() -> Any:
    """``pgleak._speedups`` when its wrappers can be used: the extension is loaded and the C
    ledger is bound (the wrappers call it directly); ``None``: the Python templates."""
    fast = _stack._fast
    if not use_c_wrappers or fast is None or not hasattr(fast, "acquire_wrapper"):
        return None
    if _core._fast_ledger is None:
        return None
    return fast


def c_wrappers() -> Any:
    """:func:`_c_wrappers`, for the integrations that make their own C wrappers (asyncpg)."""
    return _c_wrappers()


def _position(fn: Any, name: str) -> int:
    """The position of ``fn``'s parameter ``name`` when it can be passed by position (-1: by
    keyword only); 1, the first after the pool, when the parameters cannot be read (as
    :data:`_GENERIC_CONN` reads it)."""
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return 1
    for index, param in enumerate(params):
        if param.name == name:
            positional = (param.POSITIONAL_ONLY, param.POSITIONAL_OR_KEYWORD)
            return index if param.kind in positional else -1
    return 1


#: The names :data:`_SCOPE` uses.
_SCOPE_RESERVED = frozenset({"original", "core", "new", "scope_type", "cm", "scope"})


def _asynchronous(is_async: bool) -> dict[str, str]:
    return {"async_": "async " if is_async else "", "await_": "await " if is_async else ""}


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
        self._patches: list[_Patch] = []
        self._undo: list[Callable[[], None]] = []
        self.installed = False
        # patch_scope() patches not put in yet: (owner, attribute, make).
        self._scopes: list[tuple[Any, str, Callable[[Any], Any]]] = []
        self._scope_lock = threading.Lock()

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
                say(_log, logging.WARNING, "pgleak: could not remove a %s hook: %s", self.name, exc)
        self._undo.clear()
        with self._scope_lock:  # not while an observer's start puts scope wrappers in
            self._undo_patches()
        self.installed = False

    def _undo_patches(self) -> None:
        for patched in reversed(self._patches):
            where = getattr(patched.owner, "__qualname__", patched.owner)
            try:
                undone = patched.undo()
            except Exception as exc:  # a proxy above pgleak's wrapper that refuses to be read
                say(
                    _log,
                    logging.WARNING,
                    "pgleak: could not restore %s.%s: %s",
                    where,
                    patched.attr,
                    exc,
                )
                continue
            if not undone:
                say(
                    _log,
                    logging.WARNING,
                    "pgleak: %s.%s was replaced after pgleak patched it; leaving it as it is",
                    where,
                    patched.attr,
                )
        self._patches.clear()

    # -- helpers for subclasses --------------------------------------------------------------

    def _install(self) -> None:
        raise NotImplementedError

    def patch(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        """Replace ``owner.attr`` with ``make(original)``, to be restored exactly later.

        If ``owner.attr`` is a wrapt proxy (an instrumentation's), the wrapper goes beneath it
        (and beneath any proxies it wraps in turn): the instrumentation keeps running first, and
        its ``unwrap()`` later removes its own layer, not pgleak's.
        """
        before = owner.__dict__.get(attr, _MISSING)
        holder: Any = None  # the innermost proxy, whose __wrapped__ pgleak replaces
        replaced = before
        for _ in range(_MAX_CHAIN):
            if replaced is _MISSING or not _is_proxy(replaced):
                break
            holder, replaced = replaced, replaced.__wrapped__
        else:  # a chain this deep is not an instrumentation's: wrap it whole, as anything else
            holder, replaced = None, before
        kind = _kind(replaced)
        if kind is not None:
            inner = replaced.__func__
        elif holder is not None:
            inner = replaced
        else:
            inner = getattr(owner, attr)
        target = inner
        if before is _MISSING and isinstance(owner, type):
            raw = inspect.getattr_static(owner, attr)
            if (inspect.isfunction(raw) or inspect.ismethod(raw)) and not (
                inspect.iscoroutinefunction(raw)
            ):
                target = _inherited(owner, attr)
        wrapper = make(target)
        functools.update_wrapper(wrapper, inner)
        wrapper.__pgleak_wrapped__ = True
        if type(inner) is types.MethodType:  # (a proxy of one passes isinstance())
            # A wrapt FunctionWrapper (above pgleak's wrapper, or put there later) hands its
            # wrapper function the instance it finds as ``__wrapped__.__self__``.
            wrapper.__self__ = inner.__self__
        if inspect.iscoroutinefunction(inner) and not inspect.iscoroutinefunction(wrapper):
            _mark_coroutine_function(wrapper)
        if kind is not None:
            wrapper = kind(wrapper)
        if holder is None:
            setattr(owner, attr, wrapper)
        else:
            _set_wrapped(holder, lambda obj: obj is replaced, wrapper, owner)
        self._patches.append(_Patch(owner, attr, before, replaced, wrapper))

    def patch_scope(self, owner: Any, attr: str, make: Callable[[Any], Any]) -> None:
        """:meth:`patch`, for a wrapper that does nothing without an observer: the user's
        ``with`` block around a checkout, in which the checkout's span is made current.

        Put in only once an observer starts (at once if one is running): with OpenTelemetry's
        API importable and no SDK set up, which may stay so for good, every checkout would
        otherwise pay for one or two calls through it. A block that began before the observer
        started simply has no span to make current.
        """
        with self._scope_lock:
            self._scopes.append((owner, attr, make))
            if self._apply_scopes not in core.on_observer:
                core.on_observer.append(self._apply_scopes)
                self.on_uninstall(self._forget_scopes)
        if core.observer is not None:
            self._apply_scopes()

    def _apply_scopes(self) -> None:
        with self._scope_lock:
            pending, self._scopes = self._scopes, []
            for owner, attr, make in pending:
                self.patch(owner, attr, make)

    def _forget_scopes(self) -> None:
        with self._scope_lock:
            self._scopes.clear()
            with contextlib.suppress(ValueError):
                core.on_observer.remove(self._apply_scopes)

    def on_uninstall(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    def when_imported(self, module: str, install: Callable[[], None]) -> None:
        """Run ``install`` (which patches) now if ``module`` is imported, else once it is.

        For parts of a library that are costly to import and that many applications never use
        (SQLAlchemy's asyncio extension): importing them just to patch them would slow every
        other application's start-up.
        """
        if module in sys.modules:
            install()
            return

        def hook(_module: object) -> None:
            _submodules.hooks.pop(module, None)
            if self.installed:
                install()

        _submodules.hooks[module] = hook
        _submodules.register()

        def forget() -> None:
            if _submodules.hooks.get(module) is hook:
                del _submodules.hooks[module]
            if not _submodules.hooks:
                _submodules.unregister()

        self.on_uninstall(forget)

    def originals(self) -> list[tuple[Any, str, Any]]:
        """``(owner, attribute, original)`` for every patch in place; for tests."""
        return [(patched.owner, patched.attr, patched.before) for patched in self._patches]

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
        keyed: Callable[[Any], Any] | None = None,
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
            keyed: A layer put over the wrapper for calls that pass anything but ``None``
                after the pool (psycopg2's ``getconn(key)``, which may lend a key's connection
                again); with the C wrapper, only such calls go through it (the others never
                need it), so the common call runs no Python frame at all.
        """
        kind = self.name
        pools = core._pools

        def waiting(pool: Any) -> tuple[Any, float | None]:
            # Only an observer needs the wait's start (and the handle, before the call);
            # the callers check for one first, so that without one this is never called.
            # core.pool() and core.wait_start() inlined: this is every checkout then.
            try:
                handle = pools.get(id(pool))
                if handle is None or handle.ref() is not pool:
                    handle = core.pool(pool, kind, namer)
                if core.observer is None:
                    return handle, None
                handle.pending.append(None)
            except Exception as exc:
                internal_error(f"{kind}.checkout", exc)
                return None, None
            return handle, _monotonic()

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

        def make(original: Any) -> Any:
            shape = _forward.shape_of(original, _RESERVED)
            python = _forward.compile_wrapper(
                _ACQUIRE,
                attr,
                shape,
                {
                    "original": original,
                    "core": core,
                    "pools": pools,
                    "waiting": waiting,
                    "gave_up": gave_up,
                    "kind": kind,
                    "namer": namer,
                    "site": f"{kind}.checkout",
                    "internal_error": internal_error,
                    "give_back": give_back,
                    "tags": tags,
                    "tag": tag,
                    "atag": atag,
                },
                "acquire",
                **_asynchronous(is_async),
                tag=_ATAG if is_async else _TAG,
            )
            if keyed is not None:
                python = keyed(python)
            if is_async:
                awaiting = c_awaitables()
                if awaiting is None:
                    return python
                fast = _c_wrappers()
                if fast is not None and hasattr(fast, "aacquire_wrapper"):
                    # _AACQUIRE_FAST below, as a C object (pgleak._speedups.Tracked)
                    return fast.aacquire_wrapper(
                        original,
                        python,
                        core,
                        pools,
                        kind,
                        namer,
                        f"{kind}.checkout",
                        gave_up,
                        internal_error,
                        None if give_back is None else tags,
                        None,
                    )
                return _forward.compile_wrapper(
                    _AACQUIRE_FAST,
                    attr,
                    shape,
                    {
                        "original": original,
                        "core": core,
                        "tags": tags,
                        "acquiring": awaiting.acquiring,
                        "spec": (
                            core,
                            pools,
                            kind,
                            namer,
                            None,
                            gave_up,
                            internal_error,
                            f"{kind}.checkout",
                        ),
                        "slow": python,
                    },
                    "acquire",
                    untagged=" and not tags.call_site" if give_back is not None else "",
                )
            fast = _c_wrappers()
            if fast is None:
                return python
            return fast.acquire_wrapper(
                original,
                python,
                core,
                pools,
                kind,
                namer,
                f"{kind}.checkout",
                gave_up,
                internal_error,
                None if give_back is None else tags,
                keyed is not None,
            )

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

        The lease is looked up before the call, while the pool does not have the connection
        back: a pool may lend the same object to a waiting thread at once, whose new lease must
        not be the one closed. The lookup is :meth:`Core.lease_of`, inlined (every checkin).
        """
        kind = self.name
        by_conn = core.by_conn

        def checked_in(lease: Any) -> None:
            if lease is None:
                return
            try:
                core.checkin(lease)
            except Exception as exc:
                internal_error(f"{kind}.checkin", exc)

        # The template's ``conn = {conn}`` is ``conn = conn`` when the method's parameter is
        # spelt so (psycopg_pool's putconn(self, conn)): that name may be the method's.
        reserved = _RESERVED - {"conn"} if conn_param == "conn" else _RESERVED

        def make(original: Any) -> Any:
            shape = _forward.shape_of(original, reserved)
            if conn_param not in shape.names:
                shape = _forward.GENERIC
            awaiting = c_awaitables() if is_async else None
            if awaiting is not None:
                python = _forward.compile_wrapper(
                    _ARELEASE_FAST,
                    attr,
                    shape,
                    {
                        "original": original,
                        "by_conn": by_conn,
                        "conn_param": conn_param,
                        "releasing": awaiting.releasing,
                        "spec": (core, refused, internal_error, f"{kind}.checkin"),
                    },
                    "release",
                    conn=_GENERIC_CONN if shape is _forward.GENERIC else conn_param,
                )
                fast = _c_wrappers()
                if fast is None or not hasattr(fast, "arelease_wrapper"):
                    return python
                # the function above, as a C object (pgleak._speedups.Tracked)
                return fast.arelease_wrapper(
                    original,
                    python,
                    core,
                    by_conn,
                    refused,
                    _position(original, conn_param),
                    conn_param,
                    f"{kind}.checkin",
                    internal_error,
                )
            python = _forward.compile_wrapper(
                _RELEASE,
                attr,
                shape,
                {
                    "original": original,
                    "core": core,
                    "by_conn": by_conn,
                    "refused": refused,
                    "checked_in": checked_in,
                    "conn_param": conn_param,
                    "site": f"{kind}.checkin",
                    "internal_error": internal_error,
                },
                "release",
                **_asynchronous(is_async),
                conn=_GENERIC_CONN if shape is _forward.GENERIC else conn_param,
            )
            fast = _c_wrappers()
            if fast is None or is_async:
                return python
            return fast.release_wrapper(
                original,
                python,
                core,
                by_conn,
                refused,
                _position(original, conn_param),
                conn_param,
                f"{kind}.checkin",
                internal_error,
            )

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

    def track_scope(
        self,
        owner: Any,
        attr: str,
        *,
        lease_of: Callable[[Any], Lease | None] = core.lease_of,
    ) -> None:
        """Wrap ``owner.attr(pool, ...)``, which returns a (sync or async) context manager
        that checks a connection out on enter and back in on exit (psycopg_pool's
        ``connection()``): the checkout's span is current inside the block.

        Without an observer the library's own context manager is returned, as it is.
        """
        base = _CScope if _CScope is not None and _c_wrappers() is not None else _Scope
        scope_type = type(
            "_Scope",
            (base,),
            {
                "__slots__": (),
                "__module__": __name__,
                "_kind": self.name,
                "_lease_of": None if lease_of == core.lease_of else staticmethod(lease_of),
            },
        )

        def make(original: Any) -> Any:
            python = _forward.compile_wrapper(
                _SCOPE,
                attr,
                _forward.shape_of(original, _SCOPE_RESERVED),
                {
                    "original": original,
                    "core": core,
                    "new": object.__new__ if base is _Scope else base.__new__,
                    "scope_type": scope_type,
                },
                "scope",
            )
            if base is _Scope:
                return python
            # the function above, as a C object (pgleak._speedups.Tracked): no frame of pgleak's
            return _stack._fast.scope_wrapper(original, python, core, scope_type)

        self.patch_scope(owner, attr, make)

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
                        vars_set()
                        token = allowance.set(math.inf)
                        try:
                            return await original(*args, **kwargs)
                        finally:
                            allowance.reset(token)

                    return shortcut

            else:

                def make(original: Any) -> Any:
                    def shortcut(*args: Any, **kwargs: Any) -> Any:
                        vars_set()
                        token = allowance.set(math.inf)
                        try:
                            return original(*args, **kwargs)
                        finally:
                            allowance.reset(token)

                    return shortcut

            self.patch(owner, attr, make)
