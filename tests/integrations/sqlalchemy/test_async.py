"""SQLAlchemy asyncio engines (asyncpg and psycopg drivers) against the real server.

Pool code runs in a greenlet there; every report must still name the test coroutine's line.
"""

from __future__ import annotations

import asyncio
import gc
import threading
from collections.abc import Awaitable, Callable

import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine

import pgleak
from pgleak._core import core
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import assert_site

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
