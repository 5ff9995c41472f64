"""The C checkout and checkin wrappers (``pgleak._speedups.Tracked``) leave the same ledger and
the same reports as the Python templates they stand in for, step for step: checkouts with
every way of passing the arguments, a wait that runs out (``pool.exhausted``), a refused
checkin, a checkin that fails after the user let go, an observer started half-way, and a
fault inside pgleak."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import types
import weakref
from collections.abc import AsyncIterator, Callable, Iterator
from typing import Any

import pytest

import pgleak
from pgleak import _adapter, _guard, _stack
from pgleak._core import Lease, PoolHandle, core
from pgleak.testing import capture_events

pytestmark = pytest.mark.skipif(
    getattr(_stack._fast, "Tracked", None) is None,
    reason="pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: the "
    "Python templates run, and the rest of the suite tests those",
)


class Timeout(Exception):
    pass


class Refused(Exception):
    pass


class Conn:
    fail = False


class ToyPool:
    """Lends what it has; refuses what it did not lend; can fail to take one back."""

    def __init__(self, size: int) -> None:
        self.free = [Conn() for _ in range(size)]
        self.lent: list[Conn] = []
        self.timeout = 3.0

    def getconn(self, timeout: float | None = None) -> Conn:
        if not self.free:
            raise Timeout(f"no connection in {timeout}")
        conn = self.free.pop()
        self.lent.append(conn)
        return conn

    def putconn(self, conn: Conn) -> None:
        if conn not in self.lent:
            raise Refused("not mine")
        self.lent.remove(conn)
        if conn.fail:
            raise RuntimeError("reset failed")
        self.free.append(conn)


class Toy(_adapter.Adapter):
    name = "toy"
    distribution = "no-such-distribution-pgleak-toy"

    def _install(self) -> None:
        self.track_acquire(
            ToyPool,
            "getconn",
            namer=lambda pool: "toy pool",
            is_timeout=lambda err: isinstance(err, Timeout),
            give_back="putconn",
        )
        self.track_release(ToyPool, "putconn", refused=(Refused,))


class Recorder:
    """An observer that writes down what it is told (the OpenTelemetry observer's hooks)."""

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    def checked_out(self, lease: Lease, since: float | None) -> None:
        # The wait's start is the core's clock reading (Core.wait_start): whether it came.
        self.seen.append(("checked_out", lease.pool.name, since is not None))

    def checked_in(self, lease: Lease, late: bool, discarded: bool) -> None:
        self.seen.append(("checked_in", lease.pool.name, late, discarded))

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.seen.append((name,))


def _ledger(pool: ToyPool) -> list[Any]:
    """The open leases, as a report shows them, plus the slots a report does not show."""
    out = []
    for lease in sorted(core.leases.values(), key=lambda lease: lease.id):
        conn = lease.ref() if lease.ref is not None else None
        out.append(
            (
                pool.lent.index(conn) if conn in pool.lent else None,
                lease.key == id(conn),
                core.by_conn.get(id(conn)) is lease,
                lease.pool.name,
                lease.thread[1],
                lease.task,
                lease.context,
                lease.self_returning,
                lease.flagged,
                lease.t_in,
                round(lease.threshold, 6),
            )
        )
    return out + [(c.pool, c.holder, c.stack, c.context, c.state) for c in pgleak.checked_out()]


def _scenario(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    transcript: list[Any] = []
    pool = ToyPool(2)

    def step(name: str, call: Any) -> Any:
        try:
            result: Any = call()
            outcome = "ok"
        except Exception as err:
            result, outcome = None, f"{type(err).__name__}: {err}"
        transcript.append((name, outcome, _ledger(pool)))
        return result

    with capture_events() as events:
        first = step("positional", lambda: pool.getconn(1.5))
        second = step("keyword", lambda: pool.getconn(timeout=2.5))
        step("timeout, positional", lambda: pool.getconn(0.25))
        step("timeout, keyword", lambda: pool.getconn(timeout=0.5))
        step("timeout, pool's", pool.getconn)
        step("unbound", lambda: ToyPool.getconn(pool))
        step("refused", lambda: pool.putconn(Conn()))
        first.fail = True
        step("failed checkin", lambda: pool.putconn(first))
        step("keyword checkin", lambda: pool.putconn(conn=second))
        seen: list[Any] = []
        monkeypatch.setattr(core, "observer", Recorder(seen))
        third = step("observed checkout", pool.getconn)
        step("observed timeout", lambda: pool.getconn(timeout=0.75))
        step("observed checkin", lambda: ToyPool.putconn(pool, third))
        transcript.append(("observer saw", seen))
        # every wait the observer saw begin has ended, however it ended
        handles = [h for h in core._pools.values() if h.ref() is pool]
        transcript.append(("pending", [len(h.pending) for h in handles]))
        monkeypatch.setattr(core, "observer", None)

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("pgleak's own fault")

        monkeypatch.setattr(core, "checkout", broken)
        fourth = step("faulty checkout", pool.getconn)
        monkeypatch.undo()
        step("its checkin", lambda: pool.putconn(fourth))
    transcript.append(("faults", [(site, repr(exc)) for site, exc in _guard.swallowed]))
    transcript.append(
        (
            "events",
            [
                (
                    e.event,
                    e.pool,
                    e.detail,
                    e.threshold_s,
                    [(h.holder, h.stack) for h in e.holders],
                    e.waiter and (e.waiter.holder, e.waiter.stack),
                    e.as_dict().get("waited_s"),
                )
                for e in events.events
            ],
        )
    )
    return transcript


@pytest.fixture
def leak_threshold() -> float:
    return 60.0  # no leak.suspected from the watchdog half-way, whatever the machine's pace


@pytest.fixture
def run(installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    def run(c: bool) -> list[Any]:
        monkeypatch.setattr(_adapter, "use_c_wrappers", c)
        toy = Toy()
        toy.install()
        try:
            wrapper = ToyPool.__dict__["getconn"]
            assert type(wrapper) is (_stack._fast.Tracked if c else types.FunctionType)
            with monkeypatch.context() as inner:
                return _scenario(inner)
        finally:
            toy.uninstall()
            _guard.reset()
            core.leases.clear()
            core.by_conn.clear()

    return run


@pytest.mark.internal_errors
def test_the_c_and_python_wrappers_leave_the_same_ledger_and_reports(run: Any) -> None:
    python, c = run(False), run(True)
    assert c == python
    # and the scenario did what it says
    steps = {entry[0]: entry[1] for entry in python if len(entry) == 3}
    assert steps["timeout, keyword"] == "Timeout: no connection in 0.5"
    assert steps["refused"] == "Refused: not mine"
    assert steps["failed checkin"] == "RuntimeError: reset failed"
    transcript = dict(entry for entry in python if len(entry) == 2)
    assert transcript["faults"] == [("toy.checkout", 'RuntimeError("pgleak\'s own fault")')]
    assert [e[-1] for e in transcript["events"]] == [0.25, 0.5, 3.0, 3.0, 0.75]
    assert transcript["observer saw"] == [
        ("checked_out", "toy pool", True),
        ("exhausted",),
        ("checked_in", "toy pool", False, False),
    ]
    assert transcript["pending"] == [0]
    assert [len(entry[2]) for entry in python if len(entry) == 3] == [
        2,
        4,
        4,
        4,
        4,
        4,
        4,
        2,
        0,
        2,
        2,
        0,
        0,
        0,
    ]


def _handles(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Which handle each checkout is filed under while the pools dict changes under it (the C
    wrappers keep the last pool's handle between checkouts)."""
    seen: list[Any] = []
    names = iter(f"toy pool {n}" for n in range(1000))
    monkeypatch.setattr(core, "kinds", dict(core.kinds))

    def checkout(pool: ToyPool, expected: PoolHandle | None = None) -> None:
        """``expected`` None: the one the pools dict holds after the checkout."""
        conn = pool.getconn()
        [lease] = core.leases.values()
        handle, now = lease.pool, core._pools.get(id(pool))
        seen.append((handle is (expected or now), handle is now, handle.name))
        pool.putconn(conn)

    pool: ToyPool = _RoomyToyPool(1)
    checkout(pool)
    first = core._pools[id(pool)]
    checkout(pool, first)  # kept
    replaced = PoolHandle(pool, "toy", lambda _: next(names))
    core._pools[id(pool)] = replaced
    checkout(pool, replaced)
    del core._pools[id(pool)]
    checkout(pool)  # made anew, not the one kept
    seen.append(("not the replaced one", core._pools[id(pool)] is not replaced))
    address, dead = id(pool), weakref.ref(pool)
    del pool, replaced, first
    gc.collect()
    seen.append(("dead", dead() is None))
    # Most often the very next one of its size takes the dead pool's memory; whether it did
    # is not compared (the collector's timing), the handle it gets is.
    others = [_RoomyToyPool(1)]
    while id(others[-1]) != address and len(others) < 100:
        others.append(_RoomyToyPool(1))
    checkout(others[-1])
    return seen


class _RoomyToyPool(ToyPool):
    """Of a size nothing else here has: a dead one's memory goes to the next one made."""

    __slots__ = tuple(f"room{n}" for n in range(24))


@pytest.mark.internal_errors
def test_the_handle_kept_between_checkouts_follows_the_pools_dict(
    installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A pool's handle replaced or dropped from ``core._pools`` between two checkouts, or a new
    pool at a dead one's address: the C wrappers file each checkout under the handle the
    template's ``pools.get(id(pool))`` finds, as the template does."""

    def run(c: bool) -> list[Any]:
        with monkeypatch.context() as patched:
            patched.setattr(_adapter, "use_c_wrappers", c)
            toy = Toy()
            toy.install()
            try:
                assert type(ToyPool.__dict__["getconn"]) is (
                    _stack._fast.Tracked if c else types.FunctionType
                )
                seen = _handles(patched)
                assert not _guard.swallowed
                return seen
            finally:
                toy.uninstall()
                core.leases.clear()
                core.by_conn.clear()

    python, c = run(False), run(True)
    assert c == python
    assert python == [
        (True, True, "toy pool"),
        (True, True, "toy pool"),
        (True, True, "toy pool 0"),
        (True, True, "toy pool"),
        ("not the replaced one", True),
        ("dead", True),
        (True, True, "toy pool"),
    ]


# -- the asyncio wrappers: Tracked objects that return the C awaitables -----------------------


class AsyncToyPool:
    """``ToyPool`` with coroutine methods (psycopg_pool's ``AsyncConnectionPool`` shape)."""

    def __init__(self, size: int) -> None:
        self.sync = ToyPool(size)
        self.timeout = 3.0

    async def getconn(self, timeout: float | None = None) -> Conn:
        await asyncio.sleep(0)
        return self.sync.getconn(timeout)

    async def putconn(self, conn: Conn) -> None:
        await asyncio.sleep(0)
        self.sync.putconn(conn)


class AsyncToy(_adapter.Adapter):
    name = "async_toy"
    distribution = "no-such-distribution-pgleak-toy"

    def _install(self) -> None:
        self.track_acquire(
            AsyncToyPool,
            "getconn",
            namer=lambda pool: "async toy pool",
            is_timeout=lambda err: isinstance(err, Timeout),
            give_back="putconn",
            is_async=True,
        )
        self.track_release(AsyncToyPool, "putconn", refused=(Refused,), is_async=True)


def _async_ledger(pool: AsyncToyPool) -> list[Any]:
    """``_ledger``, with the holding task by its name (its weak reference differs per run)."""
    lent = pool.sync.lent
    out = []
    for lease in sorted(core.leases.values(), key=lambda lease: lease.id):
        conn = lease.ref() if lease.ref is not None else None
        out.append(
            (
                lent.index(conn) if conn in lent else None,
                core.by_conn.get(id(conn)) is lease,
                lease.pool.name,
                lease.task and lease.task[1],
                lease.raw[0::2],
                lease.self_returning,
                lease.t_in,
                round(lease.threshold, 6),
            )
        )
    return out + [(c.pool, c.holder, c.stack, c.state) for c in pgleak.checked_out()]


async def _async_scenario(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    transcript: list[Any] = []
    pool = AsyncToyPool(2)

    async def step(name: str, call: Any) -> Any:
        try:
            result: Any = await call()
            outcome = "ok"
        except Exception as err:
            result, outcome = None, f"{type(err).__name__}: {err}"
        transcript.append((name, outcome, _async_ledger(pool)))
        return result

    def broken(*args: Any, **kwargs: Any) -> None:
        raise RuntimeError("pgleak's own fault")

    with capture_events() as events:
        first = await step("positional", lambda: pool.getconn(1.5))
        inner = await step("in a task", lambda: asyncio.create_task(pool.getconn(), name="inner"))
        await step("timeout, positional", lambda: pool.getconn(0.25))
        await step("timeout, keyword", lambda: pool.getconn(timeout=0.5))
        await step("timeout, pool's", pool.getconn)
        await step("unbound", lambda: AsyncToyPool.getconn(pool))
        await step("wait_for", lambda: asyncio.wait_for(pool.putconn(inner), 5.0))
        second = await step("keyword", lambda: pool.getconn(timeout=2.5))
        await step("refused", lambda: pool.putconn(Conn()))
        first.fail = True
        await step("failed checkin", lambda: pool.putconn(first))
        pool.sync.free.append(Conn())  # the pool opens another in its place
        pool.sync.free.append(Conn())  # and grows by one
        seen: list[Any] = []
        monkeypatch.setattr(core, "observer", Recorder(seen))
        third = await step("observed checkout", pool.getconn)
        fifth = await step(
            "observed, in a task", lambda: asyncio.create_task(pool.getconn(), name="observed")
        )
        await step("observed timeout", lambda: pool.getconn(timeout=0.75))
        await step("observed, unbound", lambda: AsyncToyPool.getconn(pool))
        await step("observed checkin", lambda: AsyncToyPool.putconn(pool, third))
        await step("observed, wait_for", lambda: asyncio.wait_for(pool.putconn(fifth), 5.0))
        with monkeypatch.context() as faulty:
            faulty.setattr(core, "checkout", broken)
            sixth = await step("observed, faulty checkout", pool.getconn)
        await step("its untracked checkin", lambda: pool.putconn(sixth))
        # a wait closed, dropped or cancelled at its await ends all the same (the pool's
        # pending count), with no checkout and no report
        closed = pool.getconn()
        closed.send(None)
        closed.close()
        dropped = pool.getconn()
        dropped.send(None)
        del dropped
        cancelled = asyncio.create_task(pool.getconn(timeout=1.0))
        await asyncio.sleep(0)
        cancelled.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await cancelled
        transcript.append(("after the abandoned waits", _async_ledger(pool)))
        # the observer stopped between the call and its first step: no wait is taken
        late = pool.getconn()
        monkeypatch.setattr(core, "observer", None)
        seventh = await step("observer gone before the first step", lambda: late)
        monkeypatch.setattr(core, "observer", Recorder(seen))
        await step("its checkin", lambda: pool.putconn(seventh))
        transcript.append(("observer saw", seen))
        handles = [h for h in core._pools.values() if h.ref() is pool]
        transcript.append(("pending", [len(h.pending) for h in handles]))
        monkeypatch.setattr(core, "observer", None)

        monkeypatch.setattr(core, "checkout", broken)
        fourth = await step("faulty checkout", pool.getconn)
        monkeypatch.undo()

        def broken_checkin(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("pgleak's own checkin fault")

        monkeypatch.setattr(core, "checkin", broken_checkin)
        await step("faulty checkin", lambda: pool.putconn(second))
        monkeypatch.undo()
        await step("untracked, keyword checkin", lambda: pool.putconn(conn=fourth))
    transcript.append(("faults", [(site, repr(exc)) for site, exc in _guard.swallowed]))
    transcript.append(
        (
            "events",
            [
                (
                    e.event,
                    e.pool,
                    e.detail,
                    [(h.holder, h.stack) for h in e.holders],
                    e.waiter and (e.waiter.holder, e.waiter.stack),
                    e.as_dict().get("waited_s"),
                )
                for e in events.events
            ],
        )
    )
    return transcript


@pytest.fixture
def run_async(installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    def run(way: str) -> list[Any]:
        with monkeypatch.context() as patched:
            if way == "python":
                patched.setattr(_adapter, "c_awaitables", lambda: None)
            elif way == "c_awaitables":
                patched.setattr(_adapter, "use_c_wrappers", False)
            toy = AsyncToy()
            toy.install()
        try:
            wrapper = AsyncToyPool.__dict__["getconn"]
            wanted = _stack._fast.Tracked if way == "c" else types.FunctionType
            assert type(wrapper) is wanted
            assert type(AsyncToyPool.__dict__["putconn"]) is wanted
            with monkeypatch.context() as inner:

                async def main() -> list[Any]:
                    return await asyncio.create_task(_async_scenario(inner), name="the-task")

                return asyncio.run(main())
        finally:
            toy.uninstall()
            _guard.reset()
            core.leases.clear()
            core.by_conn.clear()

    return run


@pytest.mark.internal_errors
def test_the_asyncio_c_wrappers_leave_what_the_templates_leave(run_async: Any) -> None:
    python, c, functions = run_async("python"), run_async("c"), run_async("c_awaitables")
    assert c == python
    assert functions == python
    steps = {entry[0]: entry[1] for entry in python if len(entry) == 3}
    assert steps["timeout, keyword"] == "Timeout: no connection in 0.5"
    assert steps["refused"] == "Refused: not mine"
    assert steps["failed checkin"] == "RuntimeError: reset failed"
    for name in ("in a task", "wait_for", "faulty checkout", "faulty checkin"):
        assert steps[name] == "ok", name
    for name in ("observed, in a task", "observed, wait_for", "observed, faulty checkout"):
        assert steps[name] == "ok", name
    assert steps["observed timeout"] == "Timeout: no connection in 0.75"
    assert steps["unbound"] == "Timeout: no connection in None"
    assert steps["untracked, keyword checkin"] == "ok"
    holders = {
        entry[0]: [lease[3] for lease in entry[2] if len(lease) == 8]
        for entry in python
        if len(entry) == 3
    }
    assert holders["positional"] == ["the-task"]
    assert holders["in a task"] == ["the-task", "inner"]
    assert holders["wait_for"] == ["the-task"]
    assert holders["observed, in a task"] == ["the-task", "the-task", "observed"]
    assert holders["observed, faulty checkout"] == ["the-task"]  # not filed
    assert holders["observer gone before the first step"] == ["the-task", "the-task"]
    transcript = dict(entry for entry in python if len(entry) == 2)
    assert sorted(transcript["faults"]) == [
        ("async_toy.checkin", 'RuntimeError("pgleak\'s own checkin fault")'),
        ("async_toy.checkout", 'RuntimeError("pgleak\'s own fault")'),
        ("async_toy.checkout", 'RuntimeError("pgleak\'s own fault")'),
    ]
    assert [e[-1] for e in transcript["events"]] == [0.25, 0.5, 3.0, 3.0, 0.75, 3.0]
    checked_out = ("checked_out", "async toy pool", True)
    checked_in = ("checked_in", "async toy pool", False, False)
    assert transcript["observer saw"] == [
        *(checked_out, checked_out, ("exhausted",), ("exhausted",), checked_in, checked_in),
        checked_in,  # the observer was gone at the checkout, back for the checkin
    ]
    assert len(transcript["after the abandoned waits"]) == 2  # nothing filed by them
    assert transcript["pending"] == [0]


class BlockPool(ToyPool):
    """A pool with psycopg_pool's ``connection()``: a block that checks out and back in."""

    @contextlib.contextmanager
    def connection(self, swallow: bool = False) -> Iterator[Conn]:
        conn = self.getconn()
        try:
            yield conn
        except ValueError:
            if not swallow:
                raise
        finally:
            self.putconn(conn)


class Blocks(_adapter.Adapter):
    name = "blocks"
    distribution = "no-such-distribution-pgleak-blocks"

    def _install(self) -> None:
        self.track_acquire(
            BlockPool,
            "getconn",
            namer=lambda pool: "block pool",
            is_timeout=lambda err: isinstance(err, Timeout),
        )
        self.track_release(BlockPool, "putconn")
        self.track_scope(BlockPool, "connection")


def _block_scenario(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    pool = BlockPool(1)
    recorder = Recorder(seen)
    monkeypatch.setattr(core, "observer", recorder)
    monkeypatch.setattr(
        recorder, "enter", lambda lease: seen.append(("enter", lease.pool.name)), raising=False
    )
    monkeypatch.setattr(
        recorder, "exit", lambda lease: seen.append(("exit", lease.pool.name)), raising=False
    )
    with pool.connection() as conn:
        seen.append(("inside", conn in pool.lent, len(core.leases)))
    try:
        with pool.connection():
            raise KeyError("the user's")
    except KeyError as err:
        seen.append(("raised", repr(err)))
    with pool.connection(swallow=True):
        raise ValueError("swallowed by the library's block")
    seen.append(("suppressed", len(pool.free)))

    def broken(lease: Lease) -> None:
        raise RuntimeError("pgleak's own fault")

    monkeypatch.setattr(recorder, "enter", broken)
    monkeypatch.setattr(recorder, "exit", broken)
    with pool.connection() as conn:
        seen.append(("inside, faulty observer", conn in pool.lent))
    seen.append(("faults", [(site, repr(exc)) for site, exc in _guard.swallowed]))
    seen.append(("after", len(pool.free), len(core.leases)))
    return seen


@pytest.mark.internal_errors
def test_the_c_and_python_blocks_do_the_same(
    installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``track_scope``'s block (psycopg_pool's ``connection()``): its C flavour tells the
    observer, passes the user's exception and the library's suppression on, and reports a
    fault of the observer's, as the Python class does."""

    def run(c: bool) -> list[Any]:
        monkeypatch.setattr(_adapter, "use_c_wrappers", c)
        with monkeypatch.context() as inner:
            inner.setattr(core, "observer", Recorder([]))  # the block is put in for one
            blocks = Blocks()
            blocks.install()
            try:
                assert isinstance(BlockPool(1).connection(), _stack._fast.Scope) is c
                inner.setattr(core, "observer", None)  # none: the library's own, as it is
                assert type(BlockPool(1).connection()) is contextlib._GeneratorContextManager
                return _block_scenario(inner)
            finally:
                blocks.uninstall()
                _guard.reset()
                core.leases.clear()
                core.by_conn.clear()

    python, c = run(False), run(True)
    assert c == python
    out, back = ("checked_out", "block pool", True), ("checked_in", "block pool", False, False)
    enter, exit_ = ("enter", "block pool"), ("exit", "block pool")
    fault = ("blocks.scope", 'RuntimeError("pgleak\'s own fault")')
    assert python == [
        *(out, enter, ("inside", True, 1), exit_, back),
        *(out, enter, exit_, back, ("raised", 'KeyError("the user\'s")')),
        *(out, enter, exit_, back, ("suppressed", 1)),
        *(out, ("inside, faulty observer", True), back),
        ("faults", [fault, fault]),  # the block's enter and exit
        ("after", 1, 0),
    ]


class AsyncBlockPool(AsyncToyPool):
    """``AsyncToyPool`` with psycopg_pool's ``AsyncConnectionPool.connection()`` block."""

    @contextlib.asynccontextmanager
    async def connection(self, swallow: bool = False) -> AsyncIterator[Conn]:
        conn = await self.getconn(0.5)
        try:
            yield conn
        except ValueError:
            if not swallow:
                raise
        finally:
            await self.putconn(conn)


class AsyncBlocks(_adapter.Adapter):
    name = "async_blocks"
    distribution = "no-such-distribution-pgleak-blocks"

    def _install(self) -> None:
        self.track_acquire(
            AsyncBlockPool,
            "getconn",
            namer=lambda pool: "async block pool",
            is_timeout=lambda err: isinstance(err, Timeout),
            is_async=True,
        )
        self.track_release(AsyncBlockPool, "putconn", is_async=True)
        self.track_scope(AsyncBlockPool, "connection")


async def _async_block_scenario(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    seen: list[Any] = []
    pool = AsyncBlockPool(1)
    recorder = Recorder(seen)
    monkeypatch.setattr(core, "observer", recorder)

    def told(what: str) -> Callable[[Lease], None]:
        # in the block's own task: the span is made current in the context the block runs in
        task = asyncio.current_task
        return lambda lease: seen.append((what, lease.pool.name, task().get_name()))  # type: ignore[union-attr]

    monkeypatch.setattr(recorder, "enter", told("enter"), raising=False)
    monkeypatch.setattr(recorder, "exit", told("exit"), raising=False)
    async with pool.connection() as conn:
        seen.append(("inside", conn in pool.sync.lent, len(core.leases)))

    async def in_a_task() -> None:
        async with pool.connection() as conn:
            seen.append(("inside a task", conn in pool.sync.lent))

    await asyncio.create_task(in_a_task(), name="block-task")
    try:
        async with pool.connection():
            raise KeyError("the user's")
    except KeyError as err:
        seen.append(("raised", repr(err)))
    async with pool.connection(swallow=True):
        raise ValueError("swallowed by the library's block")
    seen.append(("suppressed", len(pool.sync.free)))
    held = await pool.getconn()
    try:
        async with pool.connection():
            seen.append(("never inside",))
    except Timeout as err:
        seen.append(("no connection", repr(err)))
    await pool.putconn(held)

    def broken(lease: Lease) -> None:
        raise RuntimeError("pgleak's own fault")

    monkeypatch.setattr(recorder, "enter", broken)
    monkeypatch.setattr(recorder, "exit", broken)
    async with pool.connection() as conn:
        seen.append(("inside, faulty observer", conn in pool.sync.lent))
    seen.append(("faults", [(site, repr(exc)) for site, exc in _guard.swallowed]))
    seen.append(("after", len(pool.sync.free), len(core.leases)))
    return seen


@pytest.mark.internal_errors
def test_the_c_and_python_asyncio_blocks_do_the_same(
    installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The asyncio block (psycopg_pool's ``AsyncConnectionPool.connection()``): the C
    ``__aenter__`` / ``__aexit__`` tell the observer in the block's task, pass the user's
    exception, the library's suppression and a failed checkout on, and report a fault of the
    observer's, as the ``async def`` methods do."""

    def run(c: bool) -> list[Any]:
        monkeypatch.setattr(_adapter, "use_c_wrappers", c)
        with monkeypatch.context() as inner:
            inner.setattr(core, "observer", Recorder([]))  # the block is put in for one
            blocks = AsyncBlocks()
            blocks.install()
            try:
                assert isinstance(AsyncBlockPool(1).connection(), _stack._fast.Scope) is c
                inner.setattr(core, "observer", None)  # none: the library's own, as it is
                cm = AsyncBlockPool(1).connection()
                assert type(cm) is contextlib._AsyncGeneratorContextManager

                async def main() -> list[Any]:
                    return await asyncio.create_task(_async_block_scenario(inner), name="the-task")

                return asyncio.run(main())
            finally:
                blocks.uninstall()
                _guard.reset()
                core.leases.clear()
                core.by_conn.clear()

    python, c = run(False), run(True)
    assert c == python
    out = ("checked_out", "async block pool", True)
    back = ("checked_in", "async block pool", False, False)
    enter, exit_ = (
        ("enter", "async block pool", "the-task"),
        ("exit", "async block pool", "the-task"),
    )
    in_task = (
        ("enter", "async block pool", "block-task"),
        ("exit", "async block pool", "block-task"),
    )
    fault = ("async_blocks.scope", 'RuntimeError("pgleak\'s own fault")')
    assert python == [
        *(out, enter, ("inside", True, 1), exit_, back),
        *(out, in_task[0], ("inside a task", True), in_task[1], back),
        *(out, enter, exit_, back, ("raised", 'KeyError("the user\'s")')),
        *(out, enter, exit_, back, ("suppressed", 1)),
        out,
        *(("exhausted",), ("no connection", "Timeout('no connection in 0.5')"), back),
        *(out, ("inside, faulty observer", True), back),
        ("faults", [fault, fault]),  # the block's enter and exit
        ("after", 1, 0),
    ]
