"""Over the wire: pgleak's spans and metrics through the SDK's real OTLP/HTTP exporters.

The exporters post protobuf to a receiver on loopback (``receiver.py``) exactly as they would
to a collector; what arrives is decoded and checked. This is what a backend gets: span kind,
parentage, typed attributes, the leak event with its stack, the resource, metric types.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.exporter.otlp.proto.http", reason="OpenTelemetry test extras")

from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import BatchSpanProcessor

import pgleak
from pgleak import _otel, _otel_names
from pgleak.testing import capture_events
from tests.conftest import Server
from tests.helpers import site_of

from .receiver import OtlpReceiver

_PROXIES = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    for name in _PROXIES:  # requests, under the exporter, honours them: loopback stays loopback
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with OtlpReceiver() as rx:
        yield rx


def test_a_leak_trace_and_the_pool_metrics_reach_a_collector(
    pg: Server, receiver: OtlpReceiver
) -> None:
    from psycopg_pool import ConnectionPool

    resource = Resource.create({"service.name": "shop-api"})
    tracer_provider = TracerProvider(resource=resource)
    # The processor applications use: spans leave in batches, from a thread of the SDK's.
    tracer_provider.add_span_processor(
        BatchSpanProcessor(OTLPSpanExporter(endpoint=receiver.traces_endpoint, timeout=5))
    )
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=receiver.metrics_endpoint, timeout=5),
        export_interval_millis=3_600_000,  # exported on force_flush() only
    )
    meter_provider = MeterProvider(metric_readers=[reader], resource=resource)
    tracer = tracer_provider.get_tracer("shop")
    pgleak.install(
        leak_threshold=0.2, tracer_provider=tracer_provider, meter_provider=meter_provider
    )
    try:
        with (
            capture_events() as events,
            ConnectionPool(pg.dsn, min_size=1, max_size=4, open=True) as pool,
        ):
            with tracer.start_as_current_span("GET /orders"):
                with pool.connection() as conn:  # HELD
                    conn.execute("select 1")
                    events.wait_for("leak.suspected")
                events.wait_for("leak.returned")
            leaked = pool.getconn()  # LEAKED
            assert pgleak.checked_out()
            assert meter_provider.force_flush(timeout_millis=10_000)
            while_leaked = receiver.metrics()  # exported while LEAKED was out
            pool.putconn(leaked)
        assert tracer_provider.force_flush(timeout_millis=10_000)
    finally:
        pgleak.uninstall()
        tracer_provider.shutdown()
        meter_provider.shutdown()

    spans = receiver.wait_for_spans(lambda s: s.name == _otel.SPAN_NAME, count=2)
    request = receiver.wait_for_spans(lambda s: s.name == "GET /orders")[0]
    held = next(s for s in spans if s.events)
    assert held.kind == "INTERNAL"
    assert held.parent_span_id == request.span_id
    assert held.trace_id == request.trace_id
    assert (held.scope_name, held.scope_version) == ("pgleak", pgleak.__version__)
    assert held.schema_url == _otel_names.SCHEMA_URL
    assert held.resource["service.name"] == "shop-api"
    assert held.status_code == "UNSET"
    attrs = held.attributes
    assert attrs["db.system.name"] == "postgresql"
    assert attrs["server.address"] == pg.host
    assert attrs["server.port"] == pg.port  # an int on the wire, not a string
    assert attrs["db.namespace"] == pg.dbname
    assert f"{attrs['code.file.path']}:{attrs['code.line.number']}" == site_of("HELD")
    assert attrs["code.function.name"] == (
        "test_a_leak_trace_and_the_pool_metrics_reach_a_collector"
    )
    assert attrs["pgleak.leak"] == "leak.suspected"
    assert isinstance(attrs["pgleak.held_s"], float)
    assert held.duration_s >= 0.2
    [(name, details)] = held.events
    assert name == "leak.suspected"
    assert str(details["code.stacktrace"]).splitlines()[-1].startswith(site_of("HELD") + " in ")
    assert details["pgleak.threshold_s"] == pytest.approx(0.2)

    bare = next(s for s in spans if s is not held)
    assert bare.parent_span_id is None  # no request around it: a trace of its own
    assert f"{bare.attributes['code.file.path']}:{bare.attributes['code.line.number']}" == (
        site_of("LEAKED")
    )

    pool_name = attrs["db.client.connection.pool.name"]
    [count] = [m for m in while_leaked if m.name == _otel_names.COUNT]
    assert (count.data, count.is_monotonic, count.unit) == ("sum", False, "{connection}")
    used = [
        p.value
        for p in count.points
        if p.attributes
        == {"db.client.connection.pool.name": pool_name, "db.client.connection.state": "used"}
    ]
    assert used == [1]  # the connection taken at LEAKED, out when the metrics were exported
    # At shutdown, the SDK exports once more: LEAKED is back by then.
    leaks = receiver.latest_metric(_otel_names.LEAKS)
    assert leaks is not None
    assert (leaks.data, leaks.is_monotonic) == ("sum", True)
    assert [(p.attributes["pgleak.leak.kind"], p.value) for p in leaks.points] == [("suspected", 1)]
    use_time = receiver.latest_metric(_otel_names.USE_TIME)
    assert use_time is not None
    [point] = use_time.points
    assert point.count == 2
    assert point.explicit_bounds == list(_otel_names.BUCKETS)
    assert point.sum is not None
    assert point.sum >= 0.2
    assert not receiver.rejected
