"""Turning events into log records people can read, and machines can parse.

Each record on logger ``pgleak`` has a readable multi-line message and the structured event in
``record.pgleak`` (see :meth:`LeakEvent.as_dict`), so a JSON log formatter can ship the fields
and a human can still read the line.

A leak usually leaks many times from one line. The logging sink therefore reports the first
event from a call site in full and only counts the repeats for ``report_interval`` seconds,
then logs one ``report.suppressed`` line with the count: a call site leaking 1,000 times gives
two records, not 1,000 stack dumps. Other sinks (tests, OpenTelemetry) get every event.
"""

from __future__ import annotations

import collections
import logging
import math
import threading
import time
from collections.abc import Callable

from pgleak._events import (
    AT_EXIT,
    COLLECTED,
    CONNECT_GAVE_UP,
    CONNECT_RETRY,
    EXHAUSTED,
    RECLAIMED,
    RETURNED,
    SUPPRESSED,
    SUSPECTED,
    Checkout,
    LeakEvent,
)

__all__ = ["LoggingSink", "format_event"]

LEVELS = {
    SUSPECTED: logging.WARNING,
    RETURNED: logging.INFO,
    COLLECTED: logging.ERROR,
    AT_EXIT: logging.ERROR,
    EXHAUSTED: logging.ERROR,
    RECLAIMED: logging.WARNING,
    CONNECT_RETRY: logging.WARNING,
    CONNECT_GAVE_UP: logging.ERROR,
}

#: Events about a pool as a whole, not a call site: throttled per pool (a storm of refused
#: connection attempts gives one full record per pool per interval, then a count).
_PER_POOL = frozenset({EXHAUSTED, CONNECT_RETRY, CONNECT_GAVE_UP})
#: From this many connections held in this process, a refused connection suggests a leak here.
_MANY_HELD = 10

_MAX_KEYS = 1024
_MAX_FULL_IDS = 10_000


def _seconds(value: float | None) -> str:
    if value is None or math.isnan(value):
        return "?"
    return f"{value:.1f}s" if value < 600 else f"{value / 60:.1f}min"


def _frames(title: str, frames: list[str] | None, indent: str = "  ") -> list[str]:
    if not frames:
        return []
    return [f"{indent}{title} (most recent call last):", *(f"{indent}  {f}" for f in frames)]


def _holder_lines(checkout: Checkout, indent: str) -> list[str]:
    lines = _frames("checked out at", checkout.stack, indent)
    if checkout.state:
        lines.append(f"{indent}the connection is {checkout.state}")
    if checkout.holder_stack is not None:
        lines += _frames("holder is now at", checkout.holder_stack, indent)
    elif checkout.holder_finished:
        # Only what is known: the connection object is still alive somewhere (or it would have
        # been collected), and other code could still give it back.
        taker = "task" if checkout.holder.startswith("task ") else "thread"
        lines.append(f"{indent}the {taker} that took it has ended")
    return lines


def _format_connect(event: LeakEvent) -> str:
    """``connect.retry`` / ``connect.gave_up``: what the server said, and what this process holds.

    The server is full either because it is too small or because someone holds connections
    they do not use. The count of connections held *here* tells the reader which, for this
    process: many held, or held past the threshold, points at a leak here.
    """
    x = dict(event.extra or {})
    attempt = x.get("attempt", "?")
    state = x.get("sqlstate") or "?"
    held = x.get("held")
    held_long = x.get("held_over_threshold") or 0
    said = f": {event.detail}" if event.detail else ""
    if event.event == CONNECT_RETRY:
        head = (
            f"connect.retry: server refused a connection for pool {event.pool} (SQLSTATE "
            f"{state}) on attempt {attempt}; retrying in {_seconds_ms(x.get('sleep_s'))}{said}"
        )
    else:
        why = {
            "deadline": "the retry deadline has passed",
            "max_attempts": "no attempts are left",
            "budget": "most recent connection attempts in this process failed (retry budget "
            "spent): failing fast",
        }.get(str(x.get("reason")), str(x.get("reason")))
        head = (
            f"connect.gave_up: server refused a connection for pool {event.pool} (SQLSTATE "
            f"{state}) {attempt} time(s) in {_seconds(x.get('elapsed_s'))}; {why}{said}"
        )
    if isinstance(held, int):
        over = f", {held_long} of them longer than the leak threshold" if held_long else ""
        line = f"  this process holds {held} checked-out connection(s){over}"
        if held_long or held >= _MANY_HELD:
            line += (
                "; a leak here may be why the server is full: see pgleak.checked_out() or the "
                "leak.suspected reports"
            )
        return f"{head}\n{line}"
    return head


def _seconds_ms(value: object) -> str:
    if not isinstance(value, (int, float)) or math.isnan(value):
        return "?"
    return f"{value * 1000:.0f}ms" if value < 1 else _seconds(float(value))


def format_event(event: LeakEvent) -> str:
    """The readable message: one summary line a log search can match, then the stacks."""
    if event.event in (CONNECT_RETRY, CONNECT_GAVE_UP):
        return _format_connect(event)
    c = event.checkout
    site = f", checked out at {c.site}" if c is not None and c.site else ""
    if event.event == SUSPECTED and c is not None:
        head = (
            f"leak.suspected: connection held {_seconds(c.held_s)} (threshold "
            f"{_seconds(event.threshold_s)}) by {c.holder} from pool {event.pool}{site}"
        )
    elif event.event == RETURNED and c is not None:
        return (
            f"leak.returned: connection #{c.checkout_id} reported earlier came back after "
            f"{_seconds(c.held_s)} (holder {c.holder}, pool {event.pool}){site}"
        )
    elif event.event == COLLECTED and c is not None:
        head = (
            f"leak.collected: connection garbage-collected without being returned, after "
            f"{_seconds(c.held_s)}, from pool {event.pool} (holder {c.holder}){site}"
        )
    elif event.event == AT_EXIT and c is not None:
        head = (
            f"leak.at_exit: connection still checked out at {event.detail or 'exit'}, held "
            f"{_seconds(c.held_s)} by {c.holder} from pool {event.pool}{site}"
        )
    elif event.event == RECLAIMED and c is not None:
        head = (
            f"leak.reclaimed: connection held {_seconds(c.held_s)} by {c.holder}, which has "
            f"ended, closed and given back to pool {event.pool} (reclaim=True){site}"
        )
    elif event.event == EXHAUSTED:
        waiter = event.waiter
        waited_s = waiter.held_s if waiter is not None else math.nan
        waited = (
            " (the pool does not wait)"
            if math.isnan(waited_s)
            else f" after waiting {_seconds(waited_s)}"
        )
        lost = (
            f" and {len(event.lost)} slot(s) lost to connections garbage-collected without "
            "being returned"
            if event.lost
            else ""
        )
        head = (
            f"pool.exhausted: no connection available from pool {event.pool}{waited}; "
            f"{len(event.holders)} connection(s) held{lost}, oldest first:"
        )
        lines = [head]
        for n, holder in enumerate(event.holders, 1):
            lines.append(
                f"  #{n} held {_seconds(holder.held_s)} by {holder.holder} "
                f"(checkout #{holder.checkout_id}), checked out at {holder.site or '?'}"
            )
            lines += _holder_lines(holder, "    ")
        for n, gone in enumerate(event.lost, len(event.holders) + 1):
            lines.append(
                f"  #{n} lost: garbage-collected after {_seconds(gone.held_s)} without being "
                f"returned, its slot never given back (holder {gone.holder}, checkout "
                f"#{gone.checkout_id}), checked out at {gone.site or '?'}"
            )
            lines += _frames("checked out at", gone.stack, "    ")
        if waiter is not None:
            lines += _frames(f"the checkout that failed ({waiter.holder})", waiter.stack)
        if event.detail:
            lines.append(f"  pool said: {event.detail}")
        return "\n".join(lines)
    else:  # pragma: no cover - future event kinds
        head = f"{event.event}: pool {event.pool}"
    lines = [f"{head} [checkout #{c.checkout_id}]" if c else head]
    if c is not None:
        lines += _holder_lines(c, "  ")
    return "\n".join(lines)


class _Window:
    __slots__ = ("count", "pool", "site", "start")

    def __init__(self, start: float, pool: str, site: str) -> None:
        self.start = start
        self.count = 0
        self.pool = pool
        self.site = site


class LoggingSink:
    """Sends events to ``logging``, at most one full report per call site per interval."""

    def __init__(
        self,
        logger: logging.Logger | None = None,
        interval: Callable[[], float] = lambda: 60.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.logger = logger or logging.getLogger("pgleak")
        self._interval = interval
        self._clock = clock
        self._windows: collections.OrderedDict[tuple[str, str, str], _Window] = (
            collections.OrderedDict()
        )
        self._full_ids: collections.OrderedDict[int, None] = collections.OrderedDict()
        self._lock = threading.Lock()

    def __call__(self, event: LeakEvent) -> None:
        c = event.checkout
        if event.event == RETURNED and c is not None:
            with self._lock:
                followup = self._full_ids.pop(c.checkout_id, 0) is None
            if followup:
                self._log(event)
                return
        site = (
            (c.site if c is not None else None)
            or (event.waiter.site if event.waiter is not None else None)
            or "?"
        )
        if event.event in (CONNECT_RETRY, CONNECT_GAVE_UP):
            site = ""  # no call site: the summary line names the pool only
        key = (event.event, event.pool, site if event.event not in _PER_POOL else "")
        now = self._clock()
        with self._lock:
            window = self._windows.get(key)
            if window is not None and now - window.start < self._interval():
                window.count += 1
                return
            if event.event == RETURNED:
                # Its leak.suspected was one of the counted repeats: count the return too.
                if window is None:
                    self._windows[key] = window = _Window(now, event.pool, site)
                window.count += 1
                return
            stale = self._windows.pop(key, None)
            self._windows[key] = _Window(now, event.pool, site)
            while len(self._windows) > _MAX_KEYS:
                self._windows.popitem(last=False)
            if c is not None and event.event == SUSPECTED:
                self._full_ids[c.checkout_id] = None
                while len(self._full_ids) > _MAX_FULL_IDS:
                    self._full_ids.popitem(last=False)
        if stale is not None and stale.count:
            self._summary(key[0], stale)
        self._log(event)

    def flush(self, force: bool = False) -> None:
        """Log the counts of windows that have ended (all of them if ``force``)."""
        now = self._clock()
        ended: list[tuple[str, _Window]] = []
        with self._lock:
            for key, window in list(self._windows.items()):
                if force or now - window.start >= self._interval():
                    del self._windows[key]
                    if window.count:
                        ended.append((key[0], window))
        for kind, window in ended:
            self._summary(kind, window)

    def _summary(self, kind: str, window: _Window) -> None:
        elapsed = max(0.0, self._clock() - window.start)
        where = f" at {window.site}" if window.site else ""
        self.logger.log(
            logging.WARNING,
            "%s",
            f"report.suppressed: {window.count} more {kind} from pool {window.pool}{where} in "
            f"the last {_seconds(elapsed)} (first one reported in full above)",
            extra={
                "pgleak": {
                    "event": SUPPRESSED,
                    "of": kind,
                    "count": window.count,
                    "pool": window.pool,
                    "site": window.site,
                    "held_s": None,
                    "holder": None,
                    "stack": [window.site] if window.site else [],
                }
            },
        )

    def _log(self, event: LeakEvent) -> None:
        level = LEVELS.get(event.event, logging.WARNING)
        if self.logger.isEnabledFor(level):
            self.logger.log(level, "%s", format_event(event), extra={"pgleak": event.as_dict()})
