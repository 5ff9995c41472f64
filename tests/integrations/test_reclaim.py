"""Opt-in reclaim: a pool run dry by abandoned connections recovers; nothing in use is touched.

Each test plants a leak storm the way real code does it: holders (threads, tasks) that take a
connection, keep it somewhere (a module-level list) and end without giving it back. A live
holder keeps one connection in use throughout; reclaim must never touch it.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import pgleak
from pgleak.testing import EventCapture, capture_events
from tests.conftest import Server
from tests.integrations.kits import ASYNC_KITS, SYNC_KITS, Kit

SIZE = 3
#: Kits whose connections pgleak does not reclaim, and why (docs/reclaim.md).
NOT_RECLAIMED = {
    "psycopg2-simple": "SimpleConnectionPool is not thread-safe",
}
RECLAIMED_SYNC = [kit for kit in SYNC_KITS if kit.name not in NOT_RECLAIMED]
RECLAIMED_ASYNC = [kit for kit in ASYNC_KITS if kit.name not in NOT_RECLAIMED]
NEVER = [kit for kit in SYNC_KITS + ASYNC_KITS if kit.name in NOT_RECLAIMED]


@pytest.fixture
def reclaiming() -> Iterator[EventCapture]:
    pgleak.install(reclaim=True, reclaim_after=0.05, leak_threshold=60, report_interval=60)
    try:
        with capture_events() as events:
            yield events
    finally:
        pgleak.uninstall()


def _abandon(kit: Kit, pool: Any, keep: list[Any], count: int) -> None:
    """``count`` threads each take a connection, keep it in ``keep`` and end."""
    for n in range(count):
        worker = threading.Thread(target=lambda: keep.append(kit.take(pool)), name=f"abandoner-{n}")
        worker.start()
        worker.join(10)
        assert not worker.is_alive()


def _live_holder(kit: Kit, pool: Any) -> tuple[threading.Thread, threading.Event, list[Any]]:
    taken: list[Any] = []
    holding, release = threading.Event(), threading.Event()

    def hold() -> None:
        conn = kit.take(pool)
        taken.append(conn)
        holding.set()
        release.wait(30)
        kit.query(conn)  # still usable after the storm was reclaimed around it
        taken.append(kit.pid(conn))
        kit.give(pool, conn)

    thread = threading.Thread(target=hold, name="live-holder")
    thread.start()
    assert holding.wait(10)
    return thread, release, taken


@pytest.mark.parametrize("kit", RECLAIMED_SYNC, ids=str)
def test_sync_pool_recovers_from_a_leak_storm(
    kit: Kit, pg: Server, reclaiming: EventCapture
) -> None:
    pool = kit.open(pg, SIZE, 10.0)
    abandoned: list[Any] = []
    try:
        thread, release, taken = _live_holder(kit, pool)
        _abandon(kit, pool, abandoned, SIZE - 1)
        # The pool is full: every slot out, two of them held by threads that have ended.
        # Each new checkout finds the pool full again, so the next abandoned one goes too.
        fresh = []
        for n in range(1, SIZE):
            reclaiming.wait_for("leak.reclaimed", count=n, timeout=15)
            fresh.append(kit.take(pool))  # recovered: a slot is free again
            kit.query(fresh[-1])
        reclaimed = reclaiming.of("leak.reclaimed")
        for conn in fresh:
            kit.give(pool, conn)
        release.set()
        thread.join(10)
    finally:
        kit.close(pool)
    assert not thread.is_alive()
    assert len(taken) == 2  # the live holder's connection worked and went back normally
    assert sorted(e.checkout.holder for e in reclaimed if e.checkout) == [
        "thread 'abandoner-0'",
        "thread 'abandoner-1'",
    ]
    for event in reclaimed:
        assert event.checkout is not None
        assert event.checkout.holder_finished is False  # no holder stack: it has ended
        assert event.stack[-1].startswith(kit.take_site + " in ")
    assert not reclaiming.of("leak.returned")


@pytest.mark.parametrize("kit", RECLAIMED_ASYNC, ids=str)
def test_async_pool_recovers_from_a_leak_storm(
    kit: Kit, pg: Server, reclaiming: EventCapture
) -> None:
    abandoned: list[Any] = []

    async def main() -> list[Any]:
        pool = kit.open(pg, SIZE, 10.0)
        if asyncio.iscoroutine(pool):
            pool = await pool
        try:
            release = asyncio.Event()

            async def live() -> int:
                conn = await kit.take(pool)
                await release.wait()
                await kit.query(conn)
                pid = int(await kit.pid(conn))
                await kit.give(pool, conn)
                return pid

            holder = asyncio.create_task(live(), name="live-holder")
            for n in range(SIZE - 1):

                async def abandon() -> None:
                    abandoned.append(await kit.take(pool))

                await asyncio.create_task(abandon(), name=f"abandoner-{n}")
            fresh = []
            for n in range(1, SIZE):
                await asyncio.to_thread(reclaiming.wait_for, "leak.reclaimed", n, 15)
                fresh.append(await kit.take(pool))
                await kit.query(fresh[-1])
            reclaimed = reclaiming.of("leak.reclaimed")
            for conn in fresh:
                await kit.give(pool, conn)
            release.set()
            assert await holder > 0
            return reclaimed
        finally:
            await kit.close(pool)

    reclaimed = asyncio.run(main())
    assert sorted(e.checkout.holder.split(" (")[0] for e in reclaimed if e.checkout) == [
        "task 'abandoner-0'",
        "task 'abandoner-1'",
    ]


@pytest.mark.parametrize("kit", RECLAIMED_SYNC, ids=str)
def test_no_pressure_no_reclaim(kit: Kit, pg: Server, reclaiming: EventCapture) -> None:
    pool = kit.open(pg, 10, 10.0)
    abandoned: list[Any] = []
    try:
        _abandon(kit, pool, abandoned, 2)  # 2 of 10 out: no pressure
        for _ in range(3):
            pgleak.testing.run_watchdog()
        assert not reclaiming.of("leak.reclaimed")
        for conn in abandoned:
            kit.query(conn)  # untouched
    finally:
        for conn in abandoned:
            kit.give(pool, conn)
        kit.close(pool)


@pytest.mark.parametrize("kit", SYNC_KITS[:1], ids=str)
def test_off_by_default(kit: Kit, pg: Server, events: EventCapture) -> None:
    pool = kit.open(pg, 1, 10.0)
    abandoned: list[Any] = []
    try:
        _abandon(kit, pool, abandoned, 1)  # full, holder ended
        for _ in range(3):
            pgleak.testing.run_watchdog()
        assert not events.of("leak.reclaimed")
        kit.query(abandoned[0])
    finally:
        kit.give(pool, abandoned[0])
        kit.close(pool)


@pytest.mark.parametrize("kit", NEVER, ids=str)
def test_pools_that_cannot_be_reclaimed_safely_are_left_alone(
    kit: Kit, pg: Server, reclaiming: EventCapture
) -> None:
    reason = NOT_RECLAIMED[kit.name]
    if kit.is_async:

        async def main() -> None:
            pool = kit.open(pg, 1, 10.0)
            if asyncio.iscoroutine(pool):
                pool = await pool
            kept: list[Any] = []

            async def abandon() -> None:
                kept.append(await kit.take(pool))

            await asyncio.create_task(abandon())
            await asyncio.to_thread(_passes, 3)
            await kit.query(kept[0])
            await kit.give(pool, kept[0])
            await kit.close(pool)

        asyncio.run(main())
    else:
        pool = kit.open(pg, 1, 10.0)
        kept: list[Any] = []
        _abandon(kit, pool, kept, 1)
        _passes(3)
        kit.query(kept[0])
        kit.give(pool, kept[0])
        kit.close(pool)
    assert not reclaiming.of("leak.reclaimed"), reason


def _passes(count: int) -> None:
    for _ in range(count):
        pgleak.testing.run_watchdog()
