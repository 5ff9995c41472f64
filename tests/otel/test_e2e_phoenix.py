"""End to end: a leaky app's traces, as a real trace backend (Arize Phoenix) stores them.

Opt-in, because Phoenix is big (~850 MB in a venv of its own): ``scripts/e2e-phoenix`` makes
that venv and runs this module, or set ``PGLEAK_PHOENIX_PYTHON`` to the Python of a venv where
``arize-phoenix`` is installed and run ``pytest -m phoenix``. Phoenix is served on 127.0.0.1
(see ``phoenix.py``); the spans go through the SDK's real OTLP/HTTP exporter and are read back
over Phoenix's REST API.

The app is what pgleak is for: a request that holds a connection too long, and one that drops
its connection on the floor, with the psycopg instrumentation tracing the queries.
"""

from __future__ import annotations

import gc
from typing import Any

import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="OpenTelemetry test extras")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import pgleak
from pgleak._otel import SPAN_NAME
from pgleak.testing import capture_events
from tests.conftest import Server
from tests.helpers import site_of

from .phoenix import PHOENIX_PYTHON_ENV, PROJECT_HEADER, phoenix_python, run_phoenix

pytestmark = [
    pytest.mark.phoenix,
    pytest.mark.skipif(
        phoenix_python() is None,
        reason=f"opt-in: scripts/e2e-phoenix, or set {PHOENIX_PYTHON_ENV} and run -m phoenix",
    ),
]

PROJECT = "pgleak-e2e"
Span = dict[str, Any]


def _app(pg: Server, tracer_provider: TracerProvider) -> None:
    """Two requests: one holds its connection past the threshold, one leaks it."""
    from psycopg_pool import ConnectionPool

    tracer = tracer_provider.get_tracer("shop")
    with (
        capture_events() as events,
        ConnectionPool(pg.dsn, min_size=1, max_size=2, open=True) as pool,
    ):
        with tracer.start_as_current_span("GET /orders/42"):  # noqa: SIM117 (the block's line)
            with pool.connection() as conn:  # SLOW
                conn.execute("SELECT 42").fetchone()
                events.wait_for("leak.suspected")
        events.wait_for("leak.returned")

        def report() -> None:
            conn = pool.getconn()  # LEAKED
            conn.execute("SELECT 43").fetchone()

        with tracer.start_as_current_span("GET /report"):
            report()  # and the connection is never returned
        gc.collect()
        events.wait_for("leak.collected")


@pytest.mark.timeout(240)
def test_a_leak_trace_in_phoenix(pg: Server) -> None:
    with run_phoenix() as phoenix:
        provider = TracerProvider(resource=Resource.create({"service.name": "shop-api"}))
        provider.add_span_processor(
            BatchSpanProcessor(
                OTLPSpanExporter(
                    endpoint=phoenix.traces_endpoint, headers={PROJECT_HEADER: PROJECT}, timeout=10
                )
            )
        )
        instrumentor = PsycopgInstrumentor()
        instrumentor.instrument(tracer_provider=provider)
        pgleak.install(leak_threshold=0.3, tracer_provider=provider)
        try:
            _app(pg, provider)
        finally:
            pgleak.uninstall()
            instrumentor.uninstrument()
            provider.shutdown()  # flushes

        spans = phoenix.wait_for_spans(
            PROJECT, count=2, predicate=lambda s: s["name"] == SPAN_NAME, timeout=60
        )
        everything = phoenix.wait_for_spans(PROJECT, count=6, timeout=60)

    by_id = {s["context"]["span_id"]: s for s in everything}
    requests = {s["name"]: s for s in everything if s["name"].startswith("GET ")}
    slow = _child(spans, requests["GET /orders/42"])
    leaked = _child(spans, requests["GET /report"])

    # The held-too-long checkout: the query inside the block is its child.
    query = next(s for s in everything if s["parent_id"] == slow["context"]["span_id"])
    assert "SELECT 42" in str(query["attributes"].get("db.statement"))
    attrs = slow["attributes"]
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["server.port"] == pg.port
    assert attrs["db.namespace"] == pg.dbname
    assert f"{attrs['code.file.path']}:{attrs['code.line.number']}" == site_of("SLOW")
    assert attrs["pgleak.leak"] == "leak.suspected"
    assert attrs["pgleak.held_s"] >= 0.3
    assert slow["status_code"] == "UNSET"
    [event] = slow["events"]
    assert event["name"] == "leak.suspected"
    stack = str(event["attributes"]["code.stacktrace"]).splitlines()
    assert stack[-1].startswith(site_of("SLOW") + " in ")

    # The dropped connection: an error span, named by the line that took it.
    assert leaked["status_code"] == "ERROR"
    assert "garbage-collected" in leaked["status_message"]
    assert leaked["attributes"]["error.type"] == "leak.collected"
    assert (
        f"{leaked['attributes']['code.file.path']}:"
        f"{leaked['attributes']['code.line.number']}" == (site_of("LEAKED"))
    )
    assert [e["name"] for e in leaked["events"]] == ["leak.collected"]
    # Its query is not under it (a bare getconn() has no block to be current in), but under
    # the request, in the same trace.
    query = next(s for s in everything if "SELECT 43" in str(s["attributes"].get("db.statement")))
    assert by_id[query["parent_id"]]["name"] == "GET /report"
    assert query["context"]["trace_id"] == leaked["context"]["trace_id"]


def _child(spans: list[Span], parent: Span) -> Span:
    [child] = [s for s in spans if s["parent_id"] == parent["context"]["span_id"]]
    return child
