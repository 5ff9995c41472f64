"""An asyncio checkout's task, as the lease records it: the C ledger against the Python one.

The C ledger gives a task's ``(weakref.ref(task), task.get_name())`` pair again while it is
still of the same task and the same name object, reads ``_current_tasks`` itself where
``_current_task`` is its ``get``, and walks the stack from the caller's interpreter frame
without making its frame object (``task_identity``, ``current_task_of``, ``current_iframe`` in
pgleak/_speedups.c). None of that may show: the holder's name after ``set_name()``, another
task at the same address, a ``Task`` subclass with its own ``get_name``, and the stack lines
are what the Python ledger (the definition) records. Run under ``PGLEAK_NO_SPEEDUPS=1``, both
sides are the Python ledger.
"""

from __future__ import annotations

import asyncio
import gc
import weakref
from collections.abc import Callable, Coroutine
from typing import Any

import pytest

import pgleak
from pgleak import _stack
from pgleak._core import Core, Lease, core

#: The C ledger (where built) and the Python template it must match.
LEDGERS: dict[str, Callable[[Any, Any], Lease | None]] = {
    "ledger": lambda handle, conn: core.checkout(handle, conn, False, None),
    "python": lambda handle, conn: Core.checkout(core, handle, conn, False, None),
}


class Conn:
    #: Every connection made, kept alive: a collected one would be reported, not checked in.
    made: list[Conn] = []

    def __init__(self) -> None:
        Conn.made.append(self)


class Pool:
    pass


def _task_of(lease: Lease) -> tuple[Any, str]:
    assert lease.task is not None
    ref, name = lease.task
    assert isinstance(ref, weakref.ref)
    return ref(), name


def _run(main: Coroutine[Any, Any, Any], task_factory: Any = None) -> Any:
    loop = asyncio.new_event_loop()
    try:
        if task_factory is not None:
            loop.set_task_factory(task_factory)
        return loop.run_until_complete(main)
    finally:
        loop.close()


@pytest.mark.parametrize("ledger", list(LEDGERS))
def test_a_renamed_task_is_named_anew(installed: pgleak.Settings, ledger: str) -> None:
    checkout = LEDGERS[ledger]
    handle = core.pool(Pool(), "test")

    async def work() -> list[tuple[Any, str]]:
        task = asyncio.current_task()
        assert task is not None
        seen = []
        for name in ("first", "first", "second", "second"):
            if task.get_name() != name:
                task.set_name(name)
            lease = checkout(handle, Conn())
            assert lease is not None
            held, named = _task_of(lease)
            assert held is task
            seen.append((held, named))
            core.checkin(lease)
        return seen

    async def main() -> list[tuple[Any, str]]:
        return await asyncio.create_task(work(), name="start")

    seen = _run(main())
    assert [name for _, name in seen] == ["first", "first", "second", "second"]
    assert not core.leases


@pytest.mark.parametrize("ledger", list(LEDGERS))
def test_each_task_its_own(installed: pgleak.Settings, ledger: str) -> None:
    """One task after another (the first gone, its address free for the next): each lease
    holds its own task and name."""
    checkout = LEDGERS[ledger]
    handle = core.pool(Pool(), "test")
    leases: list[Lease] = []

    async def work() -> None:
        lease = checkout(handle, Conn())
        assert lease is not None
        held, _ = _task_of(lease)
        assert held is asyncio.current_task()
        leases.append(lease)

    async def main() -> None:
        for i in range(4):
            await asyncio.create_task(work(), name=f"worker-{i}")
            gc.collect()

    _run(main())
    assert [lease.task[1] for lease in leases if lease.task] == [f"worker-{i}" for i in range(4)]
    # Each task is gone: its reference with it (none kept alive by pgleak).
    assert all(lease.task is not None and lease.task[0]() is None for lease in leases)
    for lease in leases:
        core.checkin(lease)


class NamedTask(asyncio.Task):  # type: ignore[type-arg]
    def get_name(self) -> str:
        return "named:" + super().get_name()


class PlainTask(asyncio.Task):  # type: ignore[type-arg]
    pass


class BadName(asyncio.Task):  # type: ignore[type-arg]
    def get_name(self) -> str:
        raise LookupError("no name today")


def _factory(cls: type[asyncio.Task[Any]]) -> Any:
    def make(loop: asyncio.AbstractEventLoop, coro: Any, **kwargs: Any) -> asyncio.Task[Any]:
        return cls(coro, loop=loop, **kwargs)

    return make


@pytest.mark.parametrize("ledger", list(LEDGERS))
@pytest.mark.parametrize(("cls", "expected"), [(NamedTask, "named:w"), (PlainTask, "w")])
def test_a_task_class_of_its_own(
    installed: pgleak.Settings, ledger: str, cls: type[asyncio.Task[Any]], expected: str
) -> None:
    checkout = LEDGERS[ledger]
    handle = core.pool(Pool(), "test")

    async def work() -> tuple[type, str]:
        lease = checkout(handle, Conn())
        assert lease is not None
        held, name = _task_of(lease)
        assert held is asyncio.current_task()
        core.checkin(lease)
        return type(held), name

    async def main() -> list[tuple[type, str]]:
        return [await asyncio.create_task(work(), name="w") for _ in range(2)]

    # The class's tasks, then asyncio's own C Task, then the class's again: the name is
    # looked up by each task's own class.
    assert _run(main(), _factory(cls)) == [(cls, expected)] * 2
    assert _run(main()) == [(asyncio.Task, "w")] * 2
    assert _run(main(), _factory(cls)) == [(cls, expected)] * 2


@pytest.mark.parametrize("ledger", list(LEDGERS))
def test_a_failing_get_name_raises_as_in_python(installed: pgleak.Settings, ledger: str) -> None:
    checkout = LEDGERS[ledger]
    handle = core.pool(Pool(), "test")

    async def work() -> None:
        with pytest.raises(LookupError, match="no name today"):
            checkout(handle, Conn())

    async def main() -> None:
        await asyncio.create_task(work())

    _run(main(), _factory(BadName))
    assert not core.leases


def _exec_caller(name: str) -> Callable[[Any], Lease | None]:
    """A caller of ``core.checkout`` whose code is of a pseudo-file never seen (``<string>``
    of a module of its own): the stack's C walk has no verdict for it and hands the capture
    to Python."""
    namespace: dict[str, Any] = {"__name__": name, "core": core, "Conn": Conn}
    exec(
        compile(
            "def caller(handle):\n    return core.checkout(handle, Conn(), False, None)\n",
            "<string>",
            "exec",
        ),
        namespace,
    )
    caller: Callable[[Any], Lease | None] = namespace["caller"]
    return caller


def _codes(lease: Lease) -> list[Any]:
    return list(lease.raw[0::2])


def test_the_stack_from_the_callers_frame(installed: pgleak.Settings) -> None:
    """The C ledger's walk from the caller's interpreter frame records what the Python
    template does from its frame object, also where it must hand over to Python."""
    handle = core.pool(Pool(), "test")
    fresh = _exec_caller("pgleak_test_pseudo_module")

    async def inner() -> dict[str, Any]:
        by_c = core.checkout(handle, Conn(), False, None)
        by_py = Core.checkout(core, handle, Conn(), False, None)
        by_fresh = fresh(handle)
        assert by_c is not None
        assert by_py is not None
        assert by_fresh is not None
        out = {"c": by_c, "py": by_py, "fresh": by_fresh}
        for lease in out.values():
            core.checkin(lease)
        return out

    async def outer() -> dict[str, Any]:
        return await inner()

    got = _run(outer())
    assert _codes(got["c"]) == _codes(got["py"])
    assert _codes(got["c"])[:2] == [inner.__code__, outer.__code__]
    assert got["c"].raw[1] != got["py"].raw[1]  # two lines of the same frame
    # The pseudo-file's frame first, then the same frames from inner() out.
    assert _codes(got["fresh"])[0].co_name == "caller"
    assert _codes(got["fresh"])[1:] == _codes(got["c"])
    lines = _stack.format_raw(got["fresh"].raw)
    assert "in caller" in lines[-1], lines  # most recent call last
    assert "in inner" in lines[-2], lines


def _checkout_in_task(handle: Any) -> Lease:
    async def holder() -> Lease:
        lease = core.checkout(handle, Conn(), False, None)
        assert lease is not None
        core.checkin(lease)
        return lease

    lease: Lease = _run(holder())
    return lease


def test_a_changed_verdict_is_seen_at_once(installed: pgleak.Settings) -> None:
    """The C walk remembers files' verdicts by file name object while ``_skip_cache`` is
    unchanged: a verdict put in the cache (by hand, with nothing removed) and the cache's
    ``clear()`` (register_library) are both seen by the next checkout, in a task and in a
    thread."""
    handle = core.pool(Pool(), "test")
    here = __file__

    def thread_codes() -> list[Any]:
        lease = core.checkout(handle, Conn(), False, None)
        assert lease is not None
        core.checkin(lease)
        return _codes(lease)

    assert [code.co_name for code in _codes(_checkout_in_task(handle))] == ["holder"]
    assert test_a_changed_verdict_is_seen_at_once.__code__ in thread_codes()
    assert _stack._skip_cache.get(here) == _stack._KEEP
    try:
        # This file's frames are now a library's: skipped, in either walk.
        _stack._skip_cache[here] = _stack._SKIP
        assert not any(code.co_filename == here for code in _codes(_checkout_in_task(handle)))
        assert not any(code.co_filename == here for code in thread_codes())
    finally:
        _stack._skip_cache.clear()
    # Cleared: classified again (kept), and the walk sees that.
    assert [code.co_name for code in _codes(_checkout_in_task(handle))] == ["holder"]
    assert test_a_changed_verdict_is_seen_at_once.__code__ in thread_codes()
