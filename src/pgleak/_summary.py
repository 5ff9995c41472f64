"""The leak summary by call site: which lines leak, how often, and for how long in all.

Individual reports say what happened to one connection; after a week in production the
question is "which five lines should we fix first?". This sink sees every event (the logging
sink's throttling does not apply to it) and keeps, per (call site, pool), the count of each
event kind, the total and the longest time held, and when the site was first and last seen.
:func:`pgleak.summary` returns it, worst first; it is logged as one compact ``leak.summary``
record every ``summary_interval`` seconds when something happened since the last one, and at
exit or ``uninstall()``.

Memory is bounded: at most :data:`MAX_SITES` sites (later ones are counted under one
"(other call sites)" entry per pool) and :data:`MAX_IDS` checkouts remembered for their
longest hold, so that a checkout reported several times (suspected, then collected) counts its
hold once.
"""

from __future__ import annotations

import collections
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from pgleak._events import AT_EXIT, COLLECTED, EXHAUSTED, RETURNED, SUSPECTED, LeakEvent

__all__ = ["SUMMARY", "SiteSummary"]

SUMMARY = "leak.summary"
#: The event kinds that say a checkout leaked (held too long, never returned, lost).
LEAK_KINDS = (SUSPECTED, COLLECTED, AT_EXIT)
#: What the summary counts per site (``pool.exhausted``: the site held a connection when its
#: pool ran dry).
COUNTED = (SUSPECTED, RETURNED, COLLECTED, AT_EXIT, EXHAUSTED)
MAX_SITES = 1000
MAX_IDS = 10_000
#: The sites a logged summary lists in full (the rest are counted in one line).
LOGGED_SITES = 20
OTHER_SITES = "(other call sites)"


class _Site:
    __slots__ = ("counts", "first_seen", "held_max_s", "held_total_s", "last_seen", "pool", "site")

    def __init__(self, site: str, pool: str, now: float) -> None:
        self.site = site
        self.pool = pool
        self.counts: dict[str, int] = dict.fromkeys(COUNTED, 0)
        self.held_total_s = 0.0
        self.held_max_s = 0.0
        self.first_seen = now
        self.last_seen = now

    @property
    def leaks(self) -> int:
        return sum(self.counts[kind] for kind in LEAK_KINDS)

    def as_dict(self) -> dict[str, Any]:
        return {
            "site": self.site,
            "pool": self.pool,
            "leaks": self.leaks,
            "counts": {kind: n for kind, n in self.counts.items() if n},
            "held_total_s": round(self.held_total_s, 3),
            "held_max_s": round(self.held_max_s, 3),
            "first_seen": round(self.first_seen, 3),
            "last_seen": round(self.last_seen, 3),
        }


class SiteSummary:
    """A sink that aggregates events by call site, and logs the aggregate now and then."""

    def __init__(
        self,
        interval: Callable[[], float],
        logger: logging.Logger | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self.logger = logger or logging.getLogger("pgleak")
        self._interval = interval
        self._clock = clock
        self._wall = wall
        self._sites: dict[tuple[str, str], _Site] = {}
        #: checkout id -> the longest hold already added to its site's total.
        self._held: collections.OrderedDict[int, float] = collections.OrderedDict()
        self._lock = threading.Lock()
        self._changed = False
        self._last_logged = clock()

    # -- the sink ----------------------------------------------------------------------------

    def __call__(self, event: LeakEvent) -> None:
        if event.event == EXHAUSTED:
            for holder in event.holders:
                self._count(EXHAUSTED, holder.site, event.pool, None, None)
            return
        c = event.checkout
        if c is None or event.event not in COUNTED:
            return
        self._count(event.event, c.site, event.pool, c.checkout_id, c.held_s)

    def _count(
        self, kind: str, site: str | None, pool: str, checkout_id: int | None, held: float | None
    ) -> None:
        now = self._wall()
        with self._lock:
            key = (site or "?", pool)
            entry = self._sites.get(key)
            if entry is None:
                if len(self._sites) >= MAX_SITES:
                    key = (OTHER_SITES, pool)
                    entry = self._sites.get(key)
                if entry is None:
                    entry = self._sites[key] = _Site(key[0], pool, now)
            entry.counts[kind] += 1
            entry.last_seen = now
            if held is not None and checkout_id is not None:
                before = self._held.pop(checkout_id, 0.0)
                if held > before:
                    entry.held_total_s += held - before
                    entry.held_max_s = max(entry.held_max_s, held)
                self._held[checkout_id] = max(held, before)
                while len(self._held) > MAX_IDS:
                    self._held.popitem(last=False)
            if kind != RETURNED:  # a follow-up alone is no news worth a summary
                self._changed = True

    # -- reading and logging -----------------------------------------------------------------

    def sites(self) -> list[dict[str, Any]]:
        """Every site seen, worst first: most leaks, then longest held in all."""
        with self._lock:
            entries = sorted(
                self._sites.values(), key=lambda e: (e.leaks, e.held_total_s), reverse=True
            )
            return [entry.as_dict() for entry in entries]

    def clear(self) -> None:
        with self._lock:
            self._sites.clear()
            self._held.clear()
            self._changed = False

    def flush(self, force: bool = False) -> None:
        """Log the summary if something happened since the last one and the interval is up
        (``force``: at exit or uninstall, whatever the interval)."""
        now = self._clock()
        with self._lock:
            if not self._changed:
                return
            if not force and now - self._last_logged < self._interval():
                return
            self._changed = False
            self._last_logged = now
        sites = self.sites()
        if sites:
            self._log(sites)

    def _log(self, sites: list[dict[str, Any]]) -> None:
        leaks = sum(site["leaks"] for site in sites)
        leaking = [site for site in sites if site["leaks"]]
        lines = [
            f"leak.summary: {leaks} leak report(s) from {len(leaking)} call site(s) "
            f"({len(sites)} seen), worst first:"
        ]
        for site in sites[:LOGGED_SITES]:
            counts = ", ".join(f"{n} {kind}" for kind, n in site["counts"].items())
            lines.append(
                f"  {site['site']} (pool {site['pool']}): {counts}; held "
                f"{site['held_total_s']:.1f}s in all, {site['held_max_s']:.1f}s at most"
            )
        if len(sites) > LOGGED_SITES:
            lines.append(f"  ... and {len(sites) - LOGGED_SITES} more call site(s)")
        level = logging.WARNING if leaks else logging.INFO
        self.logger.log(
            level,
            "%s",
            "\n".join(lines),
            extra={
                "pgleak": {
                    "event": SUMMARY,
                    "leaks": leaks,
                    "sites": sites,
                    "pool": None,
                    "held_s": None,
                    "holder": None,
                    "stack": [],
                }
            },
        )
