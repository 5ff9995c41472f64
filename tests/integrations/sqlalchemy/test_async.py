"""SQLAlchemy asyncio engines (asyncpg and psycopg drivers) against the real server.

Pool code runs in a greenlet there; every report must still name the test coroutine's line.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import threading
from collections.abc import Awaitable, Callable, Coroutine
from typing import Any

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine

import pgleak
from pgleak import _stack
from pgleak._core import core
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import BlockObserver, assert_site, observed_by

pytest.importorskip("greenlet")

Body = Callable[[AsyncEngine], Awaitable[None]]


@pytest.fixture(params=["asyncpg", "psycopg"])
def run(
    request: pytest.FixtureRequest, pg: Server, installed: pgleak.Settings
) -> Callable[[Body], None]:
    """Run a coroutine against a fresh async engine of the parametrised driver."""
    driver = request.param
    pytest.importorskip(driver)

    def runner(body: Body) -> None:
        async def main() -> None:
            engine = create_async_engine(
                pg.url(driver), pool_size=3, max_overflow=0, pool_timeout=0.5
            )
            try:
                await body(engine)
            finally:
                await engine.dispose()

        asyncio.run(main())

    return runner


def test_held_past_threshold_names_the_task_and_its_line(
    run: Callable[[Body], None], events: EventCapture
) -> None:
    async def leaker(engine: AsyncEngine) -> None:
        conn = await engine.connect()  # CHECKOUT
        await asyncio.to_thread(events.wait_for, "leak.suspected")  # TASK-NOW
        await conn.close()

    async def body(engine: AsyncEngine) -> None:
        await asyncio.create_task(leaker(engine), name="leaky-task")

    run(body)
    [event] = events.of("leak.suspected")
    assert event.checkout is not None
    assert_site(event.stack, "CHECKOUT")
    assert event.checkout.holder == "task 'leaky-task' (thread 'MainThread')"
    assert event.checkout.holder_stack is not None
    assert_site(event.checkout.holder_stack, "TASK-NOW")
    [returned] = events.wait_for("leak.returned")
    assert returned.checkout is not None
    assert returned.checkout.checkout_id == event.checkout.checkout_id


def test_watchdog_reports_while_the_event_loop_is_blocked(
    run: Callable[[Body], None], events: EventCapture
) -> None:
    """The leaking coroutine blocks its own loop; the report must not wait for the loop."""

    async def body(engine: AsyncEngine) -> None:
        async with engine.connect() as conn:  # BLOCKING-CHECKOUT
            await conn.execute(sa.text("select 1"))
            events.wait_for("leak.suspected", timeout=10)  # LOOP-BLOCKED-HERE

    run(body)
    [event] = events.of("leak.suspected")
    assert event.checkout is not None
    assert event.checkout.holder_stack is not None
    assert_site(event.stack, "BLOCKING-CHECKOUT")
    assert_site(event.checkout.holder_stack, "LOOP-BLOCKED-HERE")


def test_garbage_collected_async_connection_is_reported(
    run: Callable[[Body], None], events: EventCapture
) -> None:
    async def body(engine: AsyncEngine) -> None:
        conn = await engine.connect()  # COLLECTED
        await conn.execute(sa.text("select 1"))
        del conn
        gc.collect()
        await asyncio.to_thread(events.wait_for, "leak.collected")

    with pytest.warns(sa.exc.SAWarning, match="garbage collector"):
        run(body)
    [event] = events.of("leak.collected")
    assert_site(event.stack, "COLLECTED")
    assert pgleak.checked_out() == []


def test_still_out_at_dispose_is_reported(
    run: Callable[[Body], None], events: EventCapture
) -> None:
    async def body(engine: AsyncEngine) -> None:
        conn = await engine.connect()  # AT-DISPOSE
        await engine.dispose()
        [event] = events.of("leak.at_exit")
        assert_site(event.stack, "AT-DISPOSE")
        await conn.close()
        await asyncio.to_thread(events.wait_for, "leak.returned")

    run(body)


def test_pool_exhausted_lists_holders_and_the_waiting_line(
    run: Callable[[Body], None], events: EventCapture
) -> None:
    async def body(engine: AsyncEngine) -> None:
        held = [await engine.connect() for _ in range(3)]  # HOLDERS
        with pytest.raises(sa.exc.TimeoutError):
            await engine.connect()  # WAITER
        for conn in held:
            await conn.close()

    run(body)
    [event] = events.of("pool.exhausted")
    assert len(event.holders) == 3
    ids = [h.checkout_id for h in event.holders]
    assert ids == sorted(ids)
    for holder in event.holders:
        assert_site(holder.stack, "HOLDERS")
    assert event.waiter is not None
    assert_site(event.waiter.stack, "WAITER")


def test_many_tasks_leave_the_ledger_empty(run: Callable[[Body], None]) -> None:
    async def body(engine: AsyncEngine) -> None:
        engine.sync_engine.pool._timeout = 30  # type: ignore[attr-defined]

        async def work() -> None:
            for _ in range(15):
                async with engine.connect() as conn:
                    await conn.execute(sa.text("select 1"))

        await asyncio.gather(*(work() for _ in range(20)))
        assert pgleak.checked_out() == []

    run(body)
    assert core.leases == {}


def test_tasks_in_several_threads_each_named_as_holder(pg: Server, events: EventCapture) -> None:
    """Each thread runs its own loop; the holder names both task and thread."""
    results: dict[str, str] = {}

    def thread_main(n: int) -> None:
        async def main() -> None:
            engine = create_async_engine(pg.url("asyncpg"))
            try:
                conn = await engine.connect()
                # Hold it until this thread's own report has arrived.
                await asyncio.to_thread(
                    events.wait_until,
                    lambda evs: any(
                        e.checkout and e.checkout.holder.endswith(f"(thread 'loop-{n}')")
                        for e in evs
                        if e.event == "leak.suspected"
                    ),
                )
                await conn.close()
            finally:
                await engine.dispose()

        asyncio.run(main())
        results[threading.current_thread().name] = "done"

    threads = [threading.Thread(target=thread_main, args=(n,), name=f"loop-{n}") for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    holders = {e.checkout.holder for e in events.of("leak.suspected") if e.checkout}
    assert {h.split("(thread ")[1] for h in holders} == {f"'loop-{n}')" for n in range(3)}
    assert len(results) == 3


class _Told(BlockObserver):
    """The task each enter and exit ran in (the span is made current in the block's own
    context) and the type of the lease's connection."""

    def note(self, what: str, lease: Any) -> object:
        task = asyncio.current_task()
        fairy = lease.ref() if lease.ref is not None else None
        return (what, task.get_name() if task else None, type(fairy).__name__)

    def mine(self, conn: Any) -> bool:
        """Whether the last lease told is the one filed on ``conn``'s pool record."""
        record = conn.sync_connection._dbapi_connection._connection_record
        return self.last is not None and record.__dict__.get("_pgleak_lease") is self.last


def _told_by(
    monkeypatch: pytest.MonkeyPatch,
    pg: Server,
    c: bool,
    body: Callable[[AsyncEngine, _Told], Coroutine[Any, Any, None]],
    **engine: Any,
) -> list[Any]:
    """``body`` run in a task of its own ("the-task") on a new engine (pool of one) while a
    ``_Told`` observes, with the C block wrappers or the Python ones: what it was told, and
    the faults swallowed last."""
    told = _Told()
    with observed_by(monkeypatch, c, told, AsyncConnection, ("__aenter__", "__aexit__")) as faults:

        async def main() -> None:
            made = create_async_engine(pg.url("asyncpg"), pool_size=1, max_overflow=0, **engine)
            try:
                await asyncio.create_task(body(made, told), name="the-task")
            finally:
                await made.dispose()

        asyncio.run(main())
    return [*told.seen, ("faults", faults)]


@pytest.mark.skipif(
    not hasattr(_stack._fast, "ablock_wrapper"),
    reason="compares the C block's slot read with Python's; without pgleak._speedups only Python "
    "runs",
)
def test_a_changed_sync_connection_is_read_as_python_reads_it(
    pg: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The C block reads ``AsyncConnection.sync_connection`` from its slot while the class is
    the one it found the slot on, unchanged: made a property since, it reads by name, as the
    Python ``_scope`` does (the property read as often, the observer told the same)."""
    pytest.importorskip("asyncpg")
    slot = AsyncConnection.__dict__["sync_connection"]
    reads = [0]

    def read(conn: object) -> object:
        reads[0] += 1
        return slot.__get__(conn, type(conn))

    counted = property(read, slot.__set__)

    async def cycle(engine: AsyncEngine, told: _Told, what: str) -> None:
        before = reads[0]
        async with engine.connect():
            told.seen.append((what, "inside"))
        told.seen.append((what, reads[0] - before))

    async def body(engine: AsyncEngine, told: _Told) -> None:
        await cycle(engine, told, "plain")
        await cycle(engine, told, "plain again")
        with monkeypatch.context() as swapped:
            swapped.setattr(AsyncConnection, "sync_connection", counted)
            await cycle(engine, told, "a property")
        await cycle(engine, told, "the slot again")

    def run(c: bool) -> list[Any]:
        return _told_by(monkeypatch, pg, c, body)

    python, c = run(False), run(True)
    assert c == python
    enter, exit_ = (
        ("enter", "the-task", "_ConnectionFairy"),
        ("exit", "the-task", "_ConnectionFairy"),
    )
    assert python[-1] == ("faults", [])
    counts = [entry[1] for entry in python if isinstance(entry[1], int)]
    assert counts[0] == counts[1] == counts[3] == 0
    assert counts[2] > 0
    assert [entry for entry in python if not isinstance(entry[1], int)][:3] == [
        enter,
        ("plain", "inside"),
        exit_,
    ]


@pytest.mark.internal_errors
@pytest.mark.skipif(
    not hasattr(_stack._fast, "ablock_wrapper"), reason="pgleak._speedups is not in use here"
)
def test_the_c_and_python_blocks_tell_the_observer_the_same(
    pg: Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``async with engine.connect()`` / ``engine.begin()`` while an observer runs: the C
    ``AsyncConnection.__aenter__`` / ``__aexit__`` (pgleak._speedups.Tracked) tell it what the
    Python functions and their ``traced`` coroutine tell it, in the same task, with the block's
    own lease, and report its faults at the same site."""
    pytest.importorskip("asyncpg")

    async def body(engine: AsyncEngine, told: _Told) -> None:
        async with engine.connect() as conn:
            value = (await conn.execute(sa.text("select 1"))).scalar()
            told.seen.append(("inside", value, told.mine(conn)))
        async with engine.begin() as conn:
            told.seen.append(("inside begin", told.mine(conn)))

        async def in_a_task() -> None:
            async with engine.connect() as conn:
                told.seen.append(("inside a task", told.mine(conn)))

        await asyncio.create_task(in_a_task(), name="block-task")
        with contextlib.suppress(KeyError):
            async with engine.connect():
                raise KeyError("the user's")
        bare = await engine.connect()  # no block: never entered
        await bare.close()
        conn = engine.connect()  # the methods called as such, not by ``async with``
        assert await conn.__aenter__() is conn
        told.seen.append(("called", told.mine(conn)))
        await conn.__aexit__(None, None, None)
        held = await engine.connect()
        try:
            async with engine.connect():
                told.seen.append(("never inside",))
        except sa.exc.TimeoutError:
            told.seen.append(("no connection",))
        await held.close()
        told.broken = True
        async with engine.connect():
            told.seen.append(("inside, faulty observer",))

    def run(c: bool) -> list[Any]:
        return _told_by(monkeypatch, pg, c, body, pool_timeout=0.01)

    python, c = run(False), run(True)
    assert c == python
    fairy = "_ConnectionFairy"
    enter, exit_ = ("enter", "the-task", fairy), ("exit", "the-task", fairy)
    fault = ("sqlalchemy.scope", 'RuntimeError("pgleak\'s own fault")')
    assert python == [
        *(enter, ("inside", 1, True), exit_),
        *(enter, ("inside begin", True), exit_),
        *(("enter", "block-task", fairy), ("inside a task", True)),
        ("exit", "block-task", fairy),
        *(enter, exit_),
        *(enter, ("called", True), exit_),
        ("no connection",),
        ("inside, faulty observer",),
        ("faults", [fault, fault]),  # the block's enter and exit
    ]
