"""Refused connection attempts (53300) in traces: events on the caller's span, with the SQLSTATE.

A dedicated server with ``max_connections=3`` is filled with direct connections (opened under
``pgleak.suppress()``), so that opening a pool's connection is refused for real; a thread frees
a slot once the first ``connect.retry`` has been reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.trace import StatusCode

import pgleak
from pgleak.embedded import EmbeddedPostgres
from pgleak.testing import EventCapture, capture_events
from tests.otel.conftest import Otel

MAX = 3


@pytest.fixture(scope="module")
def small() -> Iterator[EmbeddedPostgres]:
    with EmbeddedPostgres(max_connections=MAX) as srv:
        yield srv


@contextlib.contextmanager
def full(srv: EmbeddedPostgres) -> Iterator[list[Any]]:
    import psycopg

    conns: list[Any] = []
    with pgleak.suppress():
        try:
            for _ in range(MAX):
                conns.append(psycopg.connect(srv.dsn()))
            yield conns
        finally:
            for conn in conns:
                conn.close()


@contextlib.contextmanager
def freed_after_a_retry(conns: list[Any], events: EventCapture) -> Iterator[None]:
    def free_one() -> None:
        events.wait_for("connect.retry")
        conns.pop().close()

    freer = threading.Thread(target=free_one)
    freer.start()
    try:
        yield
    finally:
        freer.join()


@pytest.fixture
def telemetry(small: EmbeddedPostgres) -> Iterator[Otel]:
    made = Otel()
    pgleak.install(
        retry_base_delay=0.05,
        tracer_provider=made.tracer_provider,
        meter_provider=made.meter_provider,
    )
    try:
        yield made
    finally:
        pgleak.uninstall()
        made.shutdown()


def _retry_events(otel: Otel, span_name: str) -> list[Any]:
    [span] = otel.collector.wait_for(name=span_name)
    return [e for e in span.events if e.name == "connect.retry"]


def test_psycopg2_refusals_are_events_on_the_request(
    small: EmbeddedPostgres, telemetry: Otel
) -> None:
    from psycopg2.pool import SimpleConnectionPool

    pool = SimpleConnectionPool(0, 1, small.dsn())
    with (
        capture_events() as events,
        full(small) as conns,
        freed_after_a_retry(conns, events),
        telemetry.tracer.start_as_current_span("request"),
    ):
        conn = pool.getconn()
    pool.putconn(conn)
    pool.closeall()
    retries = _retry_events(telemetry, "request")
    assert retries
    first = retries[0].attributes or {}
    assert first["db.response.status_code"] == "53300"
    assert first["pgleak.attempt"] == 1
    assert first["db.system.name"] == "postgresql"
    assert "too many clients" in str(first["pgleak.detail"])
    assert str(first["db.client.connection.pool.name"]).startswith("psycopg2 SimpleConnectionPool")


def test_asyncpg_refusals_are_events_on_the_request(
    small: EmbeddedPostgres, telemetry: Otel
) -> None:
    import asyncpg

    async def main() -> None:
        pool = await asyncpg.create_pool(small.url(driver=""), min_size=0, max_size=1)
        try:
            with telemetry.tracer.start_as_current_span("request"):
                async with pool.acquire() as conn:
                    assert await conn.fetchval("select 1") == 1
        finally:
            await pool.close()

    with capture_events() as events, full(small) as conns, freed_after_a_retry(conns, events):
        asyncio.run(main())
    retries = _retry_events(telemetry, "request")
    assert retries
    assert all((e.attributes or {})["db.response.status_code"] == "53300" for e in retries)


def test_without_a_span_to_carry_them_they_are_spans_and_giving_up_is_an_error(
    small: EmbeddedPostgres, telemetry: Otel
) -> None:
    import psycopg2
    from psycopg2.pool import SimpleConnectionPool

    pgleak.install(
        retry_base_delay=0.05,
        retry_deadline=0.3,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    pool = SimpleConnectionPool(0, 1, small.dsn())
    with full(small), pytest.raises(psycopg2.OperationalError, match="too many clients"):
        pool.getconn()
    pool.closeall()
    [gave_up] = telemetry.collector.wait_for(name="connect.gave_up")
    assert gave_up.status.status_code is StatusCode.ERROR
    attrs = gave_up.attributes or {}
    assert attrs["db.response.status_code"] == "53300"
    assert attrs["error.type"] == "connect.gave_up"
    assert attrs["pgleak.reason"] == "deadline"
    retries = telemetry.spans("connect.retry")
    assert retries
    assert {(s.attributes or {})["db.response.status_code"] for s in retries} == {"53300"}
