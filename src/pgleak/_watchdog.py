"""One daemon thread per process that turns deadlines into reports.

A thread, not an asyncio task: the most common leak in async code is a coroutine that blocks
its own event loop while holding a connection, and a watchdog living on that loop would be
blocked with it. One thread for the whole process, never a timer per checkout: checkouts pay
nothing to schedule, the thread sleeps until the nearest deadline, and it wakes at least once a
second to pick up what finalizers queued (they may not wake it themselves: a weakref callback
can fire while this very thread holds the wake-up event's lock).

The loop cannot die: each pass is wrapped, a failure is logged on ``pgleak.watchdog`` and the
loop goes on.
"""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable

__all__ = ["Watchdog"]

_log = logging.getLogger("pgleak.watchdog")

#: Longest sleep between passes: the latency of "collected" reports and of settings changes.
MAX_SLEEP = 1.0


class Watchdog:
    # As Core's: its attributes stay in ``__dict__`` on 3.13, where the C ledger watches them.
    __slots__ = ("__dict__", "__weakref__", "_in_dict")

    def __init__(self, tick: Callable[[], float]) -> None:
        self._tick = tick
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._stopping = False
        self.thread: threading.Thread | None = None
        self._failures = 0
        #: Completed passes; tests wait on it instead of sleeping.
        self.passes = 0
        self._passed = threading.Condition()

    def start(self) -> None:
        with self._lock:
            if self.thread is not None:
                return
            self._stopping = False
            thread = threading.Thread(target=self._run, name="pgleak-watchdog", daemon=True)
            self.thread = thread
        thread.start()

    def wake(self) -> None:
        """Run a pass now (settings changed, a test wants the queue drained)."""
        self._wake.set()

    def stop(self, timeout: float = 2.0) -> None:
        with self._lock:
            thread, self.thread = self.thread, None
            self._stopping = True
        self._wake.set()
        if thread is not None and thread is not threading.current_thread() and thread.is_alive():
            thread.join(timeout)

    def reset_after_fork(self) -> None:
        # The parent's thread does not exist in the child, and its locks may be held by it.
        self._wake = threading.Event()
        self._lock = threading.Lock()
        self._passed = threading.Condition()
        self._stopping = False
        self.thread = None

    def wait_for_pass(self, timeout: float) -> bool:
        """Block until a pass that started after this call has completed. For tests."""
        with self._passed:
            target = self.passes + 2
            self._wake.set()
            return self._passed.wait_for(lambda: self.passes >= target, timeout)

    def _run(self) -> None:
        while not self._stopping:
            self._wake.clear()
            try:
                delay = self._tick()
            except Exception as exc:
                delay = MAX_SLEEP
                self._failures += 1
                if self._failures <= 3:
                    with contextlib.suppress(Exception):
                        _log.error(
                            "pgleak watchdog pass failed (it carries on): %s: %s",
                            type(exc).__name__,
                            exc,
                            exc_info=True,
                        )
            with self._passed:
                self.passes += 1
                self._passed.notify_all()
            if self._stopping:
                break
            self._wake.wait(max(0.0, min(delay, MAX_SLEEP)))
