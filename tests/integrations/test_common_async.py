"""Behaviour every asyncio pool shares, tested once per pool API (see ``kits.py``).

Each test runs its own event loop with ``asyncio.run``; the holder of a connection is the task
that took it, and the watchdog (a thread) reports even while that task blocks the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import subprocess
import sys
import textwrap
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest

import pgleak
from pgleak._core import core
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import assert_site
from tests.integrations.kits import ASYNC_KITS, TERMINATE_OTHERS, Kit

pytestmark = pytest.mark.parametrize("kit", ASYNC_KITS, ids=str)

POOL_SIZE = 3
KITS_FILE = sys.modules[Kit.__module__].__file__

Body = Callable[[Any], Awaitable[None]]


def _outside_kits(stack: list[str]) -> list[str]:
    return [entry for entry in stack if not entry.startswith(f"{KITS_FILE}:")]


def _run(kit: Kit, pg: Server, body: Body, size: int = POOL_SIZE, timeout: float = 0.5) -> None:
    async def main() -> None:
        pool = kit.open(pg, size, timeout)
        if asyncio.iscoroutine(pool):
            pool = await pool
        try:
            await body(pool)
        finally:
            with contextlib.suppress(Exception):  # closed by the test already
                await kit.close(pool)

    asyncio.run(main())


def test_held_past_threshold_names_task_and_line_then_returned(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    async def leaker(pool: Any) -> None:
        conn = await kit.take(pool)  # TAKE
        await asyncio.to_thread(events.wait_for, "leak.suspected")  # AWAITING
        await kit.give(pool, conn)

    async def body(pool: Any) -> None:
        await asyncio.create_task(leaker(pool), name="leaky-task")
        await asyncio.to_thread(events.wait_for, "leak.returned")

    _run(kit, pg, body)
    [event] = events.of("leak.suspected")
    assert event.checkout is not None
    assert_site(_outside_kits(event.stack), "TAKE")
    assert event.checkout.holder == "task 'leaky-task' (thread 'MainThread')"
    assert event.checkout.holder_stack is not None
    assert_site(_outside_kits(event.checkout.holder_stack), "AWAITING")
    [returned] = events.of("leak.returned")
    assert returned.checkout is not None
    assert returned.checkout.checkout_id == event.checkout.checkout_id


async def _slow_remote_call(done: asyncio.Event) -> None:
    await done.wait()  # REMOTE-CALL


def test_holder_now_follows_the_await_chain_into_a_helper(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    """A connection held across a slow call shows the helper's line, not the call's."""

    async def leaker(pool: Any, done: asyncio.Event) -> None:
        conn = await kit.take(pool)
        await _slow_remote_call(done)  # CALLING
        await kit.give(pool, conn)

    async def body(pool: Any) -> None:
        done = asyncio.Event()
        task = asyncio.create_task(leaker(pool, done), name="leaky-task")
        await asyncio.to_thread(events.wait_for, "leak.suspected")
        done.set()
        await task

    _run(kit, pg, body)
    [event] = events.of("leak.suspected")
    assert event.checkout is not None
    holder_stack = _outside_kits(event.checkout.holder_stack or [])
    assert_site(holder_stack, "REMOTE-CALL")
    assert_site(holder_stack[:-1], "CALLING")


def test_reports_say_the_connections_transaction_state(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    """Read off the driver at report time: a held connection's open transaction is visible."""

    async def body(pool: Any) -> None:
        fresh, busy = await kit.take(pool), await kit.take(pool)
        await kit.query(busy)
        await asyncio.to_thread(events.wait_for, "leak.suspected", 2)
        for conn in (fresh, busy):
            await kit.give(pool, conn)

    _run(kit, pg, body)
    suspected = events.of("leak.suspected")
    assert sorted(e.checkout.state or "" for e in suspected if e.checkout) == sorted(kit.states)


def test_watchdog_reports_while_the_loop_is_blocked(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    async def body(pool: Any) -> None:
        async with kit.use(pool) as conn:  # WITH
            await kit.query(conn)
            events.wait_for("leak.suspected", timeout=10)  # BLOCKING

    _run(kit, pg, body)
    [event] = events.of("leak.suspected")
    assert event.checkout is not None
    assert event.checkout.holder_stack is not None
    assert_site(_outside_kits(event.stack), "WITH")
    assert_site(_outside_kits(event.checkout.holder_stack), "BLOCKING")


def test_dropped_connection_is_collected_or_still_out(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    async def body(pool: Any) -> None:
        conn = await kit.take(pool)  # DROPPED
        await kit.query(conn)
        del conn
        gc.collect()
        if kit.collectable:
            await asyncio.to_thread(events.wait_for, "leak.collected")
            assert pgleak.checked_out() == []
        else:
            assert len(pgleak.checked_out()) == 1
            await kit.close(pool)
            assert len(events.of("leak.at_exit")) == 1

    if kit.library == "sqlalchemy":
        # SQLAlchemy's async pools warn about the dropped connection too; pgleak says where.
        import sqlalchemy as sa

        with pytest.warns(sa.exc.SAWarning, match="garbage collector"):
            _run(kit, pg, body)
    else:
        _run(kit, pg, body)
    [event] = events.of("leak.collected" if kit.collectable else "leak.at_exit")
    assert_site(_outside_kits(event.stack), "DROPPED")


# The connection stays leaked on purpose; SQLAlchemy warns when it is finally collected.
@pytest.mark.filterwarnings("ignore:The garbage collector is trying to clean up:Warning")
def test_still_out_at_close_is_reported(kit: Kit, pg: Server, events: EventCapture) -> None:
    held: list[Any] = []

    async def body(pool: Any) -> None:
        held.append(await kit.take(pool))  # AT-CLOSE
        await kit.close(pool)

    _run(kit, pg, body)
    [event] = events.of("leak.at_exit")
    assert_site(_outside_kits(event.stack), "AT-CLOSE")
    assert event.detail not in (None, "process exit")


def test_exhausted_pool_lists_every_holder_oldest_first(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    async def hold(pool: Any, ready: asyncio.Event, release: asyncio.Event, n: int) -> None:
        conn = await kit.take(pool)  # HOLDER
        if n == POOL_SIZE - 1:
            ready.set()
        await release.wait()  # HOLDER-WAITING
        await kit.give(pool, conn)

    async def body(pool: Any) -> None:
        ready, release = asyncio.Event(), asyncio.Event()
        tasks = []
        for n in range(POOL_SIZE):
            tasks.append(asyncio.create_task(hold(pool, ready, release, n), name=f"holder-{n}"))
            await asyncio.sleep(0)  # let each take its connection in order
        await asyncio.wait_for(ready.wait(), 10)
        with pytest.raises(kit.exhausted):
            await kit.take(pool)  # WAITER
        release.set()
        await asyncio.gather(*tasks)

    _run(kit, pg, body)
    [event] = events.of("pool.exhausted")
    assert [h.checkout_id for h in event.holders] == sorted(h.checkout_id for h in event.holders)
    assert {h.holder for h in event.holders} == {
        f"task 'holder-{n}' (thread 'MainThread')" for n in range(POOL_SIZE)
    }
    for holder in event.holders:
        assert_site(_outside_kits(holder.stack), "HOLDER")
        assert holder.holder_stack is not None
        assert_site(_outside_kits(holder.holder_stack), "HOLDER-WAITING")
    assert event.waiter is not None
    assert_site(_outside_kits(event.waiter.stack), "WAITER")


def test_many_tasks_leave_the_ledger_empty(kit: Kit, pg: Server, installed: object) -> None:
    async def body(pool: Any) -> None:
        async def work() -> None:
            for _ in range(20):
                async with kit.use(pool) as conn:
                    await kit.query(conn)

        await asyncio.gather(*(work() for _ in range(12)))

    _run(kit, pg, body, timeout=30)
    assert core.leases == {}
    assert core.by_conn == {}


def test_backends_terminated_mid_load_leave_no_false_report(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    import psycopg

    pgleak.install(leak_threshold=30)

    async def body(pool: Any) -> None:
        stop = asyncio.Event()

        async def work() -> int:
            n = 0
            while not stop.is_set() and n < 300:
                n += 1
                try:
                    async with kit.use(pool) as conn:
                        await kit.query(conn)
                except Exception:  # the server killed this one: the application moves on
                    await asyncio.sleep(0)
            return n

        tasks = [asyncio.create_task(work()) for _ in range(4)]
        started = time.monotonic()
        while time.monotonic() - started < 0.3:
            await asyncio.sleep(0.01)
        with pgleak.suppress():
            async with await psycopg.AsyncConnection.connect(pg.dsn, autocommit=True) as admin:
                for _ in range(5):
                    await admin.execute(TERMINATE_OTHERS)
                    await asyncio.sleep(0.02)
        stop.set()
        await asyncio.gather(*tasks)

    _run(kit, pg, body, timeout=30)
    assert core.leases == {}
    assert [e.event for e in events.events] == []


def test_still_out_at_process_exit_is_reported(kit: Kit, pg: Server, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "leaky.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import asyncio, logging, sys
            sys.path.insert(0, {str(root)!r})
            import pgleak
            logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
            pgleak.install()
            from tests.conftest import Server
            from tests.integrations.kits import ASYNC_KITS
            [kit] = [k for k in ASYNC_KITS if k.name == {kit.name!r}]
            held = []
            async def main():
                server = Server({pg.host!r}, {pg.port}, {pg.user!r}, {pg.dbname!r}, 0)
                pool = kit.open(server, 2, 5)
                pool = await pool if asyncio.iscoroutine(pool) else pool
                held.append((pool, await kit.take(pool)))
            # The process ends with the loop still open, as a worker killed mid-run would
            # (asyncio.run() would first cancel the pool's own tasks, which psycopg_pool's
            # open pools do not survive quietly).
            asyncio.new_event_loop().run_until_complete(main())
            print("exiting", flush=True)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "leak.at_exit" in result.stdout, result.stdout + result.stderr
    assert f"{script}:14 in main" in result.stdout
