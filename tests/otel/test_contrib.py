"""With the OpenTelemetry contrib instrumentations installed, their query spans nest under
pgleak's checkout span - whichever was installed first.

The instrumentations start their spans under whatever is current when the query runs, so this
is the test that pgleak's span is current in the user's block, and that it was attached in a
place no instrumentation wrapper undoes (``docs/otel.md``, "With the contrib instrumentations").

``opentelemetry-instrumentation-sqlalchemy`` 0.66b1 accepts only SQLAlchemy < 2.1 and does
nothing on 2.1 (it logs an error). Its tests run unforced where SQLAlchemy is older (CI's
Python 3.10 run installs 2.0), and forced (``skip_dep_check=True``, with which it works on 2.1)
everywhere, so the case that breaks a naive implementation - its ``connect`` span around
``Engine.connect`` - is exercised in every run.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from importlib import metadata
from typing import Any

import pytest
import sqlalchemy.ext.asyncio  # (see below, at ORDERS)

pytest.importorskip("opentelemetry.instrumentation.psycopg", reason="OpenTelemetry test extras")

from opentelemetry import trace
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.trace import SpanKind

import pgleak
from pgleak._adapter import _version_tuple
from pgleak._otel import SPAN_NAME
from tests.conftest import Server
from tests.otel.conftest import Otel, statement

SA_VERSION = _version_tuple(metadata.version("SQLAlchemy"))
SA_ACCEPTED = SA_VERSION < (2, 1)

ORDERS = ["pgleak first", "instrumentation first"]

# ``sqlalchemy.ext.asyncio`` is imported above, before any test instruments SQLAlchemy: imported
# after, it binds the instrumentation's wrapped ``create_engine``, so that
# ``create_async_engine`` (wrapped too) registers the same listeners twice, and
# ``uninstrument()`` then fails removing them the second time. An application imports it once,
# at start-up; a test run would otherwise depend on its order.


def install_both(otel: Otel, order: str, instrument: Any) -> None:
    def pgleak_install() -> None:
        pgleak.install(
            leak_threshold=30,
            tracer_provider=otel.tracer_provider,
            meter_provider=otel.meter_provider,
        )

    if order == "pgleak first":
        pgleak_install()
        instrument()
    else:
        instrument()
        pgleak_install()


def by_id(spans: list[ReadableSpan]) -> dict[int, ReadableSpan]:
    return {s.context.span_id: s for s in spans}


def assert_nested(otel: Otel, request_id: int, checkouts: int = 1) -> list[ReadableSpan]:
    """Every query span is a child of a checkout span, each a child of the request; returns
    the query spans."""
    otel.collector.wait_for(count=checkouts)
    spans = otel.spans(None)
    checkout_spans = [s for s in spans if s.name == SPAN_NAME]
    assert len(checkout_spans) == checkouts, [s.name for s in spans]
    for span in checkout_spans:
        assert span.parent is not None
        assert span.parent.span_id == request_id
    ids = {s.context.span_id for s in checkout_spans}
    queries = [
        s
        for s in spans
        if s.kind is SpanKind.CLIENT and s.name != "connect" and "SELECT 42" in statement(s)
    ]
    assert queries, [(s.name, s.kind, dict(s.attributes or {})) for s in spans]
    for query in queries:
        assert query.parent is not None
        assert query.parent.span_id in ids, f"{query.name} not under a checkout span"
    return queries


def _name(span: trace.Span) -> str:
    """The name of a live SDK span (the API's ``Span`` does not promise one)."""
    return str(getattr(span, "name", ""))


# -- psycopg (psycopg_pool, and SQLAlchemy's psycopg dialect) -----------------------------------


@pytest.fixture
def psycopg_instrumentor() -> Iterator[PsycopgInstrumentor]:
    instrumentor = PsycopgInstrumentor()
    yield instrumentor
    instrumentor.uninstrument()


@pytest.mark.parametrize("order", ORDERS)
def test_psycopg_pool_queries_nest_under_the_checkout(
    order: str, pg: Server, telemetry: Otel, psycopg_instrumentor: PsycopgInstrumentor
) -> None:
    from psycopg_pool import ConnectionPool

    install_both(
        telemetry,
        order,
        lambda: psycopg_instrumentor.instrument(tracer_provider=telemetry.tracer_provider),
    )
    with (
        ConnectionPool(pg.dsn, min_size=1, max_size=2, open=True) as pool,
        telemetry.tracer.start_as_current_span("request") as request,
    ):
        with pool.connection() as conn:
            conn.execute("SELECT 42").fetchone()
        assert trace.get_current_span() is request
    assert_nested(telemetry, request.get_span_context().span_id)


@pytest.mark.parametrize("order", ORDERS)
def test_async_psycopg_pool_queries_nest_under_the_checkout(
    order: str, pg: Server, telemetry: Otel, psycopg_instrumentor: PsycopgInstrumentor
) -> None:
    from psycopg_pool import AsyncConnectionPool

    install_both(
        telemetry,
        order,
        lambda: psycopg_instrumentor.instrument(tracer_provider=telemetry.tracer_provider),
    )

    async def main() -> int:
        async with AsyncConnectionPool(pg.dsn, min_size=1, max_size=2, open=False) as pool:
            with telemetry.tracer.start_as_current_span("request") as request:
                async with pool.connection() as conn:
                    await (await conn.execute("SELECT 42")).fetchone()
                assert trace.get_current_span() is request
                return request.get_span_context().span_id

    assert_nested(telemetry, asyncio.run(main()))


@pytest.mark.parametrize("order", ORDERS)
def test_sqlalchemy_on_psycopg_queries_nest_under_the_checkout(
    order: str, pg: Server, telemetry: Otel, psycopg_instrumentor: PsycopgInstrumentor
) -> None:
    import sqlalchemy as sa

    install_both(
        telemetry,
        order,
        lambda: psycopg_instrumentor.instrument(tracer_provider=telemetry.tracer_provider),
    )
    engine = sa.create_engine(pg.url("psycopg"), pool_size=2)
    try:
        with telemetry.tracer.start_as_current_span("request") as request:
            with engine.connect() as conn:
                conn.exec_driver_sql("SELECT 42").scalar()
            with engine.begin() as conn:
                conn.exec_driver_sql("SELECT 42").scalar()
            assert trace.get_current_span() is request
    finally:
        engine.dispose()
    queries = assert_nested(telemetry, request.get_span_context().span_id, checkouts=2)
    assert len(queries) == 2


# -- asyncpg (its pool, and SQLAlchemy's asyncpg dialect) ---------------------------------------


@pytest.fixture
def asyncpg_instrumentor() -> Iterator[AsyncPGInstrumentor]:
    instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]
    yield instrumentor
    instrumentor.uninstrument()


@pytest.mark.parametrize("order", ORDERS)
def test_asyncpg_queries_nest_under_the_checkout(
    order: str, pg: Server, telemetry: Otel, asyncpg_instrumentor: AsyncPGInstrumentor
) -> None:
    import asyncpg

    install_both(
        telemetry,
        order,
        lambda: asyncpg_instrumentor.instrument(tracer_provider=telemetry.tracer_provider),
    )

    async def main() -> int:
        pool = await asyncpg.create_pool(
            host=pg.host, port=pg.port, user=pg.user, database=pg.dbname, min_size=1, max_size=2
        )
        try:
            with telemetry.tracer.start_as_current_span("request") as request:
                async with pool.acquire() as conn:
                    assert await conn.fetchval("SELECT 42") == 42
                # Released, pgleak's span is no longer current here.
                assert trace.get_current_span() is request
                return request.get_span_context().span_id
        finally:
            await pool.close()

    assert_nested(telemetry, asyncio.run(main()))


@pytest.mark.parametrize("order", ORDERS)
def test_sqlalchemy_on_asyncpg_queries_nest_under_the_checkout(
    order: str, pg: Server, telemetry: Otel, asyncpg_instrumentor: AsyncPGInstrumentor
) -> None:
    from sqlalchemy.ext.asyncio import create_async_engine

    install_both(
        telemetry,
        order,
        lambda: asyncpg_instrumentor.instrument(tracer_provider=telemetry.tracer_provider),
    )

    async def main() -> int:
        engine = create_async_engine(pg.url("asyncpg"), pool_size=2)
        try:
            with telemetry.tracer.start_as_current_span("request") as request:
                async with engine.connect() as conn:
                    await conn.exec_driver_sql("SELECT 42")
                assert trace.get_current_span() is request
                return request.get_span_context().span_id
        finally:
            await engine.dispose()

    assert_nested(telemetry, asyncio.run(main()))


# -- the SQLAlchemy instrumentation -------------------------------------------------------------

FORCED = [
    pytest.param(
        False,
        id="accepted-version",
        marks=pytest.mark.skipif(
            not SA_ACCEPTED,
            reason=f"opentelemetry-instrumentation-sqlalchemy accepts SQLAlchemy < 2.1 only "
            f"(installed: {'.'.join(map(str, SA_VERSION))}); CI's Python 3.10 run installs 2.0",
        ),
    ),
    pytest.param(True, id="forced"),
]


@pytest.fixture
def sqlalchemy_instrumentor() -> Iterator[SQLAlchemyInstrumentor]:
    instrumentor = SQLAlchemyInstrumentor()
    yield instrumentor
    instrumentor.uninstrument()


def _sa_instrument(instrumentor: SQLAlchemyInstrumentor, otel: Otel, forced: bool) -> Any:
    def instrument() -> None:
        kwargs: dict[str, Any] = {"tracer_provider": otel.tracer_provider}
        if forced:
            kwargs["skip_dep_check"] = True
        instrumentor.instrument(**kwargs)
        assert instrumentor.is_instrumented_by_opentelemetry

    return instrument


def _assert_connect_is_a_sibling(otel: Otel, request_id: int) -> None:
    """The instrumentation's ``connect`` span (around ``Engine.connect``) is the request's
    child, and so is the checkout span: not the checkout under ``connect``, which ends first."""
    connects = [s for s in otel.spans(None) if s.name == "connect"]
    assert connects
    for span in connects:
        assert span.parent is not None
        assert span.parent.span_id == request_id


@pytest.mark.parametrize("forced", FORCED)
@pytest.mark.parametrize("order", ORDERS)
def test_sqlalchemy_instrumentation_queries_nest_under_the_checkout(
    order: str,
    forced: bool,
    pg: Server,
    telemetry: Otel,
    sqlalchemy_instrumentor: SQLAlchemyInstrumentor,
) -> None:
    import sqlalchemy as sa

    install_both(telemetry, order, _sa_instrument(sqlalchemy_instrumentor, telemetry, forced))
    engine = sa.create_engine(pg.url("psycopg"), pool_size=2)  # wrapped: created after
    try:
        with telemetry.tracer.start_as_current_span("request") as request:
            with engine.connect() as conn:
                assert _name(trace.get_current_span()) == SPAN_NAME
                conn.exec_driver_sql("SELECT 42").scalar()
            assert trace.get_current_span() is request
    finally:
        engine.dispose()
    request_id = request.get_span_context().span_id
    assert_nested(telemetry, request_id)
    _assert_connect_is_a_sibling(telemetry, request_id)


@pytest.mark.parametrize("forced", FORCED)
@pytest.mark.parametrize("order", ORDERS)
def test_sqlalchemy_instrumentation_async_queries_nest_under_the_checkout(
    order: str,
    forced: bool,
    pg: Server,
    telemetry: Otel,
    sqlalchemy_instrumentor: SQLAlchemyInstrumentor,
) -> None:
    install_both(telemetry, order, _sa_instrument(sqlalchemy_instrumentor, telemetry, forced))

    async def main() -> int:
        engine = sqlalchemy.ext.asyncio.create_async_engine(pg.url("asyncpg"), pool_size=2)
        try:
            with telemetry.tracer.start_as_current_span("request") as request:
                async with engine.connect() as conn:
                    assert _name(trace.get_current_span()) == SPAN_NAME
                    await conn.exec_driver_sql("SELECT 42")
                assert trace.get_current_span() is request
                return request.get_span_context().span_id
        finally:
            await engine.dispose()

    request_id = asyncio.run(main())
    assert_nested(telemetry, request_id)
    _assert_connect_is_a_sibling(telemetry, request_id)
