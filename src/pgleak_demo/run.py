"""``pgleak demo``: start a throwaway PostgreSQL, run the shop, show what pgleak reports."""

from __future__ import annotations

import collections
import gc
import logging
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

import pgleak
from pgleak.embedded import EmbeddedPostgres
from pgleak.testing import EventCapture, capture_events

from . import shop

MAX_CONNECTIONS = 8


def _say(text: str) -> None:
    print(f"\n=== {text}", flush=True)


def main(argv: list[str] | None = None) -> int:
    """Run the demo; returns the process exit code."""
    try:
        import sqlalchemy as sa
    except ImportError:
        print(
            "pgleak demo needs SQLAlchemy and psycopg: pip install 'pgleak[demo]'", file=sys.stderr
        )
        return 2

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logger = logging.getLogger("pgleak")
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False

    started = time.monotonic()
    _say(f"Starting a throwaway PostgreSQL with max_connections={MAX_CONNECTIONS}")
    with EmbeddedPostgres(max_connections=MAX_CONNECTIONS) as server:
        print(
            f"PostgreSQL {server.version} ({server.source} binaries) on {server.host}:{server.port}"
        )
        pgleak.install(leak_threshold=1.5, report_interval=30)
        print("pgleak.install(leak_threshold=1.5)  # the one line an app adds at startup")
        engine = sa.create_engine(
            server.url("psycopg"), pool_size=3, max_overflow=2, pool_timeout=2
        )
        try:
            with capture_events() as events:
                _run_scenarios(engine, events)
            culprit = _culprit(events)
            if culprit:
                print(
                    f"pool.exhausted named the line holding {culprit[1]} of {culprit[2]} "
                    f"connections: {culprit[0]}"
                )
                print(
                    "That is the bug: order_history() returns early without closing its connection."
                )
            # The leaked connections are garbage in reference cycles: a collection set off by
            # the doctor's own allocations would hand them back to the pool before the DBA
            # sees them, and before the shutdown reports them as leak.at_exit.
            gc.disable()
            _doctor_view(server)
        finally:
            _say(
                "Shutting down: engine.dispose() with connections still checked out; pgleak "
                "reports them and logs the counts of the repeats (report.suppressed)"
            )
            engine.dispose()
            pgleak.uninstall()
            gc.enable()
    _say(f"Done in {time.monotonic() - started:.1f}s.")
    return 0


def _doctor_view(server: EmbeddedPostgres) -> None:
    """The server's side of the same story: what a DBA sees with ``pgleak doctor``."""
    from pgleak.cli import main as cli

    _say(
        "The DBA's view: pgleak doctor reads pg_stat_activity and parses pgleak's "
        "application_name tags back"
    )
    print(f"$ pgleak doctor '{server.dsn()}'")
    cli(["doctor", server.dsn()])


def _culprit(events: EventCapture) -> tuple[str, int, int] | None:
    """The call site holding most connections when the pool ran dry."""
    exhausted = events.of("pool.exhausted")
    if not exhausted:
        return None
    sites = collections.Counter(h.site for h in exhausted[-1].holders if h.site)
    if not sites:
        return None
    site, count = sites.most_common(1)[0]
    return site, count, len(exhausted[-1].holders)


def _in_threads(target: Callable[[], object], count: int, name: str) -> list[threading.Thread]:
    threads = [threading.Thread(target=target, name=f"{name}-{n}") for n in range(count)]
    for thread in threads:
        thread.start()
    return threads


def _join(threads: list[threading.Thread]) -> None:
    for thread in threads:
        thread.join(30)


def _run_scenarios(engine: Any, events: EventCapture) -> None:
    import sqlalchemy

    _say("Serving product pages from 4 worker threads (correct code: no reports)")
    _join(_in_threads(lambda: [shop.product_page(engine, n) for n in range(50)], 4, "web"))

    _say("A nightly export holds its connection for 4s; the threshold is 1.5s")
    export = _in_threads(lambda: shop.nightly_export(engine, 4.0), 1, "export")

    _say("A cart handler drops a connection without closing it")
    shop.cart_count(engine)
    events.wait_for("leak.collected", timeout=10)

    _say("order_history() leaks a connection on every call; 4 requests come in")
    _join(_in_threads(lambda: shop.order_history(engine, 7), 4, "web"))
    events.wait_for("leak.suspected", count=5, timeout=10)
    # The count is logged when the report_interval (30s) ends, or at shutdown: say so, or the
    # reader looks for a count line that is not there yet.
    print(
        "(the same line leaked 4 times: one full report above; the repeats are only counted, "
        "and report.suppressed logs the count when the 30s report interval ends, here at "
        "shutdown)"
    )

    _say("The export finishes and gives its connection back")
    _join(export)
    events.wait_for("leak.returned", timeout=10)

    _say("One more order_history() request takes the last free connection")
    _join(_in_threads(lambda: shop.order_history(engine, 8), 1, "web"))

    _say(
        "The pool is dry: the next request waits pool_timeout=2s and fails; pgleak names "
        "every holder, oldest first"
    )
    try:
        shop.product_page(engine, 1)
    except sqlalchemy.exc.TimeoutError as exc:
        print(f"the request failed: sqlalchemy.exc.TimeoutError: {str(exc).splitlines()[0]}")

    _say("pgleak.checked_out() at this moment")
    for checkout in pgleak.checked_out():
        print(
            f"  #{checkout.checkout_id} held {checkout.held_s:.1f}s by {checkout.holder} "
            f"at {checkout.site}"
        )
