"""asyncpg pools against the real server: what ``test_common_async.py`` does not cover.

The shortcuts (``pool.fetch()`` and kin) acquire and release by themselves: they hold a slot
and are listed as holders, but are never leaks. ``release()`` is shielded and idempotent,
``close()`` waits for every connection, ``terminate()`` does not, and a connection the server
kills goes back to the pool by itself.

Blocking is done with locks held by a separate, unpooled connection (``admin``), so a test
decides exactly how long a shortcut runs; the tests wait for the server to show the lock
wait rather than sleeping.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import io
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Iterator
from typing import Any, TypeVar

import asyncpg
import pytest
from asyncpg.pool import Pool, PoolAcquireContext, PoolConnectionHolder, PoolConnectionProxy

import pgleak
from pgleak import _adapter, _guard, _stack
from pgleak._core import core
from pgleak.integrations import asyncpg as apg_adapter
from pgleak.testing import EventCapture, run_watchdog
from tests.conftest import Server
from tests.helpers import BlockObserver, assert_site, observed_by

POOL_SIZE = 2
THRESHOLD = 0.2  # the ``installed`` fixture's leak_threshold

Body = Callable[[Pool], Awaitable[None]]


async def _open(pg: Server, size: int = POOL_SIZE, **kwargs: Any) -> Pool:
    return await asyncpg.create_pool(
        host=pg.host,
        port=pg.port,
        user=pg.user,
        database=pg.dbname,
        min_size=0,
        max_size=size,
        **kwargs,
    )


def _run(pg: Server, body: Body, size: int = POOL_SIZE, **kwargs: Any) -> None:
    async def main() -> None:
        pool = await _open(pg, size, **kwargs)
        try:
            await body(pool)
        finally:
            pool.terminate()  # a no-op if the test closed it

    asyncio.run(main())


@contextlib.asynccontextmanager
async def _admin(pg: Server) -> AsyncIterator[Any]:
    """The test's own connection outside any pool: pgleak is told not to track it."""
    with pgleak.suppress():
        conn = await asyncpg.connect(host=pg.host, port=pg.port, user=pg.user, database=pg.dbname)
    try:
        yield conn
    finally:
        await conn.close()


async def _until_lock_waiters(admin: Any, count: int = 1) -> None:
    """Wait until ``count`` sessions wait for a lock: their checkouts have certainly happened."""
    for _ in range(1000):
        waiting = await admin.fetchval("select count(*) from pg_locks where not granted")
        if waiting >= count:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"{count} lock waiter(s) never showed up")


async def _kill_backend(pg: Server, conn: Any) -> None:
    """``pg_terminate_backend`` the connection, and wait until asyncpg has seen it go."""
    gone = asyncio.Event()
    conn.add_termination_listener(lambda _: gone.set())
    async with _admin(pg) as admin:
        assert await admin.fetchval("select pg_terminate_backend($1)", conn.get_server_pid())
    await asyncio.wait_for(gone.wait(), 10)
    assert conn._con is None  # asyncpg detached the proxy: the slot is back in the pool


def _holders() -> list[str]:
    return [c.holder for c in pgleak.checked_out()]


def _task(name: str | None = None) -> str:
    """The holder name of task ``name`` (default: the current task)."""
    if name is None:
        task = asyncio.current_task()
        assert task is not None
        name = task.get_name()
    return f"task {name!r} (thread 'MainThread')"


@pytest.fixture
def table(pg: Server) -> Iterator[str]:
    name = f"pgleak_apg_{uuid.uuid4().hex[:8]}"

    async def run(sql: str) -> None:
        async with _admin(pg) as admin:
            await admin.execute(sql)

    asyncio.run(run(f"create table {name} (a int)"))
    try:
        yield name
    finally:
        asyncio.run(run(f"drop table {name}"))


def _shortcuts(table: str) -> dict[str, Callable[[Pool], Coroutine[Any, Any, Any]]]:
    """One call of every shortcut, each touching ``table`` (so a table lock blocks it)."""
    calls: dict[str, Callable[[Pool], Coroutine[Any, Any, Any]]] = {
        "execute": lambda p: p.execute(f"insert into {table} values (1)"),
        "executemany": lambda p: p.executemany(f"insert into {table} values ($1)", [(1,), (2,)]),
        "fetch": lambda p: p.fetch(f"select * from {table}"),
        "fetchval": lambda p: p.fetchval(f"select count(*) from {table}"),
        "fetchrow": lambda p: p.fetchrow(f"select count(*) from {table}"),
        "copy_from_table": lambda p: p.copy_from_table(table, output=io.BytesIO()),
        "copy_from_query": lambda p: p.copy_from_query(
            f"select * from {table}", output=io.BytesIO()
        ),
        "copy_to_table": lambda p: p.copy_to_table(table, source=io.BytesIO(b"3\n")),
        "copy_records_to_table": lambda p: p.copy_records_to_table(table, records=[(4,)]),
    }
    if "fetchmany" in Pool.__dict__:  # asyncpg 0.30+
        calls["fetchmany"] = lambda p: p.fetchmany(
            f"insert into {table} values ($1) returning a", [(5,), (6,)]
        )
    return calls


SHORTCUT_NAMES = [name for name in apg_adapter.SHORTCUTS if name in Pool.__dict__]


# -- the shortcuts ------------------------------------------------------------------------------


@pytest.mark.parametrize("shortcut", SHORTCUT_NAMES)
def test_running_shortcut_is_one_holder_and_leaves_no_trace(
    shortcut: str, pg: Server, table: str, events: EventCapture
) -> None:
    call = _shortcuts(table)[shortcut]

    async def body(pool: Pool) -> None:
        async with _admin(pg) as admin, admin.transaction():
            await admin.execute(f"lock table {table} in access exclusive mode")
            task = asyncio.create_task(call(pool), name=f"shortcut-{shortcut}")
            await _until_lock_waiters(admin)
            assert _holders() == [_task(f"shortcut-{shortcut}")]
            assert len(core.leases) == 1
        await asyncio.wait_for(task, 10)
        assert pgleak.checked_out() == []

    _run(pg, body)
    assert core.leases == {}
    assert core.by_conn == {}
    assert events.events == []


def test_slow_shortcut_is_never_reported_and_leaves_the_ledger_empty(
    pg: Server, events: EventCapture
) -> None:
    async def body(pool: Pool) -> None:
        assert await pool.fetchval("select pg_sleep($1)::text", 3 * THRESHOLD) == ""
        assert pgleak.checked_out() == []

    _run(pg, body)
    run_watchdog()
    assert events.events == []
    assert core.leases == {}


def test_shortcut_held_past_threshold_is_skipped_while_a_checkout_is_reported(
    pg: Server, events: EventCapture
) -> None:
    async def body(pool: Pool) -> None:
        async with _admin(pg) as admin:
            await admin.execute("select pg_advisory_lock(4711)")
            slow = asyncio.create_task(
                pool.fetchval("select pg_advisory_lock(4711)"), name="slow-shortcut"
            )
            await _until_lock_waiters(admin)
            conn = await pool.acquire()  # HELD
            # By the time the plain checkout is reported, the shortcut is older than it.
            [suspected] = await asyncio.to_thread(events.wait_for, "leak.suspected")
            await asyncio.to_thread(run_watchdog)
            assert not slow.done()
            ages = {c.holder: c.held_s for c in pgleak.checked_out()}
            assert ages[_task("slow-shortcut")] > THRESHOLD
            assert len(events.of("leak.suspected")) == 1
            await admin.execute("select pg_advisory_unlock(4711)")
        await asyncio.wait_for(slow, 10)
        await pool.release(conn)
        assert suspected.checkout is not None
        assert suspected.checkout.holder == _task()
        assert_site(suspected.stack, "HELD")

    _run(pg, body)
    assert [e.event for e in events.events] == ["leak.suspected", "leak.returned"]
    assert core.leases == {}


# -- acquire / release --------------------------------------------------------------------------


def test_await_acquire_and_release_are_tracked_once(pg: Server, events: EventCapture) -> None:
    async def body(pool: Pool) -> None:
        conn = await pool.acquire()  # TAKE
        [out] = pgleak.checked_out()
        assert_site(out.stack, "TAKE")
        assert len(core.leases) == len(core.by_conn) == 1
        await pool.release(conn)
        assert pgleak.checked_out() == []
        await pool.release(conn)  # twice: a no-op in asyncpg, and in pgleak
        assert pgleak.checked_out() == []

    _run(pg, body)
    assert core.leases == {}
    assert events.events == []


def test_async_with_acquire_is_tracked_once(pg: Server, events: EventCapture) -> None:
    async def body(pool: Pool) -> None:
        async with pool.acquire(timeout=5) as conn:  # WITH
            assert await conn.fetchval("select 1") == 1
            [out] = pgleak.checked_out()
            assert_site(out.stack, "WITH")
            assert out.holder == _task()
        assert pgleak.checked_out() == []

    _run(pg, body)
    assert core.leases == {}
    assert events.events == []


class _Told(BlockObserver):
    """The task each enter and exit ran in (the span is made current in the block's own
    context) and whether the lease was the one filed on its connection."""

    def note(self, what: str, lease: Any) -> object:
        task = asyncio.current_task()
        held = [lease is core.lease_of(ref()) for ref in (lease.ref,) if ref is not None]
        return (what, task.get_name() if task else None, held)


@pytest.mark.internal_errors
@pytest.mark.skipif(
    not hasattr(_stack._fast, "ablock_wrapper"),
    reason="compares the C blocks with Python's reads; without pgleak._speedups only Python runs",
)
def test_the_c_and_python_blocks_tell_the_observer_the_same(
    pg: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``async with pool.acquire()`` while an observer runs: the C ``__aenter__`` /
    ``__aexit__`` (pgleak._speedups.Tracked) tell it what the Python functions and their
    ``traced`` coroutine tell it, in the same task, and report its faults at the same site."""

    async def body(pool: Pool, told: _Told) -> None:
        async with pool.acquire() as conn:
            told.seen.append(("inside", await conn.fetchval("select 1")))

        async def in_a_task() -> None:
            async with pool.acquire():
                told.seen.append(("inside a task",))

        await asyncio.create_task(in_a_task(), name="block-task")
        with contextlib.suppress(KeyError):
            async with pool.acquire():
                raise KeyError("the user's")
        bare = await pool.acquire()  # no block: never entered
        await pool.release(bare)
        held = [await pool.acquire(), await pool.acquire()]
        try:
            async with pool.acquire(timeout=0.01):
                told.seen.append(("never inside",))
        except asyncio.TimeoutError:
            told.seen.append(("no connection",))
        for conn in held:
            await pool.release(conn)
        told.broken = True
        async with pool.acquire():
            told.seen.append(("inside, faulty observer",))

    def run(c: bool) -> list[Any]:
        told = _Told()
        with observed_by(monkeypatch, c, told, PoolAcquireContext, ("__aenter__",)) as faults:

            async def main() -> None:
                pool = await _open(pg)
                try:
                    await asyncio.create_task(body(pool, told), name="the-task")
                finally:
                    pool.terminate()

            asyncio.run(main())
        return [*told.seen, ("faults", faults)]

    python, c = run(False), run(True)
    assert c == python
    enter, exit_ = ("enter", "the-task", [True]), ("exit", "the-task", [True])
    fault = ("asyncpg.scope", 'RuntimeError("pgleak\'s own fault")')
    assert python == [
        *(enter, ("inside", 1), exit_),
        *(("enter", "block-task", [True]), ("inside a task",), ("exit", "block-task", [True])),
        *(enter, exit_),
        ("no connection",),
        ("inside, faulty observer",),
        ("faults", [fault, fault]),  # the block's enter and exit
    ]


class _Counted(collections.deque):  # type: ignore[type-arg]
    """A pool's ``pending`` whose appends and pops are written down (``calls``)."""

    calls: list[str]

    def append(self, item: Any) -> None:
        self.calls.append("append")
        super().append(item)

    def pop(self, *index: int) -> Any:
        self.calls.append("pop")
        return super().pop(*index)


_T = TypeVar("_T")


def _either_way(
    pg: Server,
    monkeypatch: pytest.MonkeyPatch,
    c: bool,
    body: Callable[[Pool, pytest.MonkeyPatch], Awaitable[_T]],
    before: Callable[[pytest.MonkeyPatch], None] = lambda patched: None,
) -> _T:
    """``body(pool, patched)`` on a fresh pool, pgleak installed with the C wrappers (``c``)
    or the Python ones; ``before(patched)`` after the install."""
    with monkeypatch.context() as patched:
        patched.setattr(_adapter, "use_c_wrappers", c)
        pgleak.install(leak_threshold=60, report_interval=60)
        try:
            before(patched)

            async def main() -> _T:
                pool = await _open(pg)
                try:
                    return await body(pool, patched)
                finally:
                    pool.terminate()

            return asyncio.run(main())
        finally:
            pgleak.uninstall()
            _guard.reset()


@pytest.mark.skipif(
    not hasattr(_stack._fast, "ablock_wrapper"),
    reason="compares the C blocks with Python's reads; without pgleak._speedups only Python runs",
)
def test_an_observed_wait_is_counted_by_the_pools_pending_whatever_its_class(
    pg: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C checkout calls a plain deque's ``append`` / ``pop`` without looking them up by
    name; any other ``pending`` (a subclass here) is called by name, as the Python one is."""

    def run(c: bool) -> tuple[list[str], list[int]]:
        def before(patched: pytest.MonkeyPatch) -> None:
            patched.setattr(core, "observer", _Told())
            core.observer_started()
            wrapper = PoolAcquireContext.__dict__["__aenter__"]
            assert (type(wrapper) is _stack._fast.Tracked) is c

        async def body(pool: Pool, patched: pytest.MonkeyPatch) -> tuple[list[str], list[int]]:
            async with pool.acquire():
                pass
            [handle] = [h for h in core._pools.values() if h.ref() is pool]
            lengths = [len(handle.pending)]
            counted = _Counted()
            counted.calls = []
            handle.pending = counted
            async with pool.acquire():
                lengths.append(len(handle.pending))
            await pool.release(await pool.acquire())
            lengths.append(len(handle.pending))
            return counted.calls, lengths

        return _either_way(pg, monkeypatch, c, body, before)

    python, c = run(False), run(True)
    assert c == python == (["append", "pop"] * 2, [0, 0, 0])


@pytest.mark.skipif(
    not hasattr(_stack._fast, "ablock_wrapper"),
    reason="compares the C blocks with Python's reads; without pgleak._speedups only Python runs",
)
def test_the_c_blocks_read_a_replaced_proxy_con_as_python_does(
    pg: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C blocks read the proxy's ``_con`` from its slot only while it is the slot's member
    descriptor; a property in its place is read by name, as many times as in Python."""
    slot = PoolConnectionProxy.__dict__["_con"]
    reads: list[bool] = []

    def get(proxy: Any) -> Any:
        reads.append(True)
        return slot.__get__(proxy)

    def run(c: bool) -> tuple[list[Any], int]:
        reads.clear()
        with monkeypatch.context() as patched:
            patched.setattr(_adapter, "use_c_wrappers", c)
            pgleak.install(leak_threshold=60, report_interval=60)
            try:
                told = _Told()
                patched.setattr(core, "observer", told)
                core.observer_started()
                patched.setattr(PoolConnectionProxy, "_con", property(get, slot.__set__))

                async def block(pool: Pool) -> None:
                    async with pool.acquire():
                        pass

                async def main() -> None:
                    pool = await _open(pg)
                    try:
                        await asyncio.create_task(block(pool), name="the-task")
                    finally:
                        pool.terminate()

                asyncio.run(main())
            finally:
                pgleak.uninstall()
                _guard.reset()
        return told.seen, len(reads)

    python, c = run(False), run(True)
    assert c == python
    assert python[0] == [("enter", "the-task", [True]), ("exit", "the-task", [True])]
    assert python[1] > 2  # the checkout's read and the block's two, at least


@pytest.mark.skipif(
    not hasattr(_stack._fast, "aacquire_wrapper"),
    reason="compares the C checkout with Python's reads; without pgleak._speedups only Python runs",
)
def test_the_c_checkout_reads_a_proxy_con_replaced_after_it_was_kept_as_python_does(
    pg: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C checkout keeps the proxy's ``_con`` slot while the proxy's class is unchanged
    since it found it; a property put in its place afterwards is read by name, as many times
    as in Python, and the lease filed under the connection it gives."""
    slot = PoolConnectionProxy.__dict__["_con"]
    reads: list[bool] = []

    def get(proxy: Any) -> Any:
        reads.append(True)
        return slot.__get__(proxy)

    async def body(pool: Pool, patched: pytest.MonkeyPatch) -> tuple[int, bool]:
        async with pool.acquire():
            pass  # the C checkout finds the slot, and keeps it
        reads.clear()
        patched.setattr(PoolConnectionProxy, "_con", property(get, slot.__set__))
        async with pool.acquire() as proxy:
            con = slot.__get__(proxy)
            lease = core.by_conn.get(id(con))
            ref = None if lease is None else lease.ref
            return len(reads), ref is not None and ref() is con

    def run(c: bool) -> tuple[int, bool]:
        return _either_way(pg, monkeypatch, c, body)

    python, c = run(False), run(True)
    assert c == python
    assert python[0] >= 1
    assert python[1]


def test_release_to_another_pool_raises_and_leaves_the_ledger_alone(
    pg: Server, events: EventCapture
) -> None:
    async def body(pool: Pool) -> None:
        other = await _open(pg)
        try:
            conn = await pool.acquire()
            [before] = pgleak.checked_out()
            with pytest.raises(asyncpg.InterfaceError, match="not a member of this pool"):
                await other.release(conn)
            with pytest.raises(asyncpg.InterfaceError, match="not a member of this pool"):
                await pool.release(object())
            [after] = pgleak.checked_out()
            assert after.checkout_id == before.checkout_id
            await pool.release(conn)
            assert pgleak.checked_out() == []
        finally:
            other.terminate()

    _run(pg, body)
    assert events.events == []


def test_cancelled_release_still_returns_the_connection(pg: Server, events: EventCapture) -> None:
    async def body(pool: Pool) -> None:
        conn = await pool.acquire()
        release = asyncio.create_task(pool.release(conn))
        await asyncio.sleep(0)  # let release() start its shielded work
        release.cancel()
        with pytest.raises(asyncio.CancelledError):
            await release
        # The shielded release finishes on its own: the next checkout gets the slot back.
        async with pool.acquire(timeout=5):
            pass
        assert pool.get_idle_size() == pool.get_size()
        assert pgleak.checked_out() == []

    _run(pg, body, size=1)
    assert core.leases == {}
    assert events.events == []


# -- connections the pool discards --------------------------------------------------------------


def test_backend_killed_while_lent_leaves_the_ledger_without_a_report(
    pg: Server, events: EventCapture
) -> None:
    pgleak.install(leak_threshold=30)

    async def body(pool: Pool) -> None:
        conn = await pool.acquire()
        await _kill_backend(pg, conn)
        # asyncpg put the slot back by itself: nothing is checked out any more.
        assert pgleak.checked_out() == []
        await pool.release(conn)  # the application's own cleanup: harmless
        assert await pool.fetchval("select 1") == 1

    _run(pg, body)
    assert events.events == []
    assert core.leases == {}


def test_reported_connection_killed_by_the_server_is_discarded_not_returned(
    pg: Server, events: EventCapture
) -> None:
    async def body(pool: Pool) -> None:
        conn = await pool.acquire()  # KILLED
        await asyncio.to_thread(events.wait_for, "leak.suspected")
        await _kill_backend(pg, conn)
        assert pgleak.checked_out() == []
        await pool.release(conn)

    _run(pg, body)
    run_watchdog()
    # The application never gave it back: no ``leak.returned`` says it did.
    [event] = events.events
    assert event.event == "leak.suspected"
    assert_site(event.stack, "KILLED")
    assert core.leases == {}


@pytest.mark.parametrize("how", ["close", "terminate"])
def test_connection_closed_by_its_holder_leaves_the_ledger(
    how: str, pg: Server, events: EventCapture
) -> None:
    async def body(pool: Pool) -> None:
        conn = await pool.acquire()
        if how == "close":
            await conn.close()
        else:
            conn.terminate()
        assert pgleak.checked_out() == []
        await pool.release(conn)
        assert await pool.fetchval("select 2") == 2

    _run(pg, body)
    assert core.leases == {}
    assert events.events == []


def test_connections_closed_on_release_by_the_pool_leave_no_trace(
    pg: Server, events: EventCapture
) -> None:
    async def body(pool: Pool) -> None:
        async def work() -> None:
            for _ in range(10):
                async with pool.acquire(timeout=10) as conn:
                    await conn.fetchval("select 1")
                await pool.expire_connections()

        await asyncio.gather(*(work() for _ in range(4)))

    _run(pg, body, max_queries=1)  # every release closes the connection
    run_watchdog()
    assert core.leases == {}
    assert core.by_conn == {}
    assert events.events == []


# -- close, terminate, exhaustion ---------------------------------------------------------------


def test_close_reports_what_is_out_at_once_then_waits_for_it(
    pg: Server, events: EventCapture
) -> None:
    pgleak.install(leak_threshold=30)

    async def body(pool: Pool) -> None:
        conn = await pool.acquire()  # AT-CLOSE
        closing = asyncio.create_task(pool.close())
        [event] = await asyncio.to_thread(events.wait_for, "leak.at_exit")
        assert event.detail == "pool.close()"
        assert not closing.done()  # close() is still waiting for the connection
        await pool.release(conn)
        await asyncio.wait_for(closing, 10)
        assert pgleak.checked_out() == []
        await asyncio.to_thread(events.wait_for, "leak.returned")

    _run(pg, body)
    [event] = events.of("leak.at_exit")
    # The late release is the follow-up docs/events.md promises, for the same checkout.
    assert [e.event for e in events.events] == ["leak.at_exit", "leak.returned"]
    [returned] = events.of("leak.returned")
    assert returned.checkout is not None
    assert event.checkout is not None
    assert returned.checkout.checkout_id == event.checkout.checkout_id
    assert_site(event.stack, "AT-CLOSE")
    assert event.pool == (
        f"asyncpg Pool (host={pg.host} port={pg.port} user={pg.user} database={pg.dbname})"
    )
    assert core.leases == {}


def test_close_while_a_shortcut_runs_reports_nothing(pg: Server, events: EventCapture) -> None:
    async def body(pool: Pool) -> None:
        async with _admin(pg) as admin:
            await admin.execute("select pg_advisory_lock(4713)")
            shortcut = asyncio.create_task(pool.fetchval("select pg_advisory_lock(4713)"))
            await _until_lock_waiters(admin)
            closing = asyncio.create_task(pool.close())
            await asyncio.sleep(0)  # one loop pass: close() starts and waits for the shortcut
            assert pool.is_closing()
            assert not closing.done()
            await admin.execute("select pg_advisory_unlock(4713)")
        await asyncio.wait_for(shortcut, 10)
        await asyncio.wait_for(closing, 10)

    _run(pg, body)
    run_watchdog()
    assert events.events == []
    assert core.leases == {}


def test_terminate_reports_what_is_out(pg: Server, events: EventCapture) -> None:
    pgleak.install(leak_threshold=30)

    async def body(pool: Pool) -> None:
        conn = await pool.acquire()  # AT-TERMINATE
        pool.terminate()
        [event] = events.of("leak.at_exit")
        assert event.detail == "pool.terminate()"
        assert_site(event.stack, "AT-TERMINATE")
        assert pgleak.checked_out() == []
        # terminate() detached the proxy, so release() is the no-op of a second release.
        await pool.release(conn)
        assert pgleak.checked_out() == []

    _run(pg, body)
    assert [e.event for e in events.events] == ["leak.at_exit"]
    assert core.leases == {}


def test_exhausted_with_timeout_lists_tasks_and_shortcuts_oldest_first(
    pg: Server, events: EventCapture
) -> None:
    pgleak.install(leak_threshold=30)

    async def query(pool: Pool) -> Any:
        return await pool.fetchval("select pg_advisory_lock(4712)")  # SHORTCUT

    async def body(pool: Pool) -> None:
        async with _admin(pg) as admin:
            await admin.execute("select pg_advisory_lock(4712)")
            held = await pool.acquire()  # FIRST
            shortcut = asyncio.create_task(query(pool), name="shortcut")
            await _until_lock_waiters(admin)
            with pytest.raises(asyncio.TimeoutError):
                await pool.acquire(timeout=0.3)  # WAITER
            await admin.execute("select pg_advisory_unlock(4712)")
        await asyncio.wait_for(shortcut, 10)
        await pool.release(held)
        me.append(_task())

    me: list[str] = []
    _run(pg, body)
    [event] = events.of("pool.exhausted")
    assert [h.holder for h in event.holders] == [*me, _task("shortcut")]
    assert event.holders[0].checkout_id < event.holders[1].checkout_id
    assert_site(event.holders[0].stack, "FIRST")
    assert_site(event.holders[1].stack, "SHORTCUT")
    assert event.holders[1].holder_stack is not None
    assert_site(event.holders[1].holder_stack, "SHORTCUT")  # still in the shortcut
    assert event.waiter is not None
    assert event.waiter.held_s == 0.3
    assert_site(event.waiter.stack, "WAITER")
    assert event.detail is not None
    assert event.detail.startswith("TimeoutError")
    assert [e.event for e in events.events] == ["pool.exhausted"]
    assert core.leases == {}


def test_acquire_without_timeout_waits_and_reports_nothing(
    pg: Server, events: EventCapture
) -> None:
    pgleak.install(leak_threshold=30)

    async def body(pool: Pool) -> None:
        async def take() -> Any:
            return await pool.acquire()

        held = await pool.acquire()
        waiter = asyncio.create_task(take(), name="waiter")
        done, _ = await asyncio.wait({waiter}, timeout=0.3)
        assert not done  # still waiting, as asyncpg does without a timeout
        await pool.release(held)
        conn = await asyncio.wait_for(waiter, 10)
        assert [c.holder for c in pgleak.checked_out()] == [_task("waiter")]
        await pool.release(conn)

    _run(pg, body, size=1)
    assert events.events == []
    assert core.leases == {}


def test_connect_timeout_is_not_reported_as_exhaustion(events: EventCapture) -> None:
    # A listening socket nobody accepts on: TCP connects, the server never answers.
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        host, port = silent.getsockname()

        async def main() -> None:
            pool = await asyncpg.create_pool(
                host=host, port=port, user="nobody", min_size=0, max_size=1, timeout=0.2
            )
            try:
                with pytest.raises(asyncio.TimeoutError):
                    await pool.acquire()
                with pytest.raises(asyncio.TimeoutError):
                    await pool.acquire(timeout=5)
            finally:
                pool.terminate()

        asyncio.run(main())
    assert events.events == []


# -- naming -------------------------------------------------------------------------------------


def test_pool_name_shows_the_target_and_never_the_password() -> None:
    async def main() -> list[str]:
        pools = [
            asyncpg.create_pool("postgresql://app:s3cret@db:5433/shop", password="kw-secret"),
            asyncpg.create_pool(dsn="host=db password=s3cret dbname=shop"),
            asyncpg.create_pool(host=["a", "b"], port=5432, user="app", password="s3cret"),
            asyncpg.create_pool(),
        ]
        return [apg_adapter._pool_name(pool) for pool in pools]

    names = asyncio.run(main())
    assert names == [
        "asyncpg Pool (postgresql://app:***@db:5433/shop)",
        "asyncpg Pool (host=db password=*** dbname=shop)",
        "asyncpg Pool (host=a,b port=5432 user=app)",
        "asyncpg Pool",
    ]
    assert not any("secret" in name for name in names)


# -- install / uninstall ------------------------------------------------------------------------


@pytest.fixture
def clean() -> Iterator[None]:
    pgleak.uninstall()
    yield
    pgleak.uninstall()


PATCHED = [
    (Pool, "_acquire"),
    (Pool, "_get_new_connection"),
    (Pool, "close"),
    (Pool, "terminate"),
    (PoolConnectionHolder, "_release"),
    (PoolConnectionHolder, "_release_on_close"),
    *((Pool, name) for name in SHORTCUT_NAMES),
]


def test_uninstall_restores_every_patched_attribute_exactly(clean: None) -> None:
    originals = {(owner, attr): owner.__dict__[attr] for owner, attr in PATCHED}
    for _ in range(2):
        pgleak.install(integrations=["asyncpg"])
    assert pgleak.installed() == ["asyncpg"]
    for (owner, attr), original in originals.items():
        assert owner.__dict__[attr] is not original, f"{owner.__name__}.{attr} not patched"
        assert getattr(owner.__dict__[attr], "__pgleak_wrapped__", False)
    pgleak.uninstall()
    for (owner, attr), original in originals.items():
        assert owner.__dict__[attr] is original, f"{owner.__name__}.{attr} not restored"
