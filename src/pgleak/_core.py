"""The framework-neutral core: the ledger of checkouts and the decisions made from it.

Adapters report facts - "this connection was checked out of this pool", "it came back", "the
pool gave up waiting", "the pool is closing" - and the core decides what is a leak and tells the
sinks. Policy (thresholds, what to report, how often) lives only here, so every pool library
gets the same reports.

Hot path (``checkout``/``checkin``): no lock, no string formatting, no frame objects kept; a
dict insert and pop (atomic under the GIL, and per-dict locked on free-threaded builds), a
monotonic clock read, the raw stack, one weak reference. Everything else - formatting stacks,
finding where a holder is now, naming pools, calling sinks - happens on the watchdog thread or
at the rare moments (pool exhausted, pool closed, exit) when the user is about to need it.
Where the C extension is built, the same two methods run in C (``pgleak/_c/ledger.c``, bound
to each Core in ``__init__``), on the same Lease objects, falling back to the Python methods
below for every rare case; the Python methods stay the definition.

State transitions of a lease are written by at most two threads (the holder and the watchdog)
in an order that makes every report true without a lock; see ``checkin`` and ``_scan``.

Besides the sinks, one optional :class:`Observer` (OpenTelemetry, ``_otel.py``) is told of every
wait, checkout and checkin as it happens; without one, each of those costs an attribute check.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import contextvars
import itertools
import logging
import math
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable
from typing import Any, NamedTuple, Protocol

from pgleak import _dump, _reclaim, _stack
from pgleak._deadlines import Deadlines
from pgleak._events import (
    AT_EXIT,
    COLLECTED,
    CONNECT_GAVE_UP,
    CONNECT_RETRY,
    EXHAUSTED,
    RECLAIMED,
    RETURNED,
    SUSPECTED,
    Checkout,
    LeakEvent,
    Sink,
)
from pgleak._guard import internal_error, say
from pgleak._settings import Settings

__all__ = ["Core", "Lease", "Observer", "PoolHandle", "PoolKind", "PoolStats", "core"]

_log = logging.getLogger("pgleak")
_monotonic = time.monotonic
_get_running_loop = asyncio.events._get_running_loop


def _task_lookup() -> Callable[[Any], Any]:
    """``asyncio.current_task(loop)`` without a Python frame, where that can be had.

    On 3.10 and 3.11 it is a Python function whose whole body, given the loop, is
    ``_current_tasks.get(loop)``: the dict's own ``get`` gives the same answer. 3.12 and 3.13
    implement it in C, reading the same dict (``_asyncio._current_tasks``, which
    ``asyncio.tasks`` exports): its ``get`` is a call less, and the C ledger reads the dict
    directly (~150 instructions a checkout). Anything else (3.14 keeps the task per thread) is
    asked.
    """
    tasks = getattr(asyncio.tasks, "_current_tasks", None)
    if not isinstance(tasks, dict):
        return asyncio.current_task
    if sys.version_info < (3, 12):
        return tasks.get
    try:
        import _asyncio
    except ImportError:  # pragma: no cover - CPython builds it
        return asyncio.current_task
    if (
        getattr(_asyncio, "_current_tasks", None) is tasks
        and asyncio.current_task is getattr(_asyncio, "current_task", None)
        and asyncio.tasks.current_task is asyncio.current_task
    ):
        return tasks.get
    return asyncio.current_task


_current_task = _task_lookup()

#: Set inside ``pgleak.suppress()``: checkouts made there are pgleak's own (doctor, demo) and
#: are not recorded.
suppressed: contextvars.ContextVar[bool] = contextvars.ContextVar(
    "pgleak_suppressed", default=False
)
#: Set by the pool adapters around the pool's own connect (``psycopg_pool``'s ``_connect``,
#: SQLAlchemy's ``do_connect``, ...): the driver's ``connect()`` running there opens a pool's
#: connection, which the pool's adapter tracks, and is not a direct connection.
pooled: contextvars.ContextVar[bool] = contextvars.ContextVar("pgleak_pooled", default=False)
#: Set inside ``pgleak.allow_long_hold()``: the hold allowance in seconds for new checkouts.
#: ``math.inf`` (never set by users: ``allow_long_hold`` takes finite values) marks checkouts a
#: pool makes and returns by itself (``asyncpg.Pool.fetch()``): holders, never leaks.
allowance: contextvars.ContextVar[float] = contextvars.ContextVar("pgleak_allowance", default=0.0)
#: Set inside ``pgleak.context()`` (by a web integration, per request): what the code holding
#: a connection was doing, e.g. ``GET /orders/42``. Read once per checkout.
context: contextvars.ContextVar[str | None] = contextvars.ContextVar("pgleak_context", default=None)


#: Lost slots remembered per pool (``PoolHandle.lost``).
_MAX_LOST = 50


class PoolHandle:
    """pgleak's view of one pool object: a weak reference and a lazily computed name.

    The name is computed at report time, not at checkout, because naming may mean rendering a
    URL (and redacting its password), which the hot path must not pay for.
    """

    __slots__ = ("__weakref__", "_name", "_namer", "kind", "lost", "observed", "pending", "ref")

    def __init__(self, obj: Any, kind: str, namer: Callable[[Any], str] | None) -> None:
        self.kind = kind
        self._namer = namer
        self._name: str | None = None
        #: One item per caller waiting for a connection right now (``Core.wait_start``):
        #: appends and pops are atomic, so threads need no lock to keep the count exact.
        self.pending: collections.deque[None] = collections.deque()
        #: What an observer derived from this pool and keeps with it (OpenTelemetry's pool
        #: attributes); dropped when the pool is renamed.
        self.observed: Any = None
        #: Checkouts collected without being returned from a pool that keeps only a count of
        #: what it lends (``PoolKind.loses_slots``): their slots are gone for good, and a
        #: ``pool.exhausted`` report lists them. The newest few only.
        self.lost: collections.deque[Checkout] = collections.deque(maxlen=_MAX_LOST)
        self.ref: Callable[[], Any]
        try:
            self.ref = weakref.ref(obj)
        except TypeError:  # not weak-referenceable: hold it (pools live as long as the app)
            # A builtin's bound method, not a Python function: asyncpg's Pool is such an
            # object, and every one of its checkouts calls this to tell a reused id.
            self.ref = itertools.repeat(obj).__next__
        if namer is None:
            self._name = f"{kind}:{type(obj).__name__}@{id(obj):#x}"

    @property
    def name(self) -> str:
        if self._name is None:
            obj = self.ref()
            name = None
            if obj is not None and self._namer is not None:
                try:
                    name = self._namer(obj)
                except Exception as exc:
                    internal_error(f"{self.kind}.pool_name", exc)
            self._name = name or f"{self.kind}:pool@{id(self):#x}"
        return self._name

    def rename(self, name: str) -> None:
        self._name = name
        self.observed = None


class PoolStats(NamedTuple):
    """A pool's state as its library reports it; ``None`` where the library does not say.

    Read only when metrics are collected (once a minute, say), never on a checkout.
    """

    idle: int | None = None
    used: int | None = None
    max: int | None = None
    idle_max: int | None = None
    idle_min: int | None = None
    #: Callers waiting for a connection right now.
    waiting: int | None = None


class PoolKind(NamedTuple):
    """What an adapter can tell about its pools beyond checkouts, for metrics and spans.

    Attributes:
        stats: The pool object's current :class:`PoolStats`, or ``None`` once it is closed.
        target: ``(host, port, database)`` of the server behind a lent connection (the object
            the user holds), any of them ``None`` when unknown.
        state: The transaction state of a lent connection ("idle in transaction"), read at
            report time on any thread, without a round trip; ``None`` when unknown.
        reclaim: For a pool, the function ``(lent connection, announce)`` that closes the
            connection and gives its slot back through the library's own API, from the
            watchdog thread, calling ``announce()`` just before (``reclaim=True``; see
            ``_reclaim``); ``None`` for a pool that cannot be reclaimed from safely.
    """

    stats: Callable[[Any], PoolStats | None] | None = None
    target: Callable[[Any], tuple[str | None, int | None, str | None]] | None = None
    state: Callable[[Any], str | None] | None = None
    reclaim: Callable[[Any], Callable[[Any, Callable[[], None]], None] | None] | None = None
    #: The pool keeps no reference to what it lends, only a count: a lent connection that is
    #: garbage-collected never gives its slot back (psycopg_pool).
    loses_slots: bool = False


class Observer(Protocol):
    """Sees every checkout as it happens, besides the events (OpenTelemetry, ``_otel.py``).

    Sinks only get events, which are rare; an observer is told of every checkout and checkin,
    on the hot path, so it is one object (``Core.observer``, ``None`` when there is none) and
    every method must be cheap and may raise only what the core swallows into
    :func:`~pgleak._guard.internal_error`.
    """

    def checked_out(self, lease: Lease, since: float | None) -> None: ...
    def checked_in(self, lease: Lease, late: bool, discarded: bool) -> None: ...
    def settled(self, lease: Lease) -> None: ...
    def lease_event(self, lease: Lease, event: LeakEvent, when: float) -> None: ...
    def exhausted(self, pool: PoolHandle, event: LeakEvent) -> None: ...
    def pool_event(self, event: LeakEvent) -> None: ...
    def connected(self, pool: PoolHandle, seconds: float) -> None: ...
    def enter(self, lease: Lease) -> None: ...
    def exit(self, lease: Lease) -> None: ...


class Lease:
    """One checkout, from the moment a connection is handed out until it is back or gone.

    Built on every checkout, so it holds only what a report needs later, as cheaply as
    possible: the raw stack, the holder's identity tuples, two clock readings.
    """

    __slots__ = (
        "closed",
        "context",
        "deadline",
        "flagged",
        "generation",
        "id",
        "key",
        "otel",
        "pool",
        "probe",
        "raw",
        "ref",
        "reported",
        "self_returning",
        "t0",
        "t_in",
        "task",
        "thread",
        "unseen_close",
    )

    def __init__(
        self,
        lease_id: int,
        pool: PoolHandle,
        t0: float,
        deadline: float,
        thread: tuple[int, str, Callable[[], threading.Thread | None]],
        raw: _stack.RawStack,
        task: tuple[weakref.ref[asyncio.Task[Any]], str] | None,
    ) -> None:
        self.id = lease_id
        self.generation = _generation
        self.pool = pool
        self.t0 = t0
        self.deadline = deadline
        self.thread = thread
        self.raw = raw
        self.task = task
        self.ref: weakref.ref[Any] | None = None
        #: ``pgleak.context()`` at checkout (a request's method and path, say).
        self.context: str | None = None
        #: Set by an adapter that can say, at report time, what state the connection is in
        #: ("idle in transaction"): called from the watchdog thread, must not block.
        self.probe: Callable[[], str | None] | None = None
        # id() of the connection when the lease is found by connection (Core.lease_of).
        self.key: int | None = None
        # Written by the watchdog before it decides to report (see Core._scan).
        self.flagged = False
        # Written by whoever emitted a report about this lease (watchdog or pool close).
        self.reported = False
        # Written by the holder's thread when the connection comes back.
        self.t_in: float | None = None
        #: The observer's per-checkout state (OpenTelemetry: the span and its parent).
        self.otel: Any = None
        #: A checkout its pool returns by itself (``asyncpg.Pool.fetch()``): never reported.
        self.self_returning = False
        #: Reads whether the connection (alive, passed in) is closed; for connections that
        #: can be closed where no hook sees it (see :meth:`Core.checkout`).
        self.closed: Callable[[Any], bool] | None = None
        #: Its ``close()`` cannot be hooked at all (psycopg2's C type): collected, it says
        #: nothing (closed or not, it looks the same by then).
        self.unseen_close = False

    @property
    def threshold(self) -> float:
        """The hold allowed before a report: ``leak_threshold`` or an ``allow_long_hold``."""
        return self.deadline - self.t0

    def holder(self) -> str:
        during = f" during {self.context}" if self.context else ""
        if self.task is not None:
            return f"task {self.task[1]!r} (thread {self.thread[1]!r}){during}"
        return f"thread {self.thread[1]!r}{during}"

    def state(self) -> str | None:
        probe = self.probe
        if probe is None:
            return None
        try:
            return probe()
        except Exception as exc:
            internal_error("core.probe", exc)
            return None


class _ConnRef(weakref.ref):  # type: ignore[type-arg]
    """A weak reference to the user-facing connection that remembers its lease id."""

    __slots__ = ("key", "lease_id")
    lease_id: int
    key: int


#: A queue entry (see ``Core._pending``): a discarded lease that the watchdog had looked at,
#: for the observer only.
_SETTLE = "settle"

_thread_local = threading.local()
#: Bumped in a forked child, so leases inherited from the parent are recognised and ignored.
_generation = 0


def _thread_identity() -> tuple[int, str, Callable[[], threading.Thread | None]]:
    """Who is running: computed once per thread, so a checkout pays one attribute lookup."""
    try:
        ident: tuple[int, str, Callable[[], threading.Thread | None]] = _thread_local.ident
    except AttributeError:
        thread = threading.current_thread()
        ident = _thread_local.ident = (threading.get_ident(), thread.name, weakref.ref(thread))
    return ident


class Core:
    """The ledger of checkouts, the watchdog's scan, and event delivery to sinks."""

    # A slot of its own keeps the attributes in ``__dict__`` on 3.13 too (not inline in the
    # object, where no dict watcher sees them change), so the C ledger can keep its answers
    # to "anything rare?" between checkouts there (``calm`` in _c/calm.c). Never set.
    __slots__ = ("__dict__", "__weakref__", "_in_dict")

    def __init__(self) -> None:
        self.settings = Settings(enabled=False)
        self.leases: dict[int, Lease] = {}
        # id(connection) -> lease, for pools that hand out the connection itself and keep no
        # object of their own per checkout (psycopg_pool, psycopg2, asyncpg). Never replaced:
        # adapters' wrappers keep a reference to it (one lookup less per checkin).
        self.by_conn: dict[int, Lease] = {}
        self.sinks: list[Sink] = []
        self._ids = itertools.count(1)
        # (kind, lease id or Lease, monotonic time): filled by finalizers and checkins, drained
        # by the watchdog. deque.append is atomic and takes no lock, so a weakref callback that
        # fires in the middle of anything (even inside the watchdog) cannot deadlock on it.
        self._pending: collections.deque[tuple[str, Any, float]] = collections.deque()
        # id(pool) -> handle; never replaced (adapters' wrappers read it directly).
        self._pools: dict[int, PoolHandle] = {}
        self.untracked = 0
        self._untracked_warned = False
        #: Sees every checkout (OpenTelemetry); ``None``: nobody does, and the hot path pays one
        #: attribute check for it.
        self.observer: Observer | None = None
        #: An observer waiting for something to observe with (OpenTelemetry without an SDK set
        #: up yet): asked at each checkout, it returns itself once it has work, and becomes
        #: :attr:`observer`. Until then every other hook sees no observer and costs nothing.
        self.waker: Callable[[], Observer | None] | None = None
        #: ``(obj, attr, obj, attr)``: the waker has nothing to say while both attributes are
        #: ``None`` (OpenTelemetry's global providers), so a checkout reads them itself instead
        #: of calling it: two attribute reads instead of two calls, for as long as no SDK is
        #: set up, which may be forever. ``None``: ask the waker every time.
        self.wake_gate: tuple[Any, str, Any, str] | None = None
        #: Called when an observer starts (``install()`` with an SDK, or a waker that woke):
        #: adapters put in the wrappers only an observer needs (see
        #: ``Adapter.patch_scope``), so that without one no checkout pays for them.
        self.on_observer: list[Callable[[], None]] = []
        #: What each adapter can tell about its pools (:class:`PoolKind`), by adapter name.
        self.kinds: dict[str, PoolKind] = {}
        #: ``_on_collected`` bound once, not per checkout (every weak reference takes it).
        self._collected = self._on_collected
        from pgleak._watchdog import Watchdog

        self.watchdog = Watchdog(self._tick)
        #: The watchdog's index of :attr:`leases` by deadline (its passes cost O(new + due)).
        self.deadlines = Deadlines(self.leases)
        if _fast_ledger is not None:
            # The same two methods in C (pgleak/_c/ledger.c), bound to this core; the Python
            # ones stay on the class, and the C ones fall back to them for anything rare.
            self.checkout = types.MethodType(_fast_ledger.checkout, self)  # type: ignore[method-assign]
            self.checkin = types.MethodType(_fast_ledger.checkin, self)  # type: ignore[method-assign]

    # -- configuration -------------------------------------------------------------------------

    def configure(self, settings: Settings) -> None:
        self.settings = settings
        self.watchdog.wake()

    # -- adapter API: facts in -----------------------------------------------------------------

    def pool(self, obj: Any, kind: str, namer: Callable[[Any], str] | None = None) -> PoolHandle:
        """The handle for a pool object, created on first sight."""
        key = id(obj)
        handle = self._pools.get(key)
        if handle is not None and handle.ref() is obj:
            return handle
        # setdefault: two threads meeting a new pool at once must end up with one handle, or
        # "every holder of this pool" would miss the other thread's checkouts.
        new = PoolHandle(obj, kind, namer)
        handle = self._pools.setdefault(key, new)
        if handle.ref() is not obj:  # a dead pool's entry whose id was reused
            self._pools[key] = handle = new
        if handle is new:
            with contextlib.suppress(TypeError):
                weakref.finalize(obj, self._forget_pool, key, handle)
        return handle

    def _forget_pool(self, key: int, handle: PoolHandle) -> None:
        if self._pools.get(key) is handle:
            del self._pools[key]

    def pools(self) -> list[tuple[PoolHandle, Any]]:
        """Every pool seen and still alive, with its object (for metrics, off the hot path)."""
        out = []
        for handle in list(self._pools.values()):
            obj = handle.ref()
            if obj is not None:
                out.append((handle, obj))
        return out

    def register_kind(self, kind: str, info: PoolKind) -> None:
        """What the adapter ``kind`` can tell about its pools (stats, server); see PoolKind."""
        self.kinds[kind] = info

    def observer_now(self) -> Observer | None:
        """The observer, after asking a waiting one whether it has work now."""
        observer = self.observer
        if observer is None and self.waker is not None:
            try:
                observer = self.waker()
            except Exception as exc:
                internal_error("observer.wake", exc)
                self.waker = None
                return None
            if observer is not None:
                self.observer = observer
                self.waker = None
                self.observer_started()
        return observer

    def observer_started(self) -> None:
        """:attr:`observer` was set: run :attr:`on_observer` (never raises)."""
        for started in list(self.on_observer):
            try:
                started()
            except Exception as exc:
                internal_error("observer.started", exc)

    def wait_start(self, pool: PoolHandle) -> float | None:
        """A caller is about to wait for a connection from ``pool``.

        Only an observer needs to know (the wait is the start of a checkout span, and pending
        requests are a metric), so without one this costs nothing but the check. A non-``None``
        result must be handed to :meth:`wait_end` when the wait is over, however it ended, and
        to :meth:`checkout` as ``since``. The core keeps the count itself (two C calls, no
        call into the observer: this is every checkout while one runs).
        """
        if self.observer is None:
            return None
        pool.pending.append(None)
        return _monotonic()

    def wait_end(self, pool: PoolHandle) -> None:
        """The wait begun by a non-``None`` :meth:`wait_start` is over."""
        try:  # noqa: SIM105 - not contextlib.suppress: three calls more at every checkout
            pool.pending.pop()
        except IndexError:  # a pop without its append: never negative
            pass

    def connected(self, pool: PoolHandle, started: float) -> None:
        """``pool`` opened a server connection it began opening at ``started`` (monotonic)."""
        observer = self.observer_now()
        if observer is not None:
            try:
                observer.connected(pool, _monotonic() - started)
            except Exception as exc:
                internal_error("observer.connected", exc)

    def checkout(
        self,
        pool: PoolHandle,
        conn: Any = None,
        index: bool = False,
        since: float | None = None,
        hold: float | None = None,
        closed: Callable[[Any], bool] | None = None,
        unseen_close: bool = False,
    ) -> Lease | None:
        """Record that ``conn`` (the object the user holds) was checked out of ``pool``.

        Args:
            pool: The pool's handle (:meth:`pool`).
            conn: The object the user holds; weakly referenced, to see it collected.
            index: Also file the lease under ``conn``, for :meth:`lease_of` / :meth:`checkin_conn`,
                when the adapter has no per-checkout object of its own to keep it in.
            since: When the caller started waiting for this connection (:meth:`wait_start`),
                if the adapter knows; the start of the checkout's span.
            hold: The hold allowed before ``leak.suspected``, instead of ``leak_threshold``
                (``math.inf``: never); a direct connection's ``direct_threshold``.
            closed: Reads whether ``conn`` is closed: asked before reporting it held too long
                or still open at exit, so a connection closed by a path no hook sees (the
                server broke it; psycopg2's unhookable ``close()``) counts as back then.
            unseen_close: ``conn``'s ``close()`` is invisible to pgleak, so its garbage
                collection is no evidence of a leak: it leaves the ledger without a report.

        Returns:
            The lease the adapter hands back to :meth:`checkin`, or ``None`` when pgleak is off,
            suppressed, or at its tracking bound.
        """
        # Every line here runs on every checkout: locals over attributes, no calls that can be
        # avoided, the rare cases (a hold allowance, a closed-check, an observer) tested last.
        settings = self.settings
        if not settings.enabled or suppressed.get():
            return None
        leases = self.leases
        if len(leases) >= settings.max_tracked:
            self._over_bound()
            return None
        threshold = settings.leak_threshold if hold is None else hold
        extra = allowance.get()
        if extra > threshold:  # noqa: PLR1730 - max() is a call, on every checkout
            threshold = extra
        loop = _get_running_loop()
        task = None if loop is None else _current_task(loop)
        t0 = _monotonic()
        try:
            thread = _thread_local.ident  # _thread_identity(), its common case inlined
        except AttributeError:
            thread = _thread_identity()
        lease = Lease(
            next(self._ids),
            pool,
            t0,
            t0 + threshold,
            thread,
            _stack.capture(settings.stack_depth, 2, task) if settings.capture_stack else (),
            None if task is None else (weakref.ref(task), task.get_name()),
        )
        lease.context = context.get()
        if extra == math.inf:
            lease.self_returning = True
        if closed is not None:
            lease.closed = closed
            lease.unseen_close = unseen_close
        if conn is not None:
            try:
                ref = _ConnRef(conn, self._collected)
            except TypeError:  # not weak-referenceable: "collected" cannot happen to it anyway
                pass
            else:
                ref.lease_id = lease.id
                ref.key = key = id(conn)
                lease.ref = ref
                if index:
                    lease.key = key
                    by_conn = self.by_conn
                    stale = by_conn.get(key)
                    if stale is not None and stale.ref is not None and stale.ref() is conn:
                        # The pool lent this connection again, so it had it back; the old
                        # lease's checkin went unseen (a path the adapter does not hook).
                        self._forget(stale)
                    by_conn[key] = lease
        leases[lease.id] = lease
        if self.watchdog.thread is None or self.observer is not None or self.waker is not None:
            self._after_checkout(lease, since)
        return lease

    def _after_checkout(self, lease: Lease, since: float | None) -> None:
        """The end of :meth:`checkout` that is rarely needed: the watchdog's first start, and
        the observer (waking a waiting one first, unless its gate says it has nothing yet)."""
        if self.watchdog.thread is None:
            self.watchdog.start()
        observer = self.observer
        if observer is None and self.waker is not None:
            gate = self.wake_gate
            if (
                gate is None
                or getattr(gate[0], gate[1]) is not None
                or getattr(gate[2], gate[3]) is not None
            ):
                observer = self.observer_now()
        if observer is not None:
            try:
                observer.checked_out(lease, since)
            except Exception as exc:
                internal_error("observer.checkout", exc)

    def checkin(self, lease: Lease) -> None:
        """The connection of ``lease`` came back to its pool (or the user closed it)."""
        ref = lease.ref
        if ref is not None and ref() is None:
            # The pool is returning a connection whose user-facing object was garbage
            # collected (SQLAlchemy's sync pools do this from a weakref callback): that is a
            # leak the pool papered over, not a return.
            self._on_collected(ref)
            return
        if lease.generation != _generation:
            return  # checked out before a fork, in the parent: not this process's to report
        lease.t_in = now = _monotonic()
        # _forget(), inlined: this is every checkin.
        key = lease.key
        if key is not None and self.by_conn.get(key) is lease:
            del self.by_conn[key]
        self.leases.pop(lease.id, None)
        if lease.flagged:
            self._pending.append((RETURNED, lease, now))
        if self.observer is not None:
            self._observe_checkin(lease, lease.flagged, discarded=False)

    def _observe_checkin(self, lease: Lease, late: bool, discarded: bool) -> None:
        # ``late``: the watchdog has looked at this lease and may be reporting it right now;
        # the observer then leaves what must come after that report (ending its span) to the
        # watchdog, which drains the entry queued by the caller only after its own report.
        observer = self.observer
        if observer is not None:
            try:
                observer.checked_in(lease, late, discarded)
            except Exception as exc:
                internal_error("observer.checkin", exc)

    def discard(self, lease: Lease) -> None:
        """The pool threw the connection away (broken, terminated, detached): no report."""
        ref = lease.ref
        if ref is not None and ref() is None:
            self._on_collected(ref)
            return
        lease.t_in = _monotonic()
        self._forget(lease)
        late = lease.flagged
        if late:
            # Nothing is reported for a discarded connection, but the observer's end of it
            # belongs on the watchdog's side, as for a checkin (see ``checkin``).
            self._pending.append((_SETTLE, lease, lease.t_in))
        if self.observer is not None:
            self._observe_checkin(lease, late, discarded=True)

    def lease_of(self, conn: Any) -> Lease | None:
        """The open lease filed under ``conn`` by ``checkout(..., index=True)``, if any."""
        lease = self.by_conn.get(id(conn))
        if lease is None or lease.ref is None or lease.ref() is not conn:
            return None  # not tracked, or an id reused after its connection died
        return lease

    def checkin_conn(self, conn: Any) -> None:
        """:meth:`checkin` for the lease filed under ``conn``; nothing if there is none."""
        lease = self.lease_of(conn)
        if lease is not None:
            self.checkin(lease)

    def _forget(self, lease: Lease) -> bool:
        """Take ``lease`` out of the ledger; False if it was not there (already reported)."""
        key = lease.key
        if key is not None and self.by_conn.get(key) is lease:
            self.by_conn.pop(key, None)
        return self.leases.pop(lease.id, None) is not None

    def _on_collected(self, ref: Any) -> None:
        # Runs inside a weakref callback, possibly in the middle of any code on any thread
        # (including the watchdog's own): only an atomic append here.
        self._pending.append((COLLECTED, (ref.lease_id, ref.key), _monotonic()))

    def exhausted(
        self, pool: PoolHandle, waited_s: float | None = None, detail: str | None = None
    ) -> None:
        """A checkout from ``pool`` gave up waiting: report every current holder, now.

        Runs on the thread that waited, before the pool's exception reaches the user, so the
        report is in the log just above the traceback that sent the user looking.
        """
        if not self.settings.enabled or suppressed.get():
            return
        now = _monotonic()
        holders = tuple(
            self._snapshot(lease, now, with_holder_stack=True)
            for lease in list(self.leases.values())
            if lease.pool is pool and _alive(lease)
        )
        ident = _thread_identity()
        loop = _get_running_loop()
        task = None if loop is None else _current_task(loop)
        waiter_raw = _stack.capture(self.settings.stack_depth, 2, task, thorough=True)
        during = context.get()
        holder = (
            f"task {task.get_name()!r} (thread {ident[1]!r})"
            if task is not None
            else f"thread {ident[1]!r}"
        )
        waiter = Checkout(
            checkout_id=0,
            pool=pool.name,
            held_s=waited_s if waited_s is not None else math.nan,
            holder=f"{holder} during {during}" if during else holder,
            stack=_stack.format_raw(waiter_raw),
            context=during,
        )
        event = LeakEvent(
            EXHAUSTED,
            pool.name,
            holders=holders,
            waiter=waiter,
            detail=detail,
            lost=tuple(pool.lost),
        )
        self.emit(event)
        observer = self.observer_now()
        if observer is not None:
            try:
                observer.exhausted(pool, event)
            except Exception as exc:
                internal_error("observer.exhausted", exc)

    def pool_closed(self, pool: PoolHandle, detail: str = "pool closed") -> None:
        """``pool`` is being closed or disposed: whatever it still lends out is reported now."""
        now = _monotonic()
        self._drain(now)  # a connection already collected is reported as that, not as "out"
        for lease in list(self.leases.values()):
            if lease.pool is pool:
                self._report_at_exit(lease, now, detail)

    def at_exit(self) -> None:
        """The process is exiting: report collected connections, then everything still out."""
        self.watchdog.stop()
        now = _monotonic()
        self._drain(now)
        for lease in list(self.leases.values()):
            self._report_at_exit(lease, now, "process exit")
        self.flush()

    def flush(self) -> None:
        """Deliver queued reports and every sink's pending counts now."""
        self._drain(_monotonic())
        self._flush_sinks(force=True)

    def _flush_sinks(self, force: bool) -> None:
        """Let sinks that count repeats log their counts (all of them, if ``force``)."""
        for sink in list(self.sinks):
            flush = getattr(sink, "flush", None)
            if flush is not None:
                try:
                    flush(force=force)
                except Exception as exc:
                    internal_error("sink.flush", exc)

    def _report_at_exit(self, lease: Lease, now: float, detail: str) -> None:
        if lease.self_returning:
            return  # a checkout the pool returns by itself (a shortcut still running)
        if self._closed_unseen(lease):
            return
        # Out of the ledger, but still found by its connection: if it does come back after
        # all, its checkin sees the flag and a leak.returned follows.
        if self.leases.pop(lease.id, None) is None:
            return
        lease.flagged = lease.reported = True
        self._emit_about(AT_EXIT, lease, now, with_holder_stack=True, detail=detail)

    # -- queries -------------------------------------------------------------------------------

    def checked_out(self, with_holder_stack: bool = False) -> list[Checkout]:
        now = _monotonic()
        return [
            self._snapshot(lease, now, with_holder_stack)
            for lease in list(self.leases.values())
            if _alive(lease) and not self._closed_unseen(lease)
        ]

    def mark(self) -> int:
        """A point in the ledger's history: every checkout made after it has a larger id."""
        return next(self._ids)

    def open_leases(self) -> list[Lease]:
        """Every lease still in the ledger (the pytest plugin's end-of-test check)."""
        return list(self.leases.values())

    def describe(self, lease: Lease, with_holder_stack: bool = False) -> Checkout:
        """A report-ready snapshot of ``lease`` now, as the events carry it."""
        return self._snapshot(lease, _monotonic(), with_holder_stack)

    def deliver(self) -> None:
        """Deliver queued reports (collected connections, returns) now, on this thread."""
        self._drain(_monotonic())

    def current_holder_leases(self) -> list[Lease]:
        thread_id = threading.get_ident()
        loop = _get_running_loop()
        task = None if loop is None else _current_task(loop)
        return [
            lease
            for lease in list(self.leases.values())
            if lease.thread[0] == thread_id
            and (lease.task is None or task is None or lease.task[0]() is task)
        ]

    # -- watchdog side -------------------------------------------------------------------------

    def _tick(self) -> float:
        """One watchdog pass; returns the seconds until the next deadline."""
        now = _monotonic()
        self._drain(now)
        next_deadline = self._scan(now)
        if self.settings.reclaim:
            _reclaim.sweep(self, _monotonic())
        self._drain(_monotonic())
        self._flush_sinks(force=False)
        # With nothing due, sleep at most half a threshold: a checkout made during the sleep
        # is then reported at most 1.5 thresholds after it was taken.
        cap = self.settings.leak_threshold / 2
        if self.settings.reclaim:
            cap = min(cap, _reclaim.CHECK_EVERY)
        if self.settings.dump_signal:
            cap = min(cap, _dump.CHECK_EVERY)
            if _dump.due():
                _dump.write(self.checked_out(with_holder_stack=True))
        return min(next_deadline - _monotonic(), cap)

    def reclaimed(self, lease: Lease, now: float) -> None:
        """``lease``'s connection is about to be reclaimed (``_reclaim``): say so, forget it.

        Out of the ledger first, and unflagged (this runs on the watchdog thread, which alone
        flags): the checkin the library's own give-back causes is then no ``leak.returned``.
        """
        self._forget(lease)
        lease.flagged = False
        lease.reported = True
        self._emit_about(RECLAIMED, lease, now, with_holder_stack=False)

    def _scan(self, now: float) -> float:
        deadlines = self.deadlines
        for key, lease in list(deadlines.unseen.items()):
            # Reported, and its close is seen only here, as a return.
            if self.leases.get(key) is not lease or self._closed_unseen(lease):
                del deadlines.unseen[key]
        for lease in deadlines.due(now):
            # Flag first, then look at t_in: if the holder returned the connection before it
            # saw the flag, t_in is already set and nothing is reported (it came back); if it
            # returns after, it sees the flag and queues leak.returned, which is emitted only
            # once this report has been (``reported`` is set here, on this thread).
            if self._closed_unseen(lease):
                continue
            lease.flagged = True
            if lease.unseen_close:
                deadlines.unseen[lease.id] = lease
            if lease.t_in is not None:
                continue
            lease.reported = True
            self._emit_about(SUSPECTED, lease, now, with_holder_stack=True)
        return deadlines.next_deadline()

    def _drain(self, now: float) -> None:
        pending = self._pending
        while pending:
            try:
                kind, item, when = pending.popleft()
            except IndexError:
                return
            if kind == COLLECTED:
                lease_id, key = item
                indexed = self.by_conn.get(key)
                if indexed is not None and indexed.id == lease_id:
                    del self.by_conn[key]  # also for a lease already reported at close
                lease = self.leases.get(lease_id)
                if lease is None or not self._forget(lease):
                    continue
                if lease.unseen_close:  # closed or not: nothing to tell
                    lease.t_in = when
                    if self.observer is not None:
                        self._observe_checkin(lease, False, discarded=True)
                    continue
                lease.flagged = lease.reported = True
                event = self._emit_about(COLLECTED, lease, when, with_holder_stack=False)
                kind_info = self.kinds.get(lease.pool.kind)
                if event.checkout is not None and kind_info is not None and kind_info.loses_slots:
                    lease.pool.lost.append(event.checkout)
            else:  # RETURNED or _SETTLE: a lease the watchdog had looked at came back
                if kind == RETURNED and item.reported:
                    self._emit_about(RETURNED, item, when, with_holder_stack=False)
                observer = self.observer
                if observer is not None:
                    try:
                        observer.settled(item)
                    except Exception as exc:
                        internal_error("observer.checkin", exc)

    def _closed_unseen(self, lease: Lease) -> bool:
        """Whether ``lease``'s connection was closed where no hook saw it; then checked in.

        Off the hot path only (the watchdog's deadline, exit, listings): a read of the live
        connection's state, never I/O.
        """
        closed = lease.closed
        if closed is None or lease.ref is None:
            return False
        conn = lease.ref()
        if conn is None:
            return False
        try:
            if not closed(conn):
                return False
        except Exception as exc:
            internal_error(f"{lease.pool.kind}.closed", exc)
            return False
        del conn
        self.checkin(lease)
        return True

    def _emit_about(
        self,
        kind: str,
        lease: Lease,
        now: float,
        with_holder_stack: bool,
        detail: str | None = None,
    ) -> LeakEvent:
        threshold = lease.threshold
        event = LeakEvent(
            kind,
            lease.pool.name,
            checkout=self._snapshot(lease, now, with_holder_stack),
            threshold_s=threshold if math.isfinite(threshold) else None,
            detail=detail,
        )
        self.emit(event)
        observer = self.observer
        if observer is not None:
            try:
                observer.lease_event(lease, event, now)
            except Exception as exc:
                internal_error("observer.event", exc)
        return event

    def _snapshot(self, lease: Lease, now: float, with_holder_stack: bool) -> Checkout:
        end = lease.t_in if lease.t_in is not None and lease.t_in < now else now
        holder_stack, finished = self._holder_now(lease) if with_holder_stack else (None, False)
        return Checkout(
            checkout_id=lease.id,
            pool=lease.pool.name,
            held_s=max(0.0, end - lease.t0),
            holder=lease.holder(),
            stack=_stack.format_raw(lease.raw),
            holder_stack=holder_stack,
            holder_finished=finished,
            context=lease.context,
            state=lease.state() or self._driver_state(lease),
        )

    def _driver_state(self, lease: Lease) -> str | None:
        """What the pool's adapter reads off the lent connection (no adapter probe was set)."""
        kind = self.kinds.get(lease.pool.kind)
        conn = lease.ref() if lease.ref is not None else None
        if kind is None or kind.state is None or conn is None:
            return None
        try:
            return kind.state(conn)
        except Exception as exc:
            internal_error(f"{lease.pool.kind}.state", exc)
            return None

    def _holder_now(self, lease: Lease) -> tuple[list[str] | None, bool]:
        """Where the holder is now, and whether it has finished.

        "Stuck in a slow call" and "forgot to return" look alike from the ledger; the holder's
        current line tells them apart, and a finished holder all but settles it: only code that
        kept the connection somewhere else could still give it back.
        """
        limit = self.settings.stack_depth
        try:
            if lease.task is not None:
                task = lease.task[0]()
                if task is None or task.done():
                    return None, True
                if _current_task(task.get_loop()) is not task:
                    # Suspended at an await: its coroutine chain, oldest first.
                    stack = _stack.format_frames(
                        _stack.task_frames(task), limit, newest_first=False
                    )
                    return stack, False
                # Running (the loop is blocked inside it): the thread's live stack says where.
            thread = lease.thread[2]()
            frame = sys._current_frames().get(lease.thread[0])
            if thread is None or not thread.is_alive() or frame is None:
                return None, True
            return _stack.format_frames(_stack.walk(frame), limit, newest_first=True), False
        except Exception as exc:
            internal_error("core.holder_stack", exc)
            return None, False

    # -- delivery ------------------------------------------------------------------------------

    def emit(self, event: LeakEvent) -> None:
        """Give ``event`` to every sink; one failing sink does not silence the others."""
        for sink in list(self.sinks):
            try:
                sink(event)
            except Exception as exc:
                internal_error(f"sink {getattr(sink, '__name__', type(sink).__name__)}", exc)
        if event.event in _CONNECT_EVENTS:
            # Emitted by the retry loop in the caller's thread or task: the observer can put
            # them on what the caller is doing (its current span).
            observer = self.observer_now()
            if observer is not None:
                try:
                    observer.pool_event(event)
                except Exception as exc:
                    internal_error("observer.event", exc)

    def _over_bound(self) -> None:
        self.untracked += 1
        if not self._untracked_warned:
            self._untracked_warned = True
            say(
                _log,
                logging.WARNING,
                "pgleak: %d checkouts are tracked (max_tracked); further checkouts are counted "
                "but not tracked until some come back",
                self.settings.max_tracked,
            )

    # -- lifecycle -----------------------------------------------------------------------------

    def reset_after_fork(self) -> None:
        """A forked child inherits none of its parent's checkouts and needs its own watchdog."""
        global _generation
        _generation += 1
        # The same containers, emptied: adapters' wrappers and the C ledger hold them.
        self.leases.clear()
        self.by_conn.clear()
        self._pending.clear()
        self.deadlines.clear()
        self.untracked = 0
        self._untracked_warned = False
        _thread_local.__dict__.clear()
        if _fast_ledger is not None:
            _fast_ledger.forget_thread()  # the C ledger's copy of the identity
        self.watchdog.reset_after_fork()

    def clear(self) -> None:
        """Forget every checkout (``uninstall()``): nothing is tracked or counted any more."""
        self.leases.clear()
        self.by_conn.clear()
        self._pending.clear()
        self.deadlines.clear()
        self.untracked = 0
        self._untracked_warned = False


_CONNECT_EVENTS = frozenset({CONNECT_RETRY, CONNECT_GAVE_UP})


def _alive(lease: Lease) -> bool:
    """False once the user-facing connection was collected (its report may still be queued)."""
    return lease.ref is None or lease.ref() is not None


# The C ledger, bound to this module's objects (pgleak._cledger); None without it.
from pgleak import _cledger  # noqa: E402 (it is given this module's names, defined above)

_fast_ledger: Any = _cledger.bind(globals())

#: The process-wide core. Adapters import this object; there is exactly one per process.
core = Core()
if _fast_ledger is not None:
    _fast_ledger.adopt(core)
