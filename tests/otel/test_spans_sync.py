"""Checkout spans for every synchronous pool API (see ``tests/integrations/kits.py``).

Against the session's real PostgreSQL, with the SDK's in-memory pipeline: what a span covers,
what it says, whether it is current where the user's code runs, and what becomes of it when
the connection leaks.
"""

from __future__ import annotations

import contextlib
import gc
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import pgleak
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.integrations.kits import SYNC_KITS, Kit
from tests.otel.conftest import Otel

pytestmark = pytest.mark.parametrize("kit", SYNC_KITS, ids=str)

POOL_SIZE = 2


@pytest.fixture
def pool(kit: Kit, pg: Server, otel: Otel) -> Iterator[Any]:
    opened = kit.open(pg, POOL_SIZE, 0.3)
    yield opened
    with contextlib.suppress(Exception):  # closed by the test already
        kit.close(opened)


def scoped(kit: Kit) -> bool:
    """psycopg2's pools have no ``with`` block of their own (the kit's is getconn/putconn)."""
    return kit.library != "psycopg2"


def site(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    return f"{attrs['code.file.path']!s}:{attrs['code.line.number']!s}"


def assert_server(span: ReadableSpan, pg: Server) -> None:
    attrs = span.attributes or {}
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["server.address"] == pg.host
    assert attrs["server.port"] == pg.port
    assert attrs["db.namespace"] == pg.dbname


def block_in_a_request(kit: Kit, pool: Any, otel: Otel) -> tuple[ReadableSpan, Any]:
    """A checkout block inside a request's span: the checkout's span is current in the block
    (where the library has one), a child of the request's, and the request's is current again
    after. The checkout's span, and ``pgleak.checked_out()`` from inside the block."""
    with otel.tracer.start_as_current_span("request") as request:
        with kit.use(pool) as conn:
            inside = trace.get_current_span()
            kit.query(conn)
            checkout = pgleak.checked_out()
        after = trace.get_current_span()
    [span] = otel.collector.wait_for()
    assert after is request
    if scoped(kit):
        assert inside.get_span_context().span_id == span.context.span_id
    else:
        assert inside is request
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    return span, checkout


def test_the_span_is_current_inside_the_block(
    kit: Kit, pool: Any, otel: Otel, pg: Server, otel_events: EventCapture
) -> None:
    span, checkout = block_in_a_request(kit, pool, otel)
    assert span.kind is SpanKind.INTERNAL
    assert span.status.status_code is StatusCode.UNSET
    assert_server(span, pg)
    attrs = span.attributes or {}
    # The same line pgleak's own reports name, and the same pool.
    assert checkout[0].site is not None
    assert checkout[0].site.startswith(site(span) + " in ")
    assert attrs["db.client.connection.pool.name"] == checkout[0].pool
    assert attrs["pgleak.checkout_id"] == checkout[0].checkout_id
    assert attrs["pgleak.holder"] == "thread 'MainThread'"
    assert attrs["pgleak.outcome"] == "returned"
    assert "pgleak.leak" not in attrs
    assert span.start_time is not None
    assert span.end_time is not None
    held = attrs["pgleak.held_s"]
    waited = attrs["pgleak.waited_s"]
    assert isinstance(held, float)
    assert isinstance(waited, float)
    # The span covers the wait and the hold.
    assert (span.end_time - span.start_time) / 1e9 == pytest.approx(waited + held, abs=2e-3)


def test_a_bare_checkout_is_a_span_that_is_never_current(
    kit: Kit, pool: Any, otel: Otel, otel_events: EventCapture
) -> None:
    with otel.tracer.start_as_current_span("request") as request:
        conn = kit.take(pool)
        current = trace.get_current_span()
        kit.give(pool, conn)
    [span] = otel.collector.wait_for()
    assert current is request
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert site(span) == kit.take_site
    assert (span.attributes or {})["pgleak.outcome"] == "returned"


def test_held_too_long_the_span_gets_the_report(
    kit: Kit, pool: Any, otel: Otel, otel_events: EventCapture
) -> None:
    conn = kit.take(pool)
    [report] = otel_events.wait_for("leak.suspected")
    kit.give(pool, conn)
    otel_events.wait_for("leak.returned")
    [span] = otel.collector.wait_for()
    [event] = span.events
    assert event.name == "leak.suspected"
    details = event.attributes or {}
    assert report.checkout is not None
    assert details["code.stacktrace"] == "\n".join(report.stack)
    assert str(details["code.stacktrace"]).splitlines()[-1].startswith(kit.take_site + " in ")
    assert details["pgleak.checkout_id"] == report.checkout.checkout_id
    assert details["pgleak.threshold_s"] == pytest.approx(0.2)
    assert float(details["pgleak.held_s"]) >= 0.2  # type: ignore[arg-type]
    assert details["pgleak.holder_stack"]
    attrs = span.attributes or {}
    assert attrs["pgleak.leak"] == "leak.suspected"
    assert attrs["pgleak.outcome"] == "returned"
    # Returned in the end: a slow checkout, not an error.
    assert span.status.status_code is StatusCode.UNSET
    assert event.timestamp is not None
    assert span.end_time is not None
    assert span.start_time is not None
    assert span.start_time < event.timestamp < span.end_time
    pool_name = attrs["db.client.connection.pool.name"]
    assert (
        otel.value("pgleak.connection.leaks", str(pool_name), pgleak__leak__kind="suspected") == 1
    )


# A threshold the test never reaches, even on a loaded machine: the span must carry exactly one
# event, the collected/at-exit report, and no leak.suspected before it.
@pytest.mark.parametrize("leak_threshold", [60.0])
def test_a_connection_never_returned_still_ends_its_span_in_error(
    kit: Kit, pool: Any, otel: Otel, otel_events: EventCapture
) -> None:
    with otel.tracer.start_as_current_span("request"):
        conn = kit.take(pool)
        kit.query(conn)
    if kit.collectable:
        del conn
        gc.collect()
        [report] = otel_events.wait_for("leak.collected")
    else:
        kit.close(pool)  # the pool keeps it: reported when the pool closes
        [report] = otel_events.wait_for("leak.at_exit")
    [span] = otel.collector.wait_for()
    assert span.status.status_code is StatusCode.ERROR
    assert span.status.description
    assert [e.name for e in span.events] == [report.event]
    attrs = span.attributes or {}
    assert attrs["error.type"] == report.event
    assert attrs["pgleak.leak"] == report.event
    assert site(span) == kit.take_site
    kind = report.event.removeprefix("leak.")
    pool_name = str(attrs["db.client.connection.pool.name"])
    assert otel.value("pgleak.connection.leaks", pool_name, pgleak__leak__kind=kind) == 1


def test_a_wait_that_runs_out_is_an_error_span_listing_the_holders(
    kit: Kit, pool: Any, otel: Otel, otel_events: EventCapture
) -> None:
    held = [kit.take(pool) for _ in range(POOL_SIZE)]
    with otel.tracer.start_as_current_span("request") as request, pytest.raises(kit.exhausted):
        kit.take(pool)
    [report] = otel_events.wait_for("pool.exhausted")
    [failed] = otel.collector.wait_for(lambda s: s.status.status_code is StatusCode.ERROR)
    for conn in held:
        kit.give(pool, conn)
    assert failed.parent is not None
    assert failed.parent.span_id == request.get_span_context().span_id
    attrs = failed.attributes or {}
    assert attrs["error.type"] == "pool.exhausted"
    assert attrs["pgleak.outcome"] == "timeout"
    assert site(failed) == kit.take_site
    [event] = failed.events
    assert event.name == "pool.exhausted"
    details = event.attributes or {}
    assert details["pgleak.holders"] == POOL_SIZE
    sites = list(details["pgleak.holder_sites"])  # type: ignore[arg-type]
    assert all(str(s).startswith(kit.take_site + " in ") for s in sites)
    assert len(sites) == POOL_SIZE
    assert report.waiter is not None
    if report.waiter.held_s > 0:  # the pools that wait, rather than refuse at once
        assert float(attrs["pgleak.waited_s"]) == pytest.approx(0.3)  # type: ignore[arg-type]
        assert failed.start_time is not None
        assert failed.end_time is not None
        assert (failed.end_time - failed.start_time) / 1e9 == pytest.approx(0.3, abs=1e-3)
    pool_name = str(attrs["db.client.connection.pool.name"])
    assert otel.value("db.client.connection.timeouts", pool_name) == 1


def test_a_waiter_span_starts_when_the_wait_does(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    if not scoped(kit):
        pytest.skip("psycopg2's pools never wait: getconn() refuses at once")
    pool = kit.open(pg, 1, 10.0)
    try:
        held = kit.take(pool)
        name = pgleak.checked_out()[0].pool

        def waiter() -> None:
            with kit.use(pool) as conn:
                kit.query(conn)

        thread = threading.Thread(target=waiter, name="waiter")
        thread.start()
        # Until the waiter is really waiting: the pool's pending requests say so.
        deadline = time.monotonic() + 10
        while otel.value("db.client.connection.pending_requests", name) != 1:
            assert time.monotonic() < deadline, "the waiter never started waiting"
            time.sleep(0.005)
        waiting = time.monotonic()
        time.sleep(0.1)  # not synchronisation: a wait long enough to measure
        kit.give(pool, held)
        thread.join()
        [span] = otel.collector.wait_for(
            lambda s: (s.attributes or {}).get("pgleak.holder") == "thread 'waiter'"
        )
        waited = float((span.attributes or {})["pgleak.waited_s"])  # type: ignore[arg-type]
        assert waited >= 0.1
        assert span.start_time is not None
        assert span.start_time <= time.time_ns() - int((time.monotonic() - waiting) * 1e9)
        assert otel.value("db.client.connection.pending_requests", name) == 0
    finally:
        kit.close(pool)


def test_every_checkout_names_its_own_line(kit: Kit, pool: Any, otel: Otel) -> None:
    """The pool's and the line's attributes are kept per pool and line after the first
    checkout there: later checkouts, at that line or another, still name their own."""

    def here(sites: list[str | None]) -> None:
        with kit.use(pool) as conn:
            kit.query(conn)
            sites.append(pgleak.checked_out()[0].site)

    def there(sites: list[str | None]) -> None:
        with kit.use(pool) as conn:
            kit.query(conn)
            sites.append(pgleak.checked_out()[0].site)

    sites: list[str | None] = []
    for _ in range(2):
        here(sites)
        there(sites)
    spans = sorted(otel.collector.wait_for(count=4), key=lambda s: s.start_time or 0)
    assert len(spans) == 4
    for reported, span in zip(sites, spans, strict=True):
        assert reported is not None
        assert reported.startswith(site(span) + " in ")


def test_another_runtime_context_gets_the_apis_functions(
    kit: Kit, pool: Any, otel: Otel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without the ContextVar shortcut (``OTEL_PYTHON_CONTEXT`` names another runtime
    context), the block attaches and detaches through the API, with the same result."""
    from pgleak import _otel

    monkeypatch.setattr(_otel, "_CONTEXT", None)
    block_in_a_request(kit, pool, otel)
