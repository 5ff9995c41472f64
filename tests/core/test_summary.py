"""The leak summary by call site: worst first, each checkout's hold counted once, bounded."""

from __future__ import annotations

import gc
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest

import pgleak
from pgleak import _summary
from pgleak._events import Checkout, LeakEvent
from pgleak.testing import EventCapture, run_watchdog
from tests.conftest import Server
from tests.helpers import site_of


@pytest.fixture
def pool(pg: Server, installed: pgleak.Settings) -> Iterator[Any]:
    from psycopg_pool import ConnectionPool

    opened = ConnectionPool(pg.dsn, min_size=0, max_size=4, open=True)
    yield opened
    opened.close()


def _site(sites: list[dict[str, Any]], marker: str) -> dict[str, Any]:
    expected = site_of(marker, depth=2)
    [entry] = [s for s in sites if s["site"].startswith(expected + " in ")]
    return entry


def test_summary_lists_leaking_lines_worst_first(pool: Any, events: EventCapture) -> None:
    _summary_sink_clear()
    for _ in range(2):
        pool.getconn()  # DROPPED
    held = pool.getconn()  # HELD
    gc.collect()
    events.wait_for("leak.collected", count=2)
    events.wait_for("leak.suspected", count=1)
    pool.putconn(held)
    events.wait_for("leak.returned")
    sites = pgleak.summary()
    dropped, kept = _site(sites, "DROPPED"), _site(sites, "HELD")
    assert sites.index(dropped) < sites.index(kept)
    assert dropped["counts"] == {"leak.collected": 2}
    assert dropped["leaks"] == 2
    assert kept["counts"] == {"leak.suspected": 1, "leak.returned": 1}
    # suspected at ~0.2 s, returned later: the hold is counted once, at its longest.
    [returned] = events.of("leak.returned")
    assert returned.checkout is not None
    assert kept["held_total_s"] == pytest.approx(returned.checkout.held_s, abs=0.002)
    assert kept["held_max_s"] == kept["held_total_s"]
    assert dropped["pool"].startswith("pool-")  # psycopg_pool names its pools pool-N
    assert dropped["first_seen"] <= dropped["last_seen"]


def _summary_sink_clear() -> None:
    pgleak._summary_sink.clear()


def _summaries(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if getattr(r, "pgleak", {}).get("event") == "leak.summary"]


def test_logged_every_interval_only_when_something_happened(
    pg: Server, caplog: pytest.LogCaptureFixture
) -> None:
    from psycopg_pool import ConnectionPool

    _summary_sink_clear()
    caplog.set_level(logging.INFO, logger="pgleak")
    pgleak.install(leak_threshold=0.2, summary_interval=0.2, report_interval=60)
    try:
        with ConnectionPool(pg.dsn, min_size=0, max_size=2) as pool:
            pool.getconn()  # LEAKED
            gc.collect()
            for _ in range(100):  # bounded: 100 watchdog passes
                run_watchdog()
                if _summaries(caplog):
                    break
            [record] = _summaries(caplog)
            for _ in range(3):  # nothing new happens: no second summary
                run_watchdog()
            assert len(_summaries(caplog)) == 1
    finally:
        pgleak.uninstall()
    data = record.pgleak  # type: ignore[attr-defined]
    assert data["leaks"] == 1
    assert data["sites"][0]["site"].startswith(site_of("LEAKED") + " in ")
    assert record.levelno == logging.WARNING
    assert "leak.summary: 1 leak report(s) from 1 call site(s)" in record.getMessage()


def test_logged_at_exit(pg: Server, tmp_path: Any) -> None:
    script = tmp_path / "leaky.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import logging, sys
            logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
            import pgleak
            pgleak.install(leak_threshold=60)
            from psycopg_pool import ConnectionPool
            pool = ConnectionPool({pg.dsn!r}, min_size=0, max_size=2)
            conn = pool.getconn()  # AT-EXIT
            """
        )
    )
    done = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    assert "leak.at_exit" in out
    assert out.index("leak.summary") > out.index("leak.at_exit")
    assert f"{script}:7 in <module>" in out.split("leak.summary", 1)[1]


def _event(kind: str, site: str, checkout_id: int, held: float) -> LeakEvent:
    checkout = Checkout(checkout_id, "pool", held, "thread 't'", [site])
    return LeakEvent(kind, "pool", checkout=checkout)


def test_bounded_sites_and_remembered_holds() -> None:
    sink = _summary.SiteSummary(interval=lambda: 60.0)
    for n in range(_summary.MAX_SITES + 50):
        sink(_event("leak.collected", f"app.py:{n} in f", n, 1.0))
    sites = sink.sites()
    assert len(sites) == _summary.MAX_SITES + 1
    [other] = [s for s in sites if s["site"] == _summary.OTHER_SITES]
    assert other["leaks"] == 50
    for n in range(_summary.MAX_IDS * 2):  # many checkouts: the memory of holds stays bounded
        sink(_event("leak.suspected", "app.py:1 in f", 10_000 + n, 0.5))
    assert len(sink._held) == _summary.MAX_IDS


def test_nothing_happened_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="pgleak")
    sink = _summary.SiteSummary(interval=lambda: 0.0)
    sink.flush(force=True)
    sink(_event("leak.returned", "app.py:1 in f", 1, 0.5))  # a follow-up alone is no news
    sink.flush(force=True)
    assert not _summaries(caplog)


def test_the_dump_signal_logs_what_is_checked_out(pg: Server, tmp_path: Any) -> None:
    """``PGLEAK_DUMP_SIGNAL=SIGUSR2``: ``kill -USR2`` a running process, read what it holds."""
    import signal

    script = tmp_path / "holder.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import logging, sys, threading
            logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
            import pgleak
            pgleak.install(leak_threshold=60, dump_signal="SIGUSR2")
            from psycopg_pool import ConnectionPool
            pool = ConnectionPool({pg.dsn!r}, min_size=0, max_size=2)
            conn = pool.getconn()  # HELD
            print("holding", flush=True)
            sys.stdin.readline()  # until the test has read the dump
            pool.putconn(conn)
            """
        )
    )
    process = subprocess.Popen(
        [sys.executable, str(script)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    assert process.stdin is not None
    try:
        lines = []
        for line in process.stdout:  # bounded by the process's own output
            lines.append(line)
            if line.startswith("holding"):
                process.send_signal(signal.SIGUSR2)
            if "holder is now at" in line:
                break
        process.stdin.write("\n")
        process.stdin.close()
        assert process.wait(30) == 0
    finally:
        if process.poll() is None:
            process.kill()
    text = "".join(lines)
    assert "pool.checked_out: 1 connection(s) checked out now, oldest first:" in text
    assert f"checked out at {script}:7 in <module>" in text
