"""The Phoenix harness itself: a span sent by the real OTLP/HTTP exporter is read back.

Opt-in: runs only when ``$PGLEAK_PHOENIX_PYTHON`` names the Python of a venv where
``arize-phoenix`` is installed (``python -m venv /tmp/phoenix-venv &&
/tmp/phoenix-venv/bin/pip install arize-phoenix``). About 10 s: Phoenix's cold start.
"""

from __future__ import annotations

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry test extras are not installed")

from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind

from .phoenix import PHOENIX_PYTHON_ENV, PROJECT_HEADER, phoenix_python, run_phoenix

pytestmark = [
    pytest.mark.phoenix,
    pytest.mark.skipif(
        phoenix_python() is None, reason=f"opt-in: set {PHOENIX_PYTHON_ENV} to run Phoenix"
    ),
]


@pytest.mark.timeout(180)
def test_span_round_trip_through_phoenix() -> None:
    project = "pgleak-harness"
    with run_phoenix() as phoenix:
        provider = TracerProvider()
        exporter = OTLPSpanExporter(
            endpoint=phoenix.traces_endpoint, headers={PROJECT_HEADER: project}, timeout=10
        )
        provider.add_span_processor(SimpleSpanProcessor(exporter))
        tracer = provider.get_tracer("pgleak")
        try:
            with tracer.start_as_current_span(
                "checkout pool-a",
                kind=SpanKind.INTERNAL,
                attributes={"db.system.name": "postgresql", "server.port": 5432},
            ) as outer:
                with tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT):
                    pass
                outer_id = format(outer.get_span_context().span_id, "016x")
        finally:
            provider.shutdown()

        spans = {s["name"]: s for s in phoenix.wait_for_spans(project, count=2)}
        assert spans["checkout pool-a"]["context"]["span_id"] == outer_id
        assert spans["checkout pool-a"]["parent_id"] is None
        assert spans["SELECT"]["parent_id"] == outer_id
        assert spans["checkout pool-a"]["attributes"] == {
            "db.system.name": "postgresql",
            "server.port": 5432,
        }
        assert phoenix.spans("no-such-project") == []
