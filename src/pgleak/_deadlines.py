"""Which leases are due, found without looking at every lease on every watchdog pass.

The watchdog passes at least once a second. Reading every lease on each pass cost O(held):
with 10,000 connections out (a large service, or one leaking hard) that was about 1% of a core
spent finding nothing due. So the watchdog keeps a heap of ``(deadline, lease id)`` of its own
and, per pass, only files the leases checked out since the previous pass and pops those due:
O(new + due), and a pass over an unchanged ledger of 10,000 costs one copy of its keys.

Nothing on the hot path pays for this. New leases are found from the ledger itself: it is a
dict, a new key always goes in at the end, so walking its keys backwards from the end, the
first key already filed is where the previous pass stopped (everything before it was there
then, and was filed then). Lease ids are not compared for this: two threads can insert theirs
out of the order they drew them in.

A deadline only moves later after checkout (``allow_long_hold``), which the heap sees when it
pops the old one; the one exception, an allowance that ends before the time it granted, calls
:meth:`Deadlines.refile`. The heap holds ids, never leases, so a lease returned long before its
deadline is not kept alive by it; entries of leases gone from the ledger are dropped when they
pop, or all at once when they outnumber the live ones (so memory stays proportional to what is
held).

Everything here runs on the watchdog's thread, except :meth:`refile`, whose deque append is
atomic.
"""

from __future__ import annotations

import collections
import heapq
import math
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from pgleak._core import Lease

__all__ = ["Deadlines"]

#: Entries of leases no longer held tolerated beyond twice the held ones before a rebuild.
_SLACK = 1024


class Deadlines:
    """The watchdog's index of one ledger (``{lease id: Lease}``) by deadline."""

    def __init__(self, leases: dict[int, Lease]) -> None:
        self._leases = leases
        self._heap: list[tuple[float, int]] = []
        #: Ids filed (in the heap, or flagged and watched); a superset of the ledger's keys.
        self._known: set[int] = set()
        #: Flagged leases whose ``close()`` no hook sees: asked every pass whether it happened.
        self.unseen: dict[int, Lease] = {}
        self._refiled: collections.deque[tuple[float, int]] = collections.deque()

    def clear(self) -> None:
        """Forget everything (the ledger was emptied: uninstall, or a forked child)."""
        self._heap = []
        self._known = set()
        self.unseen = {}
        self._refiled.clear()

    def refile(self, lease: Lease) -> None:
        """``lease``'s deadline moved earlier than the one filed (an allowance ended early)."""
        self._refiled.append((lease.deadline, lease.id))

    def due(self, now: float) -> list[Lease]:
        """The leases whose deadline has passed and that the watchdog has not flagged, oldest
        deadline first; they are no longer filed (the caller flags or checks each in)."""
        leases = self._leases
        heap = self._heap
        known = self._known
        keys = list(leases)  # one atomic copy; the ledger changes under us
        for index in range(len(keys) - 1, -1, -1):
            key = keys[index]
            if key in known:
                break
            lease = leases.get(key)
            if lease is None:
                continue
            known.add(key)
            if lease.deadline < math.inf:
                heapq.heappush(heap, (lease.deadline, key))
        refiled = self._refiled
        while refiled:
            heapq.heappush(heap, refiled.popleft())
        due: list[Lease] = []
        while heap and heap[0][0] <= now:
            _, key = heapq.heappop(heap)
            lease = leases.get(key)
            if lease is None:
                known.discard(key)  # returned or reported: ids are never reused
            elif lease.flagged:
                pass  # a refiled duplicate, or reported elsewhere (pool close)
            elif lease.deadline > now:
                heapq.heappush(heap, (lease.deadline, key))  # extended since it was filed
            else:
                due.append(lease)
        if len(heap) > 2 * len(leases) + _SLACK or len(known) > 2 * len(leases) + _SLACK:
            self._rebuild()
        return due

    def next_deadline(self) -> float:
        """The earliest deadline filed (perhaps a lease returned since: an early wake-up)."""
        heap = self._heap
        return heap[0][0] if heap else math.inf

    def _rebuild(self) -> None:
        held = list(self._leases.items())
        self._known = {key for key, _ in held}
        self._heap = [
            (lease.deadline, key)
            for key, lease in held
            if not lease.flagged and lease.deadline < math.inf
        ]
        heapq.heapify(self._heap)
        self.unseen = {key: lease for key, lease in held if key in self.unseen}
