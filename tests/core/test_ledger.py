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
from typing import Any

import pytest

import pgleak
from pgleak import _core
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
