"""The retry core: classification, backoff, deadline, attempts, budget, events.

Real servers produce these errors in ``tests/integrations/test_retry_real.py``; here the
exceptions are plain objects carrying the texts and codes drivers give, and the clock, sleep
and random source are fakes, because timing is what is under test.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator
from typing import Any

import pytest

import pgleak
from pgleak import _retry
from pgleak._events import CONNECT_GAVE_UP, CONNECT_RETRY, LeakEvent
from pgleak._report import LoggingSink, format_event
from pgleak._retry import RetryBudget, backoff, classify, retry_connect
from pgleak.testing import EventCapture, capture_events


class DriverError(Exception):
    """Shaped like psycopg's and asyncpg's errors: a message and maybe a ``sqlstate``."""

    def __init__(self, message: str, sqlstate: str | None = None) -> None:
        super().__init__(message)
        self.sqlstate = sqlstate


class Psycopg2Error(Exception):
    def __init__(self, message: str, pgcode: str | None = None) -> None:
        super().__init__(message)
        self.pgcode = pgcode


class Wrapped(Exception):
    """Shaped like SQLAlchemy's ``DBAPIError``: the driver's error as ``.orig``."""

    def __init__(self, orig: BaseException) -> None:
        super().__init__(f"(wrapped) {orig}")
        self.orig = orig


_LIBPQ = 'connection to server at "127.0.0.1", port 5432 failed: FATAL:  '


@pytest.mark.parametrize(
    ("message", "sqlstate", "expected"),
    [
        (_LIBPQ + "sorry, too many clients already", None, "53300"),
        (_LIBPQ + 'too many connections for role "app"', None, "53300"),
        (_LIBPQ + 'too many connections for database "shop"', None, "53300"),
        (
            _LIBPQ + "remaining connection slots are reserved for non-replication superuser "
            "connections",
            None,
            "53300",
        ),
        # PG16+ wordings
        (
            _LIBPQ + "remaining connection slots are reserved for roles with the SUPERUSER "
            "attribute",
            None,
            "53300",
        ),
        (
            _LIBPQ + "remaining connection slots are reserved for roles with privileges of the "
            '"pg_use_reserved_connections" role',
            None,
            "53300",
        ),
        (_LIBPQ + "the database system is starting up", None, "57P03"),
        (_LIBPQ + "the database system is not yet accepting connections", None, "57P03"),
        (_LIBPQ + "the database system is shutting down", None, "57P03"),
        # asyncpg gives the code
        ("sorry, too many clients already", "53300", "53300"),
        ("the database system is starting up", "57P03", "57P03"),
        ("anything at all", "53300", "53300"),
        # PgBouncer: 08P01 only together with its limit texts
        ("no more connections allowed (max_client_conn)", "08P01", "08P01"),
        ("client connections exceeded (max_db_client_connections)", "08P01", "08P01"),
        (_LIBPQ + "ERROR:  no more connections allowed (max_client_conn)", None, "08P01"),
        ("invalid message format", "08P01", None),
        # not retryable
        (_LIBPQ + 'password authentication failed for user "app"', None, None),
        (_LIBPQ + 'database "nope" does not exist', None, None),
        ('database "nope" does not exist', "3D000", None),
        # an explicit code wins over a text that looks retryable
        ("sorry, too many clients already", "28P01", None),
        ("connection refused", None, None),
    ],
)
def test_classify_table(message: str, sqlstate: str | None, expected: str | None) -> None:
    assert classify(DriverError(message, sqlstate)) == expected


def test_classify_reads_psycopg2_pgcode_and_text() -> None:
    assert classify(Psycopg2Error("FATAL:  sorry, too many clients already\n")) == "53300"
    assert classify(Psycopg2Error("whatever", pgcode="57P03")) == "57P03"


def test_classify_walks_orig_cause_and_context() -> None:
    inner = DriverError("x", "53300")
    assert classify(Wrapped(inner)) == "53300"  # SQLAlchemy's .orig
    caused = RuntimeError("pool said no")
    caused.__cause__ = inner
    assert classify(caused) == "53300"  # __cause__
    contexted = KeyError("k")
    contexted.__context__ = DriverError(_LIBPQ + "sorry, too many clients already")
    assert classify(contexted) == "53300"  # __context__


def test_classify_survives_cycles_and_ignores_base_exceptions() -> None:
    a, b = DriverError("a"), DriverError("b")
    a.__context__, b.__context__ = b, a
    assert classify(a) is None
    assert classify(KeyboardInterrupt("sorry, too many clients already")) is None


def test_full_jitter_bounds() -> None:
    # rand -> 1.0 gives the ceiling: base * 2**n, capped
    assert [backoff(n, 0.05, 2.0, lambda: 1.0) for n in range(7)] == [
        0.05,
        0.1,
        0.2,
        0.4,
        0.8,
        1.6,
        2.0,
    ]
    assert backoff(3, 0.05, 2.0, lambda: 0.0) == 0.0
    assert backoff(3, 0.05, 2.0, lambda: 0.5) == pytest.approx(0.2)
    assert backoff(10_000, 0.05, 2.0, lambda: 0.999) == pytest.approx(1.998)


def _no_sleep(seconds: float) -> None:
    raise AssertionError(f"slept {seconds}s: nothing should have been retried")


class FakeTime:
    """A clock that only moves when the code under test sleeps."""

    def __init__(self) -> None:
        self.now = 100.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


class Refusing:
    """``connect`` that is refused ``failures`` times, then returns a connection."""

    def __init__(self, failures: int, error: BaseException | None = None) -> None:
        self.failures = failures
        self.calls = 0
        self.error = error or DriverError(_LIBPQ + "sorry, too many clients already")

    def __call__(self) -> str:
        self.calls += 1
        if self.calls <= self.failures:
            raise self.error
        return "conn"


@pytest.fixture
def retrying() -> Iterator[EventCapture]:
    settings = {
        "retry_deadline": 10.0,
        "retry_max_attempts": 8,
        "retry_base_delay": 0.05,
        "retry_max_delay": 2.0,
        "retry_budget": 100.0,
        "integrations": (),
    }
    pgleak.install(**settings)
    try:
        with capture_events() as events:
            yield events
    finally:
        pgleak.uninstall()


def test_retries_then_succeeds_with_events(retrying: EventCapture) -> None:
    t = FakeTime()
    connect = Refusing(3)
    result = retry_connect(connect, pool="p", sleep=t.sleep, clock=t.clock, rand=lambda: 1.0)
    assert result == "conn"
    assert connect.calls == 4
    assert t.sleeps == [0.05, 0.1, 0.2]
    retries = retrying.of(CONNECT_RETRY)
    assert [e.as_dict()["attempt"] for e in retries] == [1, 2, 3]
    first = retries[0].as_dict()
    assert first["sqlstate"] == "53300"
    assert first["sleep_s"] == 0.05
    assert first["held"] == 0
    assert first["elapsed_s"] == 0.0
    assert first["reason"] is None
    assert first["pool"] == "p"
    assert "too many clients" in first["detail"]
    assert not retrying.of(CONNECT_GAVE_UP)


def test_gives_up_after_max_attempts_with_the_same_exception(retrying: EventCapture) -> None:
    pgleak.install(retry_max_attempts=3, integrations=())
    t = FakeTime()
    connect = Refusing(99)
    with pytest.raises(DriverError) as raised:
        retry_connect(connect, pool="p", sleep=t.sleep, clock=t.clock, rand=lambda: 1.0)
    assert raised.value is connect.error
    assert connect.calls == 3
    (gave_up,) = retrying.of(CONNECT_GAVE_UP)
    assert gave_up.as_dict()["reason"] == "max_attempts"
    assert gave_up.as_dict()["attempt"] == 3
    assert gave_up.as_dict()["sleep_s"] is None


def test_deadline_cuts_the_last_sleep_and_gives_up(retrying: EventCapture) -> None:
    pgleak.install(
        retry_deadline=1.0, retry_max_attempts=100, retry_base_delay=0.05, integrations=()
    )
    t = FakeTime()
    connect = Refusing(99)
    with pytest.raises(DriverError):
        retry_connect(connect, pool="p", sleep=t.sleep, clock=t.clock, rand=lambda: 1.0)
    # 0.05 + 0.1 + 0.2 + 0.4 = 0.75, then 0.8 is cut to the 0.25 left: one last attempt at 1.0
    assert t.sleeps == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.25])
    assert t.now == pytest.approx(101.0)
    (gave_up,) = retrying.of(CONNECT_GAVE_UP)
    assert gave_up.as_dict()["reason"] == "deadline"
    assert gave_up.as_dict()["elapsed_s"] == pytest.approx(1.0)


def test_a_shorter_per_call_deadline_applies(retrying: EventCapture) -> None:
    t = FakeTime()
    with pytest.raises(DriverError):
        retry_connect(
            Refusing(99), pool="p", sleep=t.sleep, clock=t.clock, rand=lambda: 1.0, deadline=0.1
        )
    assert sum(t.sleeps) == pytest.approx(0.1)


def test_not_retryable_fails_at_once_unchanged(retrying: EventCapture) -> None:
    error = DriverError(_LIBPQ + 'database "nope" does not exist')
    connect = Refusing(1, error)
    with pytest.raises(DriverError) as raised:
        retry_connect(connect, pool="p", sleep=_no_sleep)
    assert raised.value is error
    assert connect.calls == 1
    assert retrying.events == []


def test_disabled_or_switched_off_calls_once() -> None:
    connect = Refusing(1)
    with pytest.raises(DriverError):  # not installed: pgleak is disabled
        retry_connect(connect, pool="p", sleep=_no_sleep)
    pgleak.install(retry_connect=False, integrations=())
    try:
        connect = Refusing(1)
        with pytest.raises(DriverError):
            retry_connect(connect, pool="p", sleep=_no_sleep)
        assert connect.calls == 1
    finally:
        pgleak.uninstall()


def test_budget_spends_refills_and_refuses_below_half() -> None:
    budget = RetryBudget()
    assert budget.tokens(10) == 10
    for _ in range(4):
        budget.failed(10)
    assert budget.tokens(10) == 6
    assert budget.allows(10)
    budget.failed(10)
    assert budget.tokens(10) == 5
    assert not budget.allows(10)  # at half: no retries
    budget.succeeded(10, 0.5)
    assert budget.allows(10)
    for _ in range(100):
        budget.succeeded(10, 1.0)
    assert budget.tokens(10) == 10  # never above the maximum
    for _ in range(100):
        budget.failed(10)
    assert budget.tokens(10) == 0  # never below zero
    budget.reset()
    assert budget.tokens(10) == 10


def test_budget_is_thread_safe() -> None:
    budget = RetryBudget()
    start = threading.Barrier(8)

    def spend() -> None:
        start.wait()
        for _ in range(1000):
            budget.failed(100_000)

    threads = [threading.Thread(target=spend) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert budget.tokens(100_000) == 100_000 - 8000


def test_spent_budget_fails_fast(retrying: EventCapture) -> None:
    pgleak.install(retry_budget=4, integrations=())
    t = FakeTime()
    first = Refusing(99)
    with pytest.raises(DriverError):
        retry_connect(first, pool="p", sleep=t.sleep, clock=t.clock, rand=lambda: 1.0)
    assert first.calls == 2  # 4 -> 3 (retry) -> 2 (at half: give up)
    second = Refusing(99)
    with pytest.raises(DriverError):
        retry_connect(second, pool="p", sleep=_no_sleep, clock=t.clock)
    assert second.calls == 1  # no retry at all
    reasons = [e.as_dict()["reason"] for e in retrying.of(CONNECT_GAVE_UP)]
    assert reasons == ["budget", "budget"]
    # successes refill it
    for _ in range(3):
        assert retry_connect(Refusing(0), pool="p") == "conn"
    third = Refusing(1)
    assert retry_connect(third, pool="p", sleep=t.sleep, clock=t.clock) == "conn"


def test_uninstall_refills_the_budget(retrying: EventCapture) -> None:
    for _ in range(80):
        _retry.BUDGET.failed(100)
    assert not _retry.BUDGET.allows(100)
    pgleak.uninstall()
    assert _retry.BUDGET.allows(100)


def test_async_retry_sleeps_with_the_given_awaitable(retrying: EventCapture) -> None:
    t = FakeTime()

    async def sleep(seconds: float) -> None:
        t.sleep(seconds)
        await asyncio.sleep(0)

    connect = Refusing(2)

    async def attempt() -> str:
        return connect()

    result = asyncio.run(
        _retry.aretry_connect(attempt, pool="p", sleep=sleep, clock=t.clock, rand=lambda: 1.0)
    )
    assert result == "conn"
    assert t.sleeps == [0.05, 0.1]
    assert len(retrying.of(CONNECT_RETRY)) == 2


def test_async_retry_does_not_block_the_loop(retrying: EventCapture) -> None:
    ticks = 0
    connect = Refusing(3)

    async def attempt() -> str:
        return connect()

    async def ticker() -> None:
        nonlocal ticks
        while True:
            ticks += 1
            await asyncio.sleep(0.001)

    async def main() -> str:
        task = asyncio.create_task(ticker())
        try:
            return await _retry.aretry_connect(attempt, pool="p", rand=lambda: 1.0)
        finally:
            task.cancel()

    assert asyncio.run(main()) == "conn"
    assert ticks >= 10  # the loop ran during the 0.35 s of sleeps


def _event(kind: str, **extra: Any) -> LeakEvent:
    fields = {
        "attempt": 2,
        "sleep_s": 0.08,
        "sqlstate": "53300",
        "held": 0,
        "held_over_threshold": 0,
        "elapsed_s": 0.1,
        "reason": None,
    }
    fields.update(extra)
    return LeakEvent(kind, "pool-1", detail="OperationalError: too many", extra=fields)


def test_messages_say_how_many_connections_are_held_here() -> None:
    retry = format_event(_event(CONNECT_RETRY))
    assert retry.startswith("connect.retry: server refused a connection for pool pool-1")
    assert "SQLSTATE 53300" in retry
    assert "retrying in 80ms" in retry
    assert "this process holds 0 checked-out connection(s)" in retry
    assert "leak here" not in retry
    many = format_event(_event(CONNECT_GAVE_UP, held=25, reason="deadline"))
    assert "connect.gave_up" in many
    assert "the retry deadline has passed" in many
    assert "holds 25 checked-out connection(s)" in many
    assert "a leak here may be why the server is full" in many
    assert "pgleak.checked_out()" in many
    old = format_event(_event(CONNECT_GAVE_UP, held=2, held_over_threshold=1, reason="budget"))
    assert "1 of them longer than the leak threshold" in old
    assert "a leak here" in old
    assert "retry budget" in old


def test_logging_sink_throttles_retries_per_pool(caplog: pytest.LogCaptureFixture) -> None:
    sink = LoggingSink(interval=lambda: 60.0, clock=lambda: 0.0)
    with caplog.at_level(logging.DEBUG, logger="pgleak"):
        for _ in range(50):
            sink(_event(CONNECT_RETRY))
        sink(_event(CONNECT_RETRY).__class__("connect.retry", "pool-2", extra={"held": 0}))
        sink(_event(CONNECT_GAVE_UP, reason="deadline"))
        sink.flush(force=True)
    records = [(r.levelname, r.getMessage().split(":")[0]) for r in caplog.records]
    assert records.count(("WARNING", "connect.retry")) == 2  # one per pool
    assert records.count(("ERROR", "connect.gave_up")) == 1
    summaries = [r for r in caplog.records if r.pgleak["event"] == "report.suppressed"]  # type: ignore[attr-defined]
    assert len(summaries) == 1
    assert "49 more connect.retry from pool pool-1 in" in summaries[0].getMessage()
    assert caplog.records[0].pgleak["sqlstate"] == "53300"  # type: ignore[attr-defined]


def test_default_settings_ride_out_a_few_seconds() -> None:
    s = pgleak.Settings()
    assert s.retry_connect is True
    # 7 sleeps of at most 0.05, 0.1, ..., 1.6, 2.0 s: up to 5.15 s, 2.6 s on average
    ceiling = sum(backoff(n, s.retry_base_delay, s.retry_max_delay, lambda: 1.0) for n in range(7))
    assert 5.0 < ceiling < s.retry_deadline
    # one request's full ride costs 7 tokens: many can ride before the budget stops retries
    assert s.retry_budget / 2 >= 20 * (s.retry_max_attempts - 1)
