"""Helpers for tests that assert on pgleak's events: ours, the pytest plugin's, and yours.

::

    with pgleak.testing.capture_events() as events:
        leaky_code()
        events.wait_for("leak.collected")
    assert events.of("leak.collected")[0].checkout.site.endswith("app.py:42 in handler")
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Callable, Iterator

from pgleak._core import core
from pgleak._events import LeakEvent

__all__ = ["EventCapture", "capture_events", "run_watchdog"]


class EventCapture:
    """A sink that keeps every event and lets a test wait for one without sleeping."""

    def __init__(self) -> None:
        self.events: list[LeakEvent] = []
        self._cond = threading.Condition()

    def __call__(self, event: LeakEvent) -> None:
        with self._cond:
            self.events.append(event)
            self._cond.notify_all()

    def of(self, kind: str) -> list[LeakEvent]:
        """The events of one kind (``"leak.suspected"``, ...), in the order they came."""
        with self._cond:
            return [event for event in self.events if event.event == kind]

    def wait_until(
        self, predicate: Callable[[list[LeakEvent]], bool], timeout: float = 10.0
    ) -> list[LeakEvent]:
        """Wait until ``predicate(events so far)`` is true; return the events so far.

        Raises:
            AssertionError: it did not become true within ``timeout`` seconds.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while not predicate(list(self.events)):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    seen = [event.event for event in self.events]
                    raise AssertionError(f"condition not met within {timeout}s; events: {seen}")
                core.watchdog.wake()
                self._cond.wait(min(remaining, 0.05))
            return list(self.events)

    def wait_for(self, kind: str, count: int = 1, timeout: float = 10.0) -> list[LeakEvent]:
        """Wait until ``count`` events of ``kind`` have arrived; return them.

        Nudges the watchdog while waiting, so queued reports (collected connections, returned
        ones) are delivered now rather than on its next one-second pass. Waiting for
        ``leak.collected`` also runs the garbage collector at each poll: a dropped connection
        is often in a reference cycle (a SQLAlchemy connection that ran a query is), which
        only the collector frees.

        Raises:
            AssertionError: they did not arrive within ``timeout`` seconds.
        """

        def arrived(events: list[LeakEvent]) -> bool:
            if sum(e.event == kind for e in events) >= count:
                return True
            if kind == "leak.collected":
                gc.collect()
            return False

        try:
            self.wait_until(arrived, timeout)
        except AssertionError:
            seen = [event.event for event in self.events]
            raise AssertionError(
                f"expected {count} {kind} event(s) within {timeout}s, got {seen}"
            ) from None
        return self.of(kind)


@contextlib.contextmanager
def capture_events() -> Iterator[EventCapture]:
    """Collect every pgleak event emitted inside the block (pgleak must be installed)."""
    capture = EventCapture()
    core.sinks.append(capture)
    try:
        yield capture
    finally:
        if capture in core.sinks:
            core.sinks.remove(capture)


def run_watchdog(timeout: float = 5.0) -> None:
    """Block until the watchdog has made a full pass (queued reports delivered).

    Raises:
        AssertionError: the watchdog did not complete a pass within ``timeout`` seconds.
    """
    if core.watchdog.thread is None:
        core.watchdog.start()
    if not core.watchdog.wait_for_pass(timeout):
        raise AssertionError(f"pgleak's watchdog made no pass within {timeout}s")
