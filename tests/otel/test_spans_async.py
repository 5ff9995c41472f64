"""Checkout spans for every asyncio pool API (see ``tests/integrations/kits.py``).

Each test runs its own event loop. What matters more here than with threads: the span is made
current in the caller's task, stays current only inside its ``async with`` block, and is
ended properly although asyncpg and SQLAlchemy return connections from another task.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
from collections.abc import Awaitable, Callable
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind, StatusCode

import pgleak
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.integrations.kits import ASYNC_KITS, Kit
from tests.otel.conftest import Otel

pytestmark = pytest.mark.parametrize("kit", ASYNC_KITS, ids=str)

POOL_SIZE = 2
Body = Callable[[Any], Awaitable[None]]


def _run(kit: Kit, pg: Server, body: Body, size: int = POOL_SIZE, timeout: float = 0.3) -> None:
    async def main() -> None:
        pool = kit.open(pg, size, timeout)
        if asyncio.iscoroutine(pool):
            pool = await pool
        try:
            await body(pool)
        finally:
            with contextlib.suppress(Exception):  # closed by the test already
                await kit.close(pool)

    asyncio.run(main())


def site(span: ReadableSpan) -> str:
    attrs = span.attributes or {}
    return f"{attrs['code.file.path']!s}:{attrs['code.line.number']!s}"


def test_the_span_is_current_inside_the_block(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    seen: dict[str, Any] = {}

    async def body(pool: Any) -> None:
        with otel.tracer.start_as_current_span("request") as request:
            seen["request"] = request
            async with kit.use(pool) as conn:
                seen["inside"] = trace.get_current_span()
                await kit.query(conn)
                seen["checkout"] = pgleak.checked_out()
            seen["after"] = trace.get_current_span()
        seen["outside"] = trace.get_current_span()

    _run(kit, pg, body)
    [span] = otel.collector.wait_for()
    request = seen["request"]
    assert seen["after"] is request
    assert seen["outside"] is trace.INVALID_SPAN
    assert seen["inside"].get_span_context().span_id == span.context.span_id
    assert span.kind is SpanKind.INTERNAL
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    assert span.status.status_code is StatusCode.UNSET
    attrs = span.attributes or {}
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["server.address"] == pg.host
    assert attrs["server.port"] == pg.port
    assert attrs["db.namespace"] == pg.dbname
    [checkout] = seen["checkout"]
    assert checkout.site.startswith(site(span) + " in ")
    assert attrs["db.client.connection.pool.name"] == checkout.pool
    assert str(attrs["pgleak.holder"]).startswith("task ")
    assert attrs["pgleak.outcome"] == "returned"


def test_a_bare_checkout_is_a_span_that_is_never_current(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    seen: dict[str, Any] = {}

    async def body(pool: Any) -> None:
        with otel.tracer.start_as_current_span("request") as request:
            seen["request"] = request
            conn = await kit.take(pool)
            seen["current"] = trace.get_current_span()
            seen["checkout"] = pgleak.checked_out()
            await kit.give(pool, conn)

    _run(kit, pg, body)
    [span] = otel.collector.wait_for()
    assert seen["current"] is seen["request"]
    assert span.parent is not None
    assert span.parent.span_id == seen["request"].get_span_context().span_id
    # The line pgleak's reports name (SQLAlchemy's AsyncConnection checks out when awaited).
    [checkout] = seen["checkout"]
    assert checkout.site.startswith(site(span) + " in ")


def test_held_too_long_the_span_gets_the_report(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    async def body(pool: Any) -> None:
        async with kit.use(pool):
            await asyncio.to_thread(otel_events.wait_for, "leak.suspected")
        await asyncio.to_thread(otel_events.wait_for, "leak.returned")

    _run(kit, pg, body)
    [report] = otel_events.of("leak.suspected")
    [span] = otel.collector.wait_for()
    [event] = span.events
    assert event.name == "leak.suspected"
    details = event.attributes or {}
    assert details["code.stacktrace"] == "\n".join(report.stack)
    assert details["pgleak.holder_stack"]
    assert details["pgleak.holder_finished"] is False
    assert (span.attributes or {})["pgleak.leak"] == "leak.suspected"
    assert span.status.status_code is StatusCode.UNSET


# A threshold the test never reaches, even on a loaded machine: the span must carry exactly one
# event, the collected/at-exit report, and no leak.suspected before it.
@pytest.mark.parametrize("leak_threshold", [60.0])
def test_a_connection_never_returned_still_ends_its_span_in_error(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    async def body(pool: Any) -> None:
        conn = await kit.take(pool)
        await kit.query(conn)
        if kit.collectable:
            del conn
            gc.collect()
            await asyncio.to_thread(otel_events.wait_for, "leak.collected")
        else:
            await kit.close(pool)
            await asyncio.to_thread(otel_events.wait_for, "leak.at_exit")

    if kit.name == "sqlalchemy-async":
        import sqlalchemy as sa

        # SQLAlchemy's async pools warn about the dropped connection too.
        warned: Any = pytest.warns(sa.exc.SAWarning, match="garbage collector")
    else:
        warned = contextlib.nullcontext()
    with warned:
        _run(kit, pg, body)
    [report] = [e for e in otel_events.events if e.event in ("leak.collected", "leak.at_exit")]
    [span] = otel.collector.wait_for()
    assert span.status.status_code is StatusCode.ERROR
    assert [e.name for e in span.events] == [report.event]
    assert (span.attributes or {})["error.type"] == report.event
    assert report.checkout is not None
    assert report.checkout.site is not None
    assert report.checkout.site.startswith(site(span) + " in ")


def test_a_wait_that_runs_out_is_an_error_span_listing_the_holders(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    async def body(pool: Any) -> None:
        held = [await kit.take(pool) for _ in range(POOL_SIZE)]
        with otel.tracer.start_as_current_span("request"), pytest.raises(kit.exhausted):
            await kit.take(pool)
        for conn in held:
            await kit.give(pool, conn)

    _run(kit, pg, body)
    otel_events.wait_for("pool.exhausted")
    [failed] = otel.collector.wait_for(lambda s: s.status.status_code is StatusCode.ERROR)
    attrs = failed.attributes or {}
    assert attrs["error.type"] == "pool.exhausted"
    assert float(attrs["pgleak.waited_s"]) > 0  # type: ignore[arg-type]
    [event] = failed.events
    assert (event.attributes or {})["pgleak.holders"] == POOL_SIZE
    pool_name = str(attrs["db.client.connection.pool.name"])
    assert otel.value("db.client.connection.timeouts", pool_name) == 1


def test_blocks_in_concurrent_tasks_each_see_their_own_span(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    """Two tasks inside their blocks at once: each task's current span is its own checkout."""
    seen: dict[str, int] = {}
    both_inside = asyncio.Barrier(2) if hasattr(asyncio, "Barrier") else None

    async def task(pool: Any, name: str) -> None:
        async with kit.use(pool) as conn:
            if both_inside is not None:
                await both_inside.wait()
            await kit.query(conn)
            seen[name] = trace.get_current_span().get_span_context().span_id

    async def body(pool: Any) -> None:
        await asyncio.gather(task(pool, "a"), task(pool, "b"))

    _run(kit, pg, body)
    spans = otel.collector.wait_for(count=2)
    assert sorted(seen.values()) == sorted(s.context.span_id for s in spans)
