"""asyncio checkouts and checkins through the C awaitables (``acquiring``/``releasing`` in
pgleak/_speedups.c) against the ``async def`` templates they stand in for.

An asyncio pool's wrapper hands the library's coroutine to one of them instead of awaiting it
in a coroutine of its own: the checkout, the checkin and the wait that ran out must come out
as the ``async def`` made them (same holder, same stack, same reports), and the object must
behave as the coroutine did for whoever drives it (``await``, a task, ``send``/``throw``,
cancellation).
"""

from __future__ import annotations

import asyncio
import collections.abc
import types
from collections.abc import Iterator
from typing import Any

import pytest

import pgleak
from pgleak import _adapter
from pgleak._core import Lease, core

pytestmark = pytest.mark.skipif(
    _adapter.c_awaitables() is None,
    reason="pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: the "
    "async def templates run, and the rest of the suite tests those",
)


class Refused(Exception):
    pass


class Exhausted(Exception):
    pass


class Conn:
    pass


class Pool:
    """An asyncio pool of the shape psycopg_pool's is: ``getconn``/``putconn`` coroutines."""

    def __init__(self) -> None:
        self.free = [Conn(), Conn()]
        self.gate: asyncio.Event | None = None
        self.fail_release: BaseException | None = None

    async def getconn(self, timeout: float | None = None) -> Conn:
        if self.gate is not None:
            await self.gate.wait()
        if not self.free:
            raise Exhausted(f"no connection within {timeout}")
        return self.free.pop()

    async def putconn(self, conn: Conn) -> None:
        await asyncio.sleep(0)
        if not isinstance(conn, Conn):
            raise Refused("not mine")
        if self.fail_release is not None:
            raise self.fail_release
        self.free.append(conn)


class _Adapter(_adapter.Adapter):
    name = "fake_async"
    module = "asyncio"
    distribution = "no-such-distribution"

    def _install(self) -> None:
        self.track_acquire(
            Pool,
            "getconn",
            namer=lambda pool: "fake pool",
            is_timeout=lambda err: isinstance(err, Exhausted),
            is_async=True,
        )
        self.track_release(Pool, "putconn", refused=(Refused,), is_async=True)


#: The three ways the fake pool is wrapped: C wrappers (``pgleak._speedups.Tracked``) that
#: return the C awaitables, Python functions that do (``_AACQUIRE_FAST``/``_ARELEASE_FAST``),
#: the ``async def`` templates.
_WAYS = ["c", "c_awaitables", "python"]


def _wrapped_so(which: str, monkeypatch: Any) -> None:
    if which == "python":
        monkeypatch.setattr(_adapter, "c_awaitables", lambda: None)
    elif which == "c_awaitables":
        monkeypatch.setattr(_adapter, "use_c_wrappers", False)


@pytest.fixture(params=_WAYS)
def adapter(request: Any, installed: pgleak.Settings, monkeypatch: Any) -> Iterator[str]:
    """The fake pool wrapped one of the three ways (``_WAYS``)."""
    _wrapped_so(request.param, monkeypatch)
    fake = _Adapter()
    fake.install()
    try:
        yield request.param
    finally:
        fake.uninstall()


def _leases() -> list[Lease]:
    return [lease for lease in core.leases.values() if lease.pool.kind == "fake_async"]


def _user_line(lease: Lease) -> list[str]:
    return pgleak._stack.format_raw(lease.raw)


def test_the_wrappers_are_what_the_fixture_says(adapter: str) -> None:
    pool = Pool()
    made = pool.getconn()
    is_c = type(made).__name__ == "Awaiting"
    assert is_c == (adapter != "python")
    assert isinstance(made, collections.abc.Coroutine)
    made.close()
    tracked = getattr(pgleak._stack._fast, "Tracked", None)
    for attr in ("getconn", "putconn"):
        wrapper = Pool.__dict__[attr]
        assert (type(wrapper) is tracked) == (adapter == "c"), attr
        assert (type(wrapper) is types.FunctionType) == (adapter != "c"), attr


def test_checkout_and_checkin_name_the_task_and_the_await_line(adapter: str) -> None:
    pool = Pool()

    async def work() -> tuple[list[str], Any, int]:
        conn = await pool.getconn(timeout=1.0)  # the line
        (lease,) = _leases()
        stack = _user_line(lease)
        task = lease.task
        await pool.putconn(conn)
        return stack, task, len(_leases())

    async def main() -> Any:
        return await asyncio.create_task(work(), name="the-worker")

    stack, task, left = asyncio.run(main())
    assert stack[-1].endswith("in work")
    assert "test_awaiting.py" in stack[-1]
    assert task is not None
    assert task[1] == "the-worker"
    assert left == 0
    assert len(pool.free) == 2


async def _checked_out_frames(pool: Pool) -> tuple[Any, ...]:
    conn = await pool.getconn()
    (lease,) = _leases()
    await pool.putconn(conn)
    return lease.raw[0::2]


def test_same_stack_either_way(installed: pgleak.Settings, monkeypatch: Any) -> None:
    """The C awaitable's checkout starts at the frame that awaits, as the coroutine's did."""
    seen: dict[str, tuple[Any, ...]] = {}
    for which in _WAYS:
        with monkeypatch.context() as patched:
            _wrapped_so(which, patched)
            fake = _Adapter()
            fake.install()
            try:
                seen[which] = asyncio.run(_checked_out_frames(Pool()))
            finally:
                fake.uninstall()
    assert seen["c"] == seen["c_awaitables"] == seen["python"]
    assert seen["c"][0] is _checked_out_frames.__code__


def test_a_wait_that_runs_out_is_reported_once(adapter: str, events: Any) -> None:
    pool = Pool()
    pool.free.clear()

    async def work() -> None:
        await pool.getconn(timeout=0.5)

    with pytest.raises(Exhausted):
        asyncio.run(work())
    exhausted = events.of("pool.exhausted")
    assert len(exhausted) == 1
    assert exhausted[0].waiter is not None
    assert exhausted[0].waiter.held_s == 0.5
    assert any("in work" in line for line in exhausted[0].waiter.stack)
    assert not _leases()


def test_cancelled_while_waiting_checks_nothing_out(adapter: str) -> None:
    pool = Pool()

    async def work() -> None:
        pool.gate = asyncio.Event()
        task = asyncio.ensure_future(pool.getconn())  # a task of its own: a Coroutine
        await asyncio.sleep(0)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert not _leases()
        pool.gate.set()
        conn = await asyncio.wait_for(pool.getconn(), 1.0)
        assert len(_leases()) == 1
        await pool.putconn(conn)

    asyncio.run(work())
    assert not _leases()
    assert len(pool.free) == 2


def test_release_refused_or_failed(adapter: str) -> None:
    pool = Pool()

    async def work() -> None:
        conn = await pool.getconn()
        with pytest.raises(Refused):
            await pool.putconn(object())  # type: ignore[arg-type]
        assert len(_leases()) == 1  # not this pool's: no checkin
        pool.fail_release = RuntimeError("reset failed")
        with pytest.raises(RuntimeError):
            await pool.putconn(conn)
        assert not _leases()  # the user let go of it: checked in

    asyncio.run(work())


def test_send_throw_close_by_hand(adapter: str) -> None:
    pool = Pool()

    async def work() -> None:
        pool.gate = asyncio.Event()
        made = pool.getconn()
        waiting = made.send(None)  # the Event's future: the library's coroutine awaits
        assert isinstance(waiting, asyncio.Future)
        with pytest.raises(KeyError):
            made.throw(KeyError("from outside"))
        with pytest.raises(RuntimeError):
            made.send(None)  # as a coroutine that already ended
        assert not _leases()
        again = pool.getconn()
        again.send(None)
        again.close()
        assert not _leases()
        pool.gate = None
        last = pool.getconn()
        with pytest.raises(StopIteration) as stopped:
            last.send(None)
        conn = stopped.value.value
        assert isinstance(conn, Conn)
        assert len(_leases()) == 1
        await pool.putconn(conn)

    asyncio.run(work())
    assert not _leases()


def test_a_suspended_holder_shows_where_it_waits(adapter: str) -> None:
    """The holder's current stack (task_frames) goes through the awaitable to the library's
    coroutine, as it went through pgleak's ``async def``."""
    pool = Pool()

    async def work(gate: asyncio.Event) -> None:
        pool.gate = gate
        await pool.getconn()  # waits here

    async def main() -> list[str]:
        gate = asyncio.Event()
        task = asyncio.ensure_future(work(gate))
        await asyncio.sleep(0)
        frames = pgleak._stack.task_frames(task)
        gate.set()
        await task
        return [frame.f_code.co_name for frame in frames]

    names = asyncio.run(main())
    assert names[0] == "work"
    assert "getconn" in names  # the library's coroutine, under the awaitable
