"""The C ledger (``checkout``/``checkin`` in pgleak/_speedups.c) against the Python one.

Both must leave the same lease in the same ledger: every other part of pgleak reads leases
without knowing which one made them. The rest of the suite runs through the C ledger where it
is built; CI runs it once more as an unprivileged user with ``PGLEAK_NO_SPEEDUPS=1``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import sys
import weakref
from typing import Any, cast

import pytest

import pgleak
from pgleak import _cledger, _core
from pgleak._core import Core, Lease, core
from pgleak._events import COLLECTED, RETURNED

pytestmark = pytest.mark.skipif(
    _core._fast_ledger is None,
    reason="pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: the "
    "Python ledger runs, and the rest of the suite tests that one",
)

#: Differ between any two checkouts: compared by kind, not value.
_PER_CHECKOUT = {"id", "t0", "deadline", "ref", "key", "raw", "task"}


class Conn:
    pass


class Pool:
    pass


def _out(handle: Any, conn: Any, index: bool = True) -> Lease:
    lease = core.checkout(handle, conn, index, None)
    assert lease is not None
    return lease


def _slots(lease: Lease) -> dict[str, Any]:
    return {name: getattr(lease, name) for name in Lease.__slots__}


def _checkout_here(ledger: Core, handle: Any, conn: Any, python: bool) -> Any:
    # One frame between the test and the ledger, as an adapter's wrapper is.
    if python:
        return Core.checkout(ledger, handle, conn, True, None)
    return ledger.checkout(handle, conn, True, None)


@pytest.mark.parametrize("which", ["process core", "another core"])
def test_same_lease_either_way(installed: pgleak.Settings, which: str) -> None:
    ledger = core if which == "process core" else Core()
    ledger.configure(installed)
    pool, conn_c, conn_py = Pool(), Conn(), Conn()
    handle = ledger.pool(pool, "test")
    _cledger.vars_set()
    token = _core.context.set("GET /x")
    try:
        made_c = _checkout_here(ledger, handle, conn_c, python=False)
        made_py = _checkout_here(ledger, handle, conn_py, python=True)
    finally:
        _core.context.reset(token)
    assert isinstance(made_c, Lease)
    assert isinstance(made_py, Lease)
    c, py = _slots(made_c), _slots(made_py)
    for name in Lease.__slots__:
        if name not in _PER_CHECKOUT:
            assert c[name] == py[name], name
    assert made_c.context == "GET /x"
    assert made_c.id + 1 == made_py.id
    assert made_c.deadline - made_c.t0 == pytest.approx(installed.leak_threshold)
    ref: Any = made_c.ref
    assert ref() is conn_c
    assert ref.key == id(conn_c) == made_c.key
    assert ref.lease_id == made_c.id
    # Both start at the caller's frame (at two different lines of it).
    assert made_c.raw[0] is made_py.raw[0] is _checkout_here.__code__
    assert made_c.raw[0::2] == made_py.raw[0::2]  # the same frames, each at its line
    assert ledger.leases[made_c.id] is made_c
    assert ledger.by_conn[id(conn_c)] is made_c
    ledger.checkin(made_c)
    Core.checkin(ledger, made_py)
    assert made_c.t_in is not None
    assert made_py.t_in is not None
    assert made_c.id not in ledger.leases
    assert id(conn_c) not in ledger.by_conn
    assert not ledger.leases


@pytest.mark.parametrize("cached", [True, False], ids=["verdicts cached", "caches empty"])
def test_thread_stack_either_way(installed: pgleak.Settings, cached: bool) -> None:
    """The C ledger walks a thread's interpreter frames without frame objects (3.11-3.13);
    with a frame it has no verdict for it hands the walk to Python. Either way the pairs are
    the Python ledger's, line for line."""
    from pgleak import _stack

    handle = core.pool(Pool(), "test")
    conn_c, conn_py = Conn(), Conn()

    def nested(depth: int) -> tuple[Any, Any]:
        if depth:
            return nested(depth - 1)
        if not cached:
            _stack._skip_cache.clear()
        made_c = core.checkout(handle, conn_c, True, None)
        made_py = Core.checkout(core, handle, conn_py, True, None)
        return made_c, made_py

    made_c, made_py = nested(5)
    try:
        assert made_c.raw[0] is nested.__code__
        assert made_c.raw[0::2] == made_py.raw[0::2]
        # the first line differs (two calls); every caller's line is the same
        assert made_c.raw[3::2] == made_py.raw[3::2]
        assert len(made_c.raw) == 2 * installed.stack_depth
    finally:
        core.checkin(made_c)
        core.checkin(made_py)


def test_off_suppressed_and_allowances(installed: pgleak.Settings) -> None:
    handle = core.pool(Pool(), "test")
    conn = Conn()
    with pgleak.suppress():
        assert core.checkout(handle, conn, True, None) is None
    with pgleak.allow_long_hold(3600):
        lease = _out(handle, conn, True)
    assert lease.deadline - lease.t0 == pytest.approx(3600)
    core.checkin(lease)
    _cledger.vars_set()
    token = _core.allowance.set(math.inf)
    try:
        lease = _out(handle, conn, True)
    finally:
        _core.allowance.reset(token)
    assert lease.self_returning is True
    core.checkin(lease)
    core.configure(dataclasses.replace(installed, enabled=False))
    try:
        assert core.checkout(handle, conn, True, None) is None
    finally:
        core.configure(installed)


def test_lent_again_forgets_the_unseen_checkin(installed: pgleak.Settings) -> None:
    handle = core.pool(Pool(), "test")
    conn = Conn()
    first = _out(handle, conn, True)
    second = _out(handle, conn, True)
    assert first.id not in core.leases
    assert core.by_conn[id(conn)] is second
    core.checkin(second)
    assert not core.leases


def test_a_late_checkin_leaves_the_connections_new_lease_filed(
    installed: pgleak.Settings,
) -> None:
    # The C checkin takes its lease out of by_conn in one probe and must put back what it
    # took if that is another lease's: here the checkout that lent the connection again.
    handle = core.pool(Pool(), "test")
    conn = Conn()
    first = _out(handle, conn, True)
    second = _out(handle, conn, True)
    core.checkin(first)
    assert core.by_conn[id(conn)] is second
    assert core.leases == {second.id: second}
    core.checkin(second)
    assert id(conn) not in core.by_conn
    assert not core.leases


def test_collected_before_checkin_is_queued_not_returned(installed: pgleak.Settings) -> None:
    handle = core.pool(Pool(), "test")
    conn = Conn()
    lease = _out(handle, conn, False)
    ref: Any = lease.ref
    del conn
    assert ref() is None
    core._pending.clear()
    core.checkin(lease)
    kinds = [entry[0] for entry in core._pending]
    assert kinds == [COLLECTED]
    assert lease.t_in is None


def test_flagged_checkin_queues_the_follow_up(installed: pgleak.Settings) -> None:
    handle = core.pool(Pool(), "test")
    conn = Conn()
    lease = _out(handle, conn, True)
    lease.flagged = True
    core._pending.clear()
    core.checkin(lease)
    assert [(entry[0], entry[1]) for entry in core._pending] == [(RETURNED, lease)]
    core._pending.clear()


def test_keywords_and_not_weak_referenceable(installed: pgleak.Settings) -> None:
    handle = core.pool(Pool(), "test")
    conn = Conn()
    lease = core.checkout(handle, conn=conn, hold=7.0)  # keywords: the Python method
    assert lease is not None
    assert lease.deadline - lease.t0 == pytest.approx(7.0)
    core.checkin(lease)
    plain = _out(handle, 42, True)  # an int has no weak reference
    assert plain.ref is None
    assert plain.key is None
    core.checkin(plain)
    assert not core.leases


def test_in_a_task_the_lease_names_it(installed: pgleak.Settings) -> None:
    handle = core.pool(Pool(), "test")

    conn = Conn()

    async def work() -> Lease:
        return _out(handle, conn, False)

    async def main() -> Lease:
        return await asyncio.create_task(work(), name="the-worker")

    lease = asyncio.run(main())
    assert lease.task is not None
    assert lease.task[1] == "the-worker"
    assert isinstance(lease.task[0], weakref.ref)
    core.checkin(lease)


def test_the_process_core_uses_it() -> None:
    assert core.checkout.__func__ is _core._fast_ledger.checkout  # type: ignore[attr-defined]
    assert sys.modules["pgleak._speedups"] is _core._fast_ledger


def test_its_clock_is_time_monotonic(installed: pgleak.Settings) -> None:
    """The C ledger reads the monotonic clock itself, not through ``time.monotonic()``: its
    t0 and t_in must be that clock's readings, as exact (held times are their differences,
    and the watchdog compares them with its own ``time.monotonic()``)."""
    import time

    handle = core.pool(Pool(), "test", None)
    conn = Conn()
    for _ in range(200):
        before = time.monotonic()
        lease = _out(handle, conn)
        between = time.monotonic()
        core.checkin(lease)
        after = time.monotonic()
        assert type(lease.t0) is float
        assert before <= lease.t0 <= between <= lease.t_in <= after  # type: ignore[operator]


class _Seen:
    """An observer that notes what it is told (checkouts and checkins)."""

    def __init__(self) -> None:
        self.seen: list[tuple[str, int]] = []

    def checked_out(self, lease: Lease, since: float | None) -> None:
        self.seen.append(("out", lease.id))

    def checked_in(self, lease: Lease, late: bool, discarded: bool) -> None:
        self.seen.append(("in", lease.id))


def _set_observer(ledger: Core, observer: Any) -> None:
    # One attribute store, run often enough below to be specialised by the interpreter.
    ledger.observer = observer


def _cycle(handle: Any, conn: Any) -> Lease:
    lease = _out(handle, conn)
    core.checkin(lease)
    return lease


def test_kept_answers_follow_every_change(
    installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C ledger keeps its answers to "anything rare?" (settings, generation, watchdog,
    observer, waker) between checkouts; any change to any of them must be seen at the next."""
    import types

    handle = core.pool(Pool(), "test")
    conn = Conn()
    for _ in range(300):  # quiet checkouts, with the observer's store specialised
        _set_observer(core, None)
        _cycle(handle, conn)
    # kept on every version (3.13 too: Core's and Watchdog's attributes are in their dicts)
    assert _core._fast_ledger.kept()
    # an observer set by a plain attribute store
    seen = _Seen()
    _set_observer(core, seen)
    assert not _core._fast_ledger.kept()
    lease = _cycle(handle, conn)
    assert seen.seen == [("out", lease.id), ("in", lease.id)]
    _set_observer(core, None)
    _cycle(handle, conn)
    assert len(seen.seen) == 2
    # ... and by monkeypatch, with a checkout in between that kept the quiet answers again
    monkeypatch.setattr(core, "observer", seen)
    lease = _cycle(handle, conn)
    assert seen.seen[2:] == [("out", lease.id), ("in", lease.id)]
    monkeypatch.setattr(core, "observer", None)
    _cycle(handle, conn)
    # new settings
    core.configure(dataclasses.replace(installed, leak_threshold=123.0))
    lease = _cycle(handle, conn)
    assert lease.deadline - lease.t0 == pytest.approx(123.0)
    core.configure(dataclasses.replace(installed, enabled=False))
    assert core.checkout(handle, conn, True, None) is None
    core.configure(installed)
    lease = _cycle(handle, conn)
    assert lease.deadline - lease.t0 == pytest.approx(installed.leak_threshold)
    # the settings another core saw last are not this one's
    other = Core()
    other.configure(dataclasses.replace(installed, leak_threshold=77.0))
    other_lease = other.checkout(handle, Conn(), True, None)
    assert other_lease is not None
    other.checkin(other_lease)
    other.watchdog.stop()
    lease = _cycle(handle, conn)
    assert lease.deadline - lease.t0 == pytest.approx(installed.leak_threshold)
    # the watchdog stopped: the next checkout starts it again
    core.watchdog.stop()
    assert core.watchdog.thread is None
    _cycle(handle, conn)
    assert core.watchdog.thread is not None
    # a new generation (a fork's): a lease from before it is not this process's
    before = _out(handle, conn)
    monkeypatch.setattr(_core, "_generation", _core._generation + 1)
    conn_after = Conn()
    after = _out(handle, conn_after)
    assert after.generation == _core._generation != before.generation
    core.checkin(before)
    assert before.t_in is None
    assert before.id in core.leases
    core.checkin(after)
    assert after.t_in is not None
    monkeypatch.undo()
    core.leases.pop(before.id)
    core.by_conn.pop(id(conn), None)
    # a waiting observer whose gate's globals are None is not asked; once one is set, it is
    tracer, meter = types.ModuleType("tracer"), types.ModuleType("meter")
    tracer.provider = meter.provider = None
    asked: list[int] = []

    def waker() -> Any:
        asked.append(1)
        return None

    core.wake_gate = (tracer, "provider", meter, "provider")
    core.waker = waker
    for _ in range(3):
        _cycle(handle, conn)
    assert asked == []
    meter.provider = object()
    _cycle(handle, conn)
    assert asked == [1]
    meter.provider = None
    _cycle(handle, conn)
    _cycle(handle, conn)
    assert asked == [1]
    core.waker = core.wake_gate = None
    assert not core.leases
    # the watchdog's own attributes are watched as well
    _cycle(handle, conn)
    assert _core._fast_ledger.kept()
    core.watchdog.extra = 1
    assert not _core._fast_ledger.kept()
    del core.watchdog.extra
    _cycle(handle, conn)
    assert _core._fast_ledger.kept()


def test_kept_answers_need_attributes_in_the_dicts() -> None:
    """From 3.13 a class with no slot of its own stores its instances' attributes inline,
    where no dict watcher sees them change: Core and Watchdog keep a slot for that."""
    from pgleak._watchdog import Watchdog

    inline = 1 << 2  # Py_TPFLAGS_INLINE_VALUES (3.13)
    assert not Core.__flags__ & inline
    assert not Watchdog.__flags__ & inline
    assert "__dict__" in Core.__slots__
    assert "__dict__" in Watchdog.__slots__


def test_thread_identity_of_each_thread(installed: pgleak.Settings) -> None:
    """The C ledger gives the identity it gave last while the thread state is the same (its
    id, never reused): threads run one after the other, whose states may share an address,
    each get their own, as the Python ledger gives them."""
    import threading

    handle = core.pool(Pool(), "test")
    made: list[tuple[Any, Any, threading.Thread]] = []

    def run() -> None:
        for _ in range(2):
            made_c = _out(handle, Conn())
            made_py = Core.checkout(core, handle, Conn(), True, None)
            assert made_py is not None
            made.append((made_c.thread, made_py.thread, threading.current_thread()))
            core.checkin(made_c)
            core.checkin(made_py)

    for n in range(6):
        thread = threading.Thread(target=run, name=f"worker-{n}")
        thread.start()
        thread.join()
        run()  # and the main thread's between them
    assert len(made) == 24
    for c, py, thread in made:
        assert c is py
        assert c[0] == thread.ident
        assert c[1] == thread.name
        assert c[2]() is thread or (c[2]() is None and thread.name.startswith("worker-"))
    assert len({c[1] for c, _, _ in made}) == 7


def test_current_task_lookup_agrees_with_asyncio() -> None:
    """``_core._current_task(loop)`` (and the C ledger's read of it) is asyncio's
    ``current_task(loop)``: before 3.14 the dict asyncio reads, eager tasks included."""

    async def inner() -> bool:
        loop = asyncio.get_running_loop()
        return _core._current_task(loop) is asyncio.current_task() is not None

    async def outer() -> list[bool]:
        loop = asyncio.get_running_loop()
        seen = [await inner(), await asyncio.create_task(inner())]
        factory = getattr(asyncio, "eager_task_factory", None)
        if factory is not None:
            loop.set_task_factory(factory)
            seen.append(await asyncio.create_task(inner()))
            loop.set_task_factory(None)
        return seen

    assert all(asyncio.run(outer()))
    if (3, 10) <= sys.version_info < (3, 14):
        assert getattr(_core._current_task, "__self__", None) is getattr(
            asyncio.tasks, "_current_tasks", None
        )


class _Told:
    """An observer that notes every argument it is given, and raises when asked to."""

    def __init__(self) -> None:
        self.told: list[tuple[Any, ...]] = []
        self.fail: BaseException | None = None

    def checked_out(self, lease: Lease, since: float | None) -> None:
        self.told.append(("out", lease.id, since))
        if self.fail is not None:
            raise self.fail

    def checked_in(self, lease: Lease, late: bool, discarded: bool) -> None:
        self.told.append(("in", lease.id, late, discarded))
        if self.fail is not None:
            raise self.fail


@pytest.mark.internal_errors
@pytest.mark.parametrize("python", [False, True], ids=["C ledger", "Python ledger"])
def test_the_observer_is_told_alike_either_way(installed: pgleak.Settings, python: bool) -> None:
    """The C ledger calls the observer's ``checked_out`` / ``checked_in`` itself (not through
    ``Core._after_checkout`` / ``_observe_checkin``): the same arguments, a late checkin's flag,
    a fault reported at the same site and swallowed, anything else propagated."""
    from pgleak import _guard

    handle = core.pool(Pool(), "test")
    conn = Conn()
    told = _Told()

    def checkout(*args: Any) -> Lease:
        lease = Core.checkout(core, *args) if python else core.checkout(*args)
        assert lease is not None
        return lease

    checkin = (lambda lease: Core.checkin(core, lease)) if python else core.checkin
    _cycle(handle, conn)  # the watchdog started: the observer's common case from here on
    core.observer = cast("Any", told)
    try:
        lease = checkout(handle, conn, True, 12.5)
        checkin(lease)
        late = checkout(handle, conn, True, None)
        late.flagged = True
        checkin(late)
        assert core._pending.pop()[1] is late
        assert told.told == [
            ("out", lease.id, 12.5),
            ("in", lease.id, False, False),
            ("out", late.id, None),
            ("in", late.id, True, False),
        ]
        # a fault of the observer's: reported once per site, the cycle carries on
        told.fail = RuntimeError("observer broke")
        _guard.reset()
        lease = checkout(handle, conn, True, None)
        assert core.leases[lease.id] is lease
        checkin(lease)
        assert lease.id not in core.leases
        assert [(site, repr(exc)) for site, exc in _guard.swallowed] == [
            ("observer.checkout", "RuntimeError('observer broke')"),
            ("observer.checkin", "RuntimeError('observer broke')"),
        ]
        assert _guard.swallowed[0][1].__traceback__ is not None
        # anything that is not an Exception is the application's: it propagates
        told.fail = KeyboardInterrupt()
        with pytest.raises(KeyboardInterrupt):
            checkout(handle, conn, True, None)
        held = core.lease_of(conn)
        assert held is not None
        with pytest.raises(KeyboardInterrupt):
            checkin(held)
        assert held.id not in core.leases
    finally:
        core.observer = None
    assert not core.leases


def test_freed_leases_let_go_of_what_they_held(installed: pgleak.Settings) -> None:
    """Leases and their weak references are freed by the C ledger's own deallocs: everything
    their slots held must be released, a subclass's own slots too."""
    import gc

    handle = core.pool(Pool(), "test")
    conn = Conn()
    lease = _out(handle, conn)
    held, in_ref = Conn(), Conn()
    lease.probe = held  # type: ignore[assignment]
    ref: Any = lease.ref
    ref.key = in_ref
    watched = [weakref.ref(held), weakref.ref(in_ref)]
    core.checkin(lease)
    del lease, ref, held, in_ref
    assert [w() for w in watched] == [None, None]

    class MoreLease(Lease):
        __slots__ = ("extra",)

    class MoreRef(_core._ConnRef):
        __slots__ = ("extra",)

    gc.collect()
    objects = [Conn() for _ in range(4)]
    watched = [weakref.ref(obj) for obj in objects]
    more = MoreLease(1, objects[0], 0.0, 1.0, _core._thread_identity(), (), None)  # type: ignore[arg-type]
    more.extra = objects[1]  # type: ignore[attr-defined]
    more_ref = MoreRef(conn)
    more_ref.key, more_ref.extra = objects[2], objects[3]  # type: ignore[assignment,attr-defined]
    more.ref = more_ref
    del more, more_ref, objects
    assert [w() for w in watched] == [None] * 4


# Forking while pgleak's watchdog thread runs is part of the case (3.12+ warns about it).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_asyncio_holder_either_way_and_in_a_forked_child(installed: pgleak.Settings) -> None:
    """The C ledger reads asyncio's running loop from its holder (3.10 and 3.11: no
    ``getpid()`` system call per checkout), checking the holder's pid against the one it last
    read. A task's checkout names the task, a later loop's names its own, none outside a loop;
    and a child forked while the loop runs sees no running loop, as asyncio's own check says."""
    import os

    handle = core.pool(Pool(), "test")

    async def holders() -> list[Any]:
        seen = []
        for _ in range(2):  # the first adopts the holder, the second reads it
            conn_c, conn_py = Conn(), Conn()
            made_c = _out(handle, conn_c)
            made_py = Core.checkout(core, handle, conn_py, True, None)
            assert made_py is not None
            seen.append((made_c.task, made_py.task, asyncio.current_task()))
            core.checkin(made_c)
            core.checkin(made_py)
        return seen

    for _ in range(2):  # two loops, two tasks, one thread
        for c, py, task in asyncio.run(holders()):
            assert c[0]() is py[0]() is task
            assert c[1] == py[1] == task.get_name()
    conn = Conn()
    outside = _out(handle, conn)
    assert outside.task is None
    core.checkin(outside)

    if not hasattr(os, "fork"):
        return

    async def fork_inside() -> tuple[int, bytes]:
        read, write = os.pipe()
        pid = os.fork()
        if pid == 0:  # the child: no running loop here, as asyncio says
            try:
                conn = Conn()
                lease = _out(handle, conn)
                said = asyncio.events._get_running_loop()
                os.write(write, b"%d %d" % (lease.task is None, said is None))
            finally:
                os._exit(0)
        os.close(write)
        with os.fdopen(read, "rb") as out:
            answer = out.read()
        return os.waitpid(pid, 0)[1], answer

    status, answer = asyncio.run(fork_inside())
    assert status == 0
    assert answer == b"1 1"


#: A fresh process: nothing has set the context variables yet, so checkouts take their
#: defaults unread; each API that sets one turns the reads on before its value is seen.
_VARS_UNSET = """
import sys, pgleak
from pgleak import _core, _stack
from pgleak._core import core

class Pool: pass
class Conn: pass

pgleak.install(leak_threshold=60)
fast = _stack._fast
handle = core.pool(Pool(), "test")
seen = []

def out():
    conn = Conn()
    lease = core.checkout(handle, conn, True)
    seen.append((fast.vars_read(), lease and (lease.context, lease.self_returning,
                                             round(lease.deadline - lease.t0))))
    if lease is not None:
        core.checkin(lease)

out()
with pgleak.context("GET /x"):
    out()
out()
with pgleak.suppress():
    out()
with pgleak.allow_long_hold(3600):
    out()
print(seen)
"""


def test_the_variables_are_read_once_anything_set_them() -> None:
    import subprocess

    done = subprocess.run(
        [sys.executable, "-c", _VARS_UNSET],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == repr(
        [
            (False, (None, False, 60)),
            (True, ("GET /x", False, 60)),
            (True, (None, False, 60)),
            (True, None),
            (True, (None, False, 3600)),
        ]
    )


def test_a_freed_lease_is_kept_and_comes_back_as_new(installed: pgleak.Settings) -> None:
    """The C ledger keeps the last few freed Leases for the next checkouts (no allocation and
    no free a cycle): a kept one comes back with every slot as a new lease's, nothing of its
    last use; a subclass's instance is freed, never kept."""
    from pgleak import _stack

    fast = _stack._fast
    handle = core.pool(Pool(), "test")
    conns = [Conn() for _ in range(8)]
    held = [_out(handle, conn) for conn in conns]  # whatever was kept is taken
    assert fast.leases_kept() == 0
    conn = Conn()
    first = _out(handle, conn)
    first.probe = first.closed = lambda *_: None  # type: ignore[assignment]
    first.otel, first.reported, first.unseen_close = object(), True, True
    address = id(first)
    core.checkin(first)
    del first
    assert fast.leases_kept() == 1
    again = _out(handle, conn)
    assert id(again) == address
    assert fast.leases_kept() == 0
    fresh = Core.checkout(core, handle, Conn(), True, None)
    assert fresh is not None
    c, py = _slots(again), _slots(fresh)
    for name in Lease.__slots__:
        if name not in _PER_CHECKOUT:
            assert c[name] == py[name], name
    assert cast(Any, again.ref)() is conn
    assert again.t_in is None
    assert core.leases[again.id] is again
    assert core.by_conn[id(conn)] is again
    for lease in [*held, again, fresh]:
        core.checkin(lease)
    del held, again, fresh, lease
    last = _out(handle, conn)  # one taken: there is room for another
    kept = fast.leases_kept()
    assert kept < 4

    class MoreLease(Lease):
        __slots__ = ("extra",)

    more = MoreLease(1, handle, 0.0, 1.0, _core._thread_identity(), (), None)
    del more
    assert fast.leases_kept() == kept
    core.checkin(last)


def test_a_freed_leases_reference_serves_the_connections_next_checkout(
    events: Any,
) -> None:
    """A lease filed by its connection leaves its weak reference, once freed with nothing else
    holding it, to the same connection's next checkout (the C ledger keeps it): the new lease
    then names itself in it. A lease still held keeps its own; and a kept one whose connection
    is collected meanwhile tells of no leak."""
    import gc

    from pgleak import _stack
    from pgleak.testing import run_watchdog

    fast = _stack._fast

    def kept(ref_id: int) -> bool:
        return any(id(ref) == ref_id for ref in fast.connrefs_kept())

    handle = core.pool(Pool(), "test")
    conn = Conn()
    first = _out(handle, conn)
    ref_id = id(first.ref)  # not held: only the lease may hold it
    core.checkin(first)
    del first
    assert kept(ref_id)
    again = _out(handle, conn)
    ref: Any = again.ref
    assert id(ref) == ref_id
    assert (ref(), ref.lease_id, ref.key) == (conn, again.id, id(conn))
    assert not kept(ref_id)
    core.checkin(again)
    held = again  # held by more than its lease when the lease is freed: stays its own
    del again
    other = _out(handle, conn)
    assert other.ref is not ref
    assert (ref.lease_id, held.ref) == (held.id, ref)
    core.checkin(other)
    del other
    del held  # freed while something else holds its reference: not kept
    assert not kept(id(ref))
    del ref
    unfiled = _out(handle, conn, index=False)  # not filed by its connection: never kept
    unfiled_id = id(unfiled.ref)
    core.checkin(unfiled)
    del unfiled
    assert not kept(unfiled_id)
    assert any(ref() is conn for ref in fast.connrefs_kept())
    del conn
    gc.collect()
    run_watchdog()
    assert events.events == []
    assert not core.leases
    assert not core.by_conn
