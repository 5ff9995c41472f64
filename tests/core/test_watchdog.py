"""The watchdog thread cannot die, and passes can be awaited instead of slept for."""

from __future__ import annotations

import threading

import pytest

from pgleak._watchdog import Watchdog


def test_a_failing_pass_is_logged_and_the_loop_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    calls: list[int] = []
    ok = threading.Event()

    def tick() -> float:
        calls.append(1)
        if len(calls) <= 2:
            raise RuntimeError("bad pass")
        ok.set()
        return 0.01

    watchdog = Watchdog(tick)
    watchdog.start()
    try:
        assert ok.wait(10)
        assert watchdog.thread is not None
        assert watchdog.thread.is_alive()
    finally:
        watchdog.stop()
    errors = [r for r in caplog.records if r.name == "pgleak.watchdog"]
    assert len(errors) == 2
    assert "bad pass" in errors[0].getMessage()


def test_wait_for_pass_returns_after_a_full_pass() -> None:
    passes: list[int] = []

    def tick() -> float:
        passes.append(1)
        return 30.0

    watchdog = Watchdog(tick)
    watchdog.start()
    try:
        before = len(passes)
        assert watchdog.wait_for_pass(10)
        assert len(passes) > before
    finally:
        watchdog.stop()
    assert watchdog.thread is None


def test_stop_is_idempotent_and_restart_works() -> None:
    ran = threading.Event()

    def tick() -> float:
        ran.set()
        return 30.0

    watchdog = Watchdog(tick)
    watchdog.stop()
    watchdog.start()
    assert ran.wait(10)
    watchdog.stop()
    watchdog.stop()
    ran.clear()
    watchdog.start()
    assert ran.wait(10)
    watchdog.stop()
