"""The logging sink: readable, structured, and not a flood when one line leaks 1,000 times."""

from __future__ import annotations

import logging

import pytest

from pgleak._events import Checkout, LeakEvent
from pgleak._report import LoggingSink, format_event


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def _suspected(n: int, site: str = "/app/jobs.py:42 in run") -> LeakEvent:
    checkout = Checkout(
        n, "postgresql://app@db/shop", 31.0, "thread 'w'", ["/app/main.py:1 in <module>", site]
    )
    return LeakEvent(
        "leak.suspected", "postgresql://app@db/shop", checkout=checkout, threshold_s=30
    )


@pytest.fixture
def sink_and_records(
    caplog: pytest.LogCaptureFixture,
) -> tuple[LoggingSink, FakeClock, list[logging.LogRecord]]:
    caplog.set_level(logging.INFO, logger="pgleak")
    clock = FakeClock()
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("pgleak.test-report")
    logger.setLevel(logging.INFO)
    logger.handlers[:] = [Keep()]
    logger.propagate = False
    sink = LoggingSink(logger=logger, interval=lambda: 60.0, clock=clock)
    return sink, clock, records


def test_a_thousand_leaks_from_one_line_give_one_report_and_one_count(
    sink_and_records: tuple[LoggingSink, FakeClock, list[logging.LogRecord]],
) -> None:
    sink, clock, records = sink_and_records
    for n in range(1000):
        sink(_suspected(n))
        clock.now += 0.01
    assert len(records) == 1
    clock.now += 60
    sink.flush()
    assert len(records) == 2
    summary = records[1].pgleak  # type: ignore[attr-defined]
    assert summary["event"] == "report.suppressed"
    assert summary["of"] == "leak.suspected"
    assert summary["count"] == 999
    assert "999 more leak.suspected" in records[1].getMessage()
    assert "/app/jobs.py:42" in records[1].getMessage()


def test_each_call_site_gets_its_own_full_report(
    sink_and_records: tuple[LoggingSink, FakeClock, list[logging.LogRecord]],
) -> None:
    sink, _, records = sink_and_records
    sink(_suspected(1, "/app/a.py:1 in a"))
    sink(_suspected(2, "/app/b.py:2 in b"))
    sink(_suspected(3, "/app/a.py:1 in a"))
    assert [r.pgleak["checkout_id"] for r in records] == [1, 2]  # type: ignore[attr-defined]


def test_returned_follow_up_only_for_reports_that_were_logged(
    sink_and_records: tuple[LoggingSink, FakeClock, list[logging.LogRecord]],
) -> None:
    sink, _, records = sink_and_records
    sink(_suspected(1))
    sink(_suspected(2))  # counted, not logged
    for n in (1, 2):
        checkout = Checkout(n, "p", 40.0, "thread 'w'", ["/app/jobs.py:42 in run"])
        sink(LeakEvent("leak.returned", "p", checkout=checkout, threshold_s=30))
    assert [r.pgleak["event"] for r in records] == ["leak.suspected", "leak.returned"]  # type: ignore[attr-defined]
    assert records[1].pgleak["checkout_id"] == 1  # type: ignore[attr-defined]
    assert records[1].levelno == logging.INFO


def test_forced_flush_reports_pending_counts_at_exit(
    sink_and_records: tuple[LoggingSink, FakeClock, list[logging.LogRecord]],
) -> None:
    sink, _, records = sink_and_records
    sink(_suspected(1))
    sink(_suspected(2))
    sink.flush()
    assert len(records) == 1
    sink.flush(force=True)
    assert len(records) == 2


def test_message_first_line_names_pool_holder_time_and_site() -> None:
    text = format_event(_suspected(7))
    first, *rest = text.splitlines()
    assert first.startswith("leak.suspected: connection held 31.0s (threshold 30.0s) by thread 'w'")
    assert "checked out at /app/jobs.py:42 in run" in first
    assert "[checkout #7]" in first
    assert rest[0].strip() == "checked out at (most recent call last):"
    assert rest[-1].strip() == "/app/jobs.py:42 in run"


def test_exhausted_message_lists_holders_in_order() -> None:
    holders = tuple(
        Checkout(n, "p", 10.0 - n, f"thread 'h{n}'", [f"/app/x.py:{n} in f"], ["/app/y.py:9 in g"])
        for n in (1, 2)
    )
    waiter = Checkout(0, "p", 30.0, "thread 'web-1'", ["/app/view.py:5 in get"])
    text = format_event(
        LeakEvent("pool.exhausted", "p", holders=holders, waiter=waiter, detail="QueuePool limit")
    )
    assert text.index("#1 held 9.0s by thread 'h1'") < text.index("#2 held 8.0s by thread 'h2'")
    assert "holder is now at" in text
    assert "/app/view.py:5 in get" in text
    assert text.splitlines()[0].startswith(
        "pool.exhausted: no connection available from pool p after waiting 30.0s; 2"
    )
