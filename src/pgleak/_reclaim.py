"""Opt-in reclaim of abandoned connections: given back to a pool that needs them.

HikariCP refuses to do this, and rightly by default: a connection taken away from code that
still means to use it breaks that code in a way worse than the leak. Tomcat's
``removeAbandoned`` and c3p0's ``unreturnedConnectionTimeout`` offer it anyway, because a
process whose pool has run dry on leaked connections is down, and a restart is the alternative.
pgleak offers it under three conditions, all of which must hold (``reclaim=True``):

* the holder has provably finished: the thread that took the connection has ended, or the
  asyncio task is done. A live holder's connection is never touched, however old;
* the checkout is older than ``reclaim_after``;
* the pool is under pressure: callers are waiting, or at least ``reclaim_when_used`` of its
  connections are out.

The connection is then closed and its slot given back through the library's own API (the
adapter's ``PoolKind.reclaim``), so the pool's counts stay right and it can open a new one; a
``leak.reclaimed`` event names the line that took it. The adapter calls ``announce()`` (which
reports it and takes the checkout out of the ledger) just before it gives the connection back,
and only if it can: the checkin that the give-back causes is then no ``leak.returned``. It
runs on the watchdog thread; the asyncio libraries' part runs on the pool's event loop (handed
over thread-safely).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import math
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from pgleak._events import RECLAIMED
from pgleak._guard import internal_error

if TYPE_CHECKING:
    from pgleak._core import Core, Lease, PoolHandle, PoolKind

__all__ = ["RECLAIMED", "holder_finished", "on_loop", "sweep"]

#: How often the watchdog looks for abandoned connections while reclaim is on, at the least
#: (seconds): waiting callers have a timeout of their own.
CHECK_EVERY = 1.0


def on_loop(
    loop: Any, give_back: Callable[[], Awaitable[object]], site: str, announce: Callable[[], None]
) -> None:
    """Run an asyncio library's give-back on the pool's own loop, from the watchdog thread.

    ``announce`` (the ``leak.reclaimed`` report) runs first, and only if there is a loop to run
    it on. Not waited for: the loop may be busy, and the watchdog must not block on it. A
    failure is pgleak's (logged once), never the application's.
    """
    if loop is None or loop.is_closed():
        return
    announce()

    def done(future: concurrent.futures.Future[object]) -> None:
        exc = future.exception()
        if exc is not None:
            internal_error(site, exc)

    asyncio.run_coroutine_threadsafe(_call(give_back), loop).add_done_callback(done)


async def _call(give_back: Callable[[], Awaitable[object]]) -> object:
    return await give_back()


def _announce(core: Core, lease: Lease, now: float, announced: list[bool]) -> None:
    announced.append(True)
    core.reclaimed(lease, now)


def holder_finished(lease: Lease) -> bool:
    """The thread or task that took the connection has ended (not merely gone quiet)."""
    if lease.task is not None:
        task = lease.task[0]()
        return task is None or task.done()
    thread = lease.thread[2]()
    return thread is None or not thread.is_alive()


def _under_pressure(core: Core, handle: PoolHandle, pool: Any, kind: PoolKind, freed: int) -> bool:
    """Whether the pool still needs slots, counting the ``freed`` ones given back this pass
    as free already: an asyncio pool takes them back on its loop, a moment later. (A sync
    pool's count has them back at once, so there they count twice: reclaim errs on the side of
    taking fewer, and the next pass, a second later, goes on.)"""
    fraction = core.settings.reclaim_when_used
    stats = kind.stats(pool) if kind.stats is not None else None
    if stats is None:
        return False  # closed, or nothing known: no reclaim on a guess
    if max(stats.waiting or 0, len(handle.pending)) > freed:
        return True
    if not stats.max:
        return False
    used = stats.used
    if used is None:
        used = sum(1 for lease in list(core.leases.values()) if lease.pool is handle)
    return used - freed >= math.ceil(fraction * stats.max)


def sweep(core: Core, now: float) -> None:
    """Reclaim what may be reclaimed; called by the watchdog when ``reclaim`` is on."""
    after = core.settings.reclaim_after
    by_pool: dict[int, list[Lease]] = {}
    for lease in list(core.leases.values()):
        if lease.deadline == math.inf or now - lease.t0 < after or lease.ref is None:
            continue  # a pool's own shortcut, too young, or nothing to give back
        if holder_finished(lease):
            by_pool.setdefault(id(lease.pool), []).append(lease)
    for leases in by_pool.values():
        handle = leases[0].pool
        pool = handle.ref()
        kind = core.kinds.get(handle.kind)
        if pool is None or kind is None or kind.reclaim is None:
            continue
        give_back = kind.reclaim(pool)
        if give_back is None:
            continue  # this pool cannot be reclaimed from safely
        freed = 0
        for lease in sorted(leases, key=lambda lease: lease.t0):
            try:
                if not _under_pressure(core, handle, pool, kind, freed):
                    break
                conn = lease.ref() if lease.ref is not None else None
                if conn is None or lease.id not in core.leases:
                    continue  # collected, or came back meanwhile
                announced: list[bool] = []
                give_back(conn, functools.partial(_announce, core, lease, now, announced))
                freed += len(announced)
            except Exception as exc:
                internal_error(f"{handle.kind}.reclaim", exc)
