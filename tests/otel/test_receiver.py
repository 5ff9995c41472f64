"""The loopback OTLP receiver decodes what the SDK's real OTLP/HTTP exporters send.

No PostgreSQL and no pgleak here: this proves the test harness, so that a failing
over-the-wire test of pgleak's spans and metrics points at pgleak, not at the receiver.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry test extras are not installed")

from opentelemetry.exporter.otlp.proto.http import Compression
from opentelemetry.exporter.otlp.proto.http.metric_exporter import OTLPMetricExporter
from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import PeriodicExportingMetricReader
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.trace import SpanKind, StatusCode

from .receiver import OtlpReceiver

_ENV = ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy")


@pytest.fixture
def receiver(monkeypatch: pytest.MonkeyPatch) -> Iterator[OtlpReceiver]:
    # requests (under the exporter) honours proxy variables: loopback must stay loopback.
    for name in _ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("NO_PROXY", "127.0.0.1,localhost")
    with OtlpReceiver() as rx:
        yield rx


@pytest.mark.parametrize("compression", [Compression.NoCompression, Compression.Gzip])
def test_spans_cross_the_wire(receiver: OtlpReceiver, compression: Compression) -> None:
    provider = TracerProvider(resource=Resource.create({"service.name": "pgleak-tests"}))
    exporter = OTLPSpanExporter(
        endpoint=receiver.traces_endpoint, timeout=5, compression=compression
    )
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracer = provider.get_tracer("pgleak", "0.1.0")
    try:
        with tracer.start_as_current_span(
            "checkout pool-a",
            kind=SpanKind.INTERNAL,
            attributes={
                "db.system.name": "postgresql",
                "server.port": 5432,
                "pgleak.held_s": 0.25,
                "pgleak.leaked": False,
                "code.stacktrace": "a\nb",
            },
        ) as outer:
            with tracer.start_as_current_span("SELECT", kind=SpanKind.CLIENT):
                pass
            outer.add_event("pgleak.leak", {"pgleak.threshold_s": 1.0})
            outer.set_status(StatusCode.ERROR, "leaked")
    finally:
        provider.shutdown()

    spans = receiver.wait_for_spans(count=2)
    by_name = {s.name: s for s in spans}
    checkout, query = by_name["checkout pool-a"], by_name["SELECT"]
    assert checkout.kind == "INTERNAL"
    assert query.kind == "CLIENT"
    assert query.parent_span_id == checkout.span_id
    assert query.trace_id == checkout.trace_id
    assert checkout.parent_span_id is None
    assert checkout.attributes == {
        "db.system.name": "postgresql",
        "server.port": 5432,
        "pgleak.held_s": 0.25,
        "pgleak.leaked": False,
        "code.stacktrace": "a\nb",
    }
    assert checkout.events == [("pgleak.leak", {"pgleak.threshold_s": 1.0})]
    assert (checkout.status_code, checkout.status_message) == ("ERROR", "leaked")
    assert checkout.resource["service.name"] == "pgleak-tests"
    assert (checkout.scope_name, checkout.scope_version) == ("pgleak", "0.1.0")
    assert checkout.duration_s >= 0
    assert not receiver.rejected
    if compression is Compression.Gzip:
        assert all(h.get("Content-Encoding") == "gzip" for h in receiver.headers)


def test_metrics_cross_the_wire(receiver: OtlpReceiver) -> None:
    reader = PeriodicExportingMetricReader(
        OTLPMetricExporter(endpoint=receiver.metrics_endpoint, timeout=5),
        export_interval_millis=3_600_000,  # exports happen on force_flush() only
    )
    provider = MeterProvider(metric_readers=[reader])
    meter = provider.get_meter("pgleak")
    count = meter.create_up_down_counter("db.client.connection.count", unit="{connection}")
    timeouts = meter.create_counter("db.client.connection.timeouts", unit="{timeout}")
    wait = meter.create_histogram("db.client.connection.wait_time", unit="s")
    pool = {"db.client.connection.pool.name": "pool-a"}
    try:
        count.add(2, {**pool, "db.client.connection.state": "idle"})
        count.add(1, {**pool, "db.client.connection.state": "used"})
        count.add(-1, {**pool, "db.client.connection.state": "idle"})
        timeouts.add(1, pool)
        wait.record(0.004, pool)
        wait.record(0.5, pool)
        assert provider.force_flush(timeout_millis=10_000)
    finally:
        provider.shutdown()

    receiver.wait_for_metrics(lambda m: m.name == "db.client.connection.wait_time")
    conns = receiver.latest_metric("db.client.connection.count")
    assert conns is not None
    assert (conns.data, conns.is_monotonic, conns.unit) == ("sum", False, "{connection}")
    by_state = {p.attributes["db.client.connection.state"]: p.value for p in conns.points}
    assert by_state == {"idle": 1, "used": 1}
    assert all(p.attributes["db.client.connection.pool.name"] == "pool-a" for p in conns.points)

    outs = receiver.latest_metric("db.client.connection.timeouts")
    assert outs is not None
    assert (outs.data, outs.is_monotonic, outs.points[0].value) == ("sum", True, 1)

    hist = receiver.latest_metric("db.client.connection.wait_time")
    assert hist is not None
    assert (hist.data, hist.unit, hist.aggregation_temporality) == ("histogram", "s", "CUMULATIVE")
    (point,) = hist.points
    assert point.count == 2
    assert point.sum == pytest.approx(0.504)
    assert sum(point.bucket_counts) == 2
    assert not receiver.rejected


def test_refuses_what_is_not_otlp_protobuf(receiver: OtlpReceiver) -> None:
    import urllib.error
    import urllib.request

    def post(path: str, body: bytes, ctype: str) -> int:
        req = urllib.request.Request(
            receiver.endpoint + path, data=body, headers={"Content-Type": ctype}, method="POST"
        )
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as err:
            return err.code

    assert post("/v1/traces", b"{}", "application/json") == 415
    assert post("/v1/logs", b"", "application/x-protobuf") == 404
    assert post("/v1/traces", b"\xff\xff\xff", "application/x-protobuf") == 400
    assert [status for _, status, _ in receiver.rejected] == [415, 404, 400]
    assert receiver.spans() == []
