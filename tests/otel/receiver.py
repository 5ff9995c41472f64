"""A real OTLP/HTTP receiver on loopback, for the "over the wire" tests.

The OpenTelemetry SDK's own ``OTLPSpanExporter`` / ``OTLPMetricExporter`` (protobuf over HTTP)
post to it exactly as they would to a collector: ``POST /v1/traces`` and ``POST /v1/metrics``,
``Content-Type: application/x-protobuf``, optionally gzip or deflate compressed. Each body is
decoded with ``opentelemetry-proto`` and kept; :meth:`OtlpReceiver.spans` and
:meth:`OtlpReceiver.metrics` flatten what arrived into plain records to assert on, and the
``wait_for_*`` methods block, with a bound, until enough of it has arrived.

It listens on ``127.0.0.1`` on a free port and talks to nothing else::

    with OtlpReceiver() as receiver:
        exporter = OTLPSpanExporter(endpoint=receiver.traces_endpoint)
        ...
        span = receiver.wait_for_spans(lambda s: s.name == "checkout")[0]
"""

from __future__ import annotations

import gzip
import http.server
import threading
import time
import zlib
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from google.protobuf.message import DecodeError
from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import (
    ExportMetricsServiceRequest,
    ExportMetricsServiceResponse,
)
from opentelemetry.proto.collector.trace.v1.trace_service_pb2 import (
    ExportTraceServiceRequest,
    ExportTraceServiceResponse,
)
from opentelemetry.proto.common.v1.common_pb2 import AnyValue, KeyValue
from opentelemetry.proto.metrics.v1.metrics_pb2 import Metric
from opentelemetry.proto.trace.v1.trace_pb2 import Span, Status

TRACES_PATH = "/v1/traces"
METRICS_PATH = "/v1/metrics"
_PROTOBUF = "application/x-protobuf"
_MAX_BODY = 64 * 1024 * 1024


def any_value(value: AnyValue) -> object:
    """The Python value an OTLP ``AnyValue`` carries (``None`` when it is empty)."""
    which = value.WhichOneof("value")
    if which is None:
        return None
    if which == "array_value":
        return [any_value(v) for v in value.array_value.values]
    if which == "kvlist_value":
        return attributes(value.kvlist_value.values)
    result: object = getattr(value, which)
    return result


def attributes(pairs: Iterable[KeyValue]) -> dict[str, object]:
    """OTLP ``repeated KeyValue`` as a dict."""
    return {kv.key: any_value(kv.value) for kv in pairs}


@dataclass(frozen=True)
class ReceivedSpan:
    """One span as it arrived, with its resource and instrumentation scope."""

    name: str
    kind: str  # "INTERNAL", "CLIENT", "SERVER", "PRODUCER", "CONSUMER" or "UNSPECIFIED"
    trace_id: str  # 32 hex digits
    span_id: str  # 16 hex digits
    parent_span_id: str | None
    start_time_unix_nano: int
    end_time_unix_nano: int
    status_code: str  # "UNSET", "OK" or "ERROR"
    status_message: str
    attributes: dict[str, object]
    events: list[tuple[str, dict[str, object]]]
    resource: dict[str, object]
    scope_name: str
    scope_version: str
    schema_url: str

    @property
    def duration_s(self) -> float:
        return (self.end_time_unix_nano - self.start_time_unix_nano) / 1e9


@dataclass(frozen=True)
class ReceivedPoint:
    """One data point: ``value`` for sums and gauges; count, sum and buckets for histograms."""

    attributes: dict[str, object]
    value: float | int | None = None
    count: int | None = None
    sum: float | None = None
    bucket_counts: list[int] = field(default_factory=list)
    explicit_bounds: list[float] = field(default_factory=list)
    start_time_unix_nano: int = 0
    time_unix_nano: int = 0


@dataclass(frozen=True)
class ReceivedMetric:
    """One metric of one export, with its resource and instrumentation scope.

    ``data`` is the OTLP data case: "sum", "gauge", "histogram", "exponential_histogram" or
    "summary". An UpDownCounter arrives as a non-monotonic "sum", a Counter as a monotonic one.
    """

    name: str
    unit: str
    description: str
    data: str
    is_monotonic: bool | None
    aggregation_temporality: str | None  # "CUMULATIVE" or "DELTA" for sums and histograms
    points: list[ReceivedPoint]
    resource: dict[str, object]
    scope_name: str


def _span_record(
    span: Span, resource: dict[str, object], scope: Any, schema_url: str
) -> ReceivedSpan:
    return ReceivedSpan(
        name=span.name,
        kind=Span.SpanKind.Name(span.kind).removeprefix("SPAN_KIND_"),
        trace_id=span.trace_id.hex(),
        span_id=span.span_id.hex(),
        parent_span_id=span.parent_span_id.hex() or None,
        start_time_unix_nano=span.start_time_unix_nano,
        end_time_unix_nano=span.end_time_unix_nano,
        status_code=Status.StatusCode.Name(span.status.code).removeprefix("STATUS_CODE_"),
        status_message=span.status.message,
        attributes=attributes(span.attributes),
        events=[(e.name, attributes(e.attributes)) for e in span.events],
        resource=resource,
        scope_name=scope.name,
        scope_version=scope.version,
        schema_url=schema_url,
    )


def _temporality(value: int) -> str:
    return ("UNSPECIFIED", "DELTA", "CUMULATIVE")[value] if 0 <= value <= 2 else str(value)


def _metric_record(metric: Metric, resource: dict[str, object], scope_name: str) -> ReceivedMetric:
    data = metric.WhichOneof("data") or ""
    points: list[ReceivedPoint] = []
    monotonic: bool | None = None
    temporality: str | None = None
    if data in ("sum", "gauge"):
        number_points = metric.sum.data_points if data == "sum" else metric.gauge.data_points
        if data == "sum":
            monotonic = metric.sum.is_monotonic
            temporality = _temporality(metric.sum.aggregation_temporality)
        for p in number_points:
            value: float | int = p.as_int if p.WhichOneof("value") == "as_int" else p.as_double
            points.append(
                ReceivedPoint(
                    attributes(p.attributes),
                    value=value,
                    start_time_unix_nano=p.start_time_unix_nano,
                    time_unix_nano=p.time_unix_nano,
                )
            )
    elif data == "histogram":
        temporality = _temporality(metric.histogram.aggregation_temporality)
        for h in metric.histogram.data_points:
            points.append(
                ReceivedPoint(
                    attributes(h.attributes),
                    count=h.count,
                    sum=h.sum if h.HasField("sum") else None,
                    bucket_counts=list(h.bucket_counts),
                    explicit_bounds=list(h.explicit_bounds),
                    start_time_unix_nano=h.start_time_unix_nano,
                    time_unix_nano=h.time_unix_nano,
                )
            )
    return ReceivedMetric(
        name=metric.name,
        unit=metric.unit,
        description=metric.description,
        data=data,
        is_monotonic=monotonic,
        aggregation_temporality=temporality,
        points=points,
        resource=resource,
        scope_name=scope_name,
    )


class OtlpReceiver:
    """An OTLP/HTTP (protobuf) endpoint on ``127.0.0.1``, in a thread of this process."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self._lock = threading.Condition()
        self.trace_requests: list[ExportTraceServiceRequest] = []
        self.metric_requests: list[ExportMetricsServiceRequest] = []
        #: ``(path, status, reason)`` of every request that was refused, for failing tests.
        self.rejected: list[tuple[str, int, str]] = []
        #: Request headers of every accepted export, oldest first.
        self.headers: list[Mapping[str, str]] = []
        self._server = http.server.ThreadingHTTPServer((host, port), self._handler_class())
        self._server.daemon_threads = True
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------

    def start(self) -> OtlpReceiver:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.05},
            name="otlp-receiver",
            daemon=True,
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(timeout=5)
            self._thread = None
        self._server.server_close()

    def __enter__(self) -> OtlpReceiver:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    # -- where to send ---------------------------------------------------------------------

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    @property
    def endpoint(self) -> str:
        """Base URL, as ``OTEL_EXPORTER_OTLP_ENDPOINT`` takes it."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def traces_endpoint(self) -> str:
        """Full URL, as ``OTLPSpanExporter(endpoint=...)`` takes it."""
        return self.endpoint + TRACES_PATH

    @property
    def metrics_endpoint(self) -> str:
        """Full URL, as ``OTLPMetricExporter(endpoint=...)`` takes it."""
        return self.endpoint + METRICS_PATH

    # -- what arrived ----------------------------------------------------------------------

    def spans(self) -> list[ReceivedSpan]:
        """Every span received so far, in arrival order."""
        with self._lock:
            requests = list(self.trace_requests)
        out: list[ReceivedSpan] = []
        for req in requests:
            for rs in req.resource_spans:
                resource = attributes(rs.resource.attributes)
                for ss in rs.scope_spans:
                    schema_url = ss.schema_url or rs.schema_url
                    out.extend(_span_record(s, resource, ss.scope, schema_url) for s in ss.spans)
        return out

    def metrics(self) -> list[ReceivedMetric]:
        """Every metric of every export received so far, in arrival order.

        Exports are cumulative by default, so the same metric comes once per export: the last
        record of a name is its latest state (see :meth:`latest_metric`).
        """
        with self._lock:
            requests = list(self.metric_requests)
        out: list[ReceivedMetric] = []
        for req in requests:
            for rm in req.resource_metrics:
                resource = attributes(rm.resource.attributes)
                for sm in rm.scope_metrics:
                    out.extend(_metric_record(m, resource, sm.scope.name) for m in sm.metrics)
        return out

    def latest_metric(self, name: str) -> ReceivedMetric | None:
        found = [m for m in self.metrics() if m.name == name]
        return found[-1] if found else None

    def wait_for_spans(
        self,
        predicate: Callable[[ReceivedSpan], bool] = lambda _s: True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[ReceivedSpan]:
        """The received spans that match, once at least ``count`` have; AssertionError after
        ``timeout`` seconds."""
        return self._wait(lambda: [s for s in self.spans() if predicate(s)], count, timeout)

    def wait_for_metrics(
        self,
        predicate: Callable[[ReceivedMetric], bool] = lambda _m: True,
        count: int = 1,
        timeout: float = 10.0,
    ) -> list[ReceivedMetric]:
        return self._wait(lambda: [m for m in self.metrics() if predicate(m)], count, timeout)

    def clear(self) -> None:
        with self._lock:
            self.trace_requests.clear()
            self.metric_requests.clear()
            self.rejected.clear()
            self.headers.clear()

    def _wait(self, collect: Callable[[], list[Any]], count: int, timeout: float) -> list[Any]:
        deadline = time.monotonic() + timeout
        while True:
            found = collect()
            if len(found) >= count:
                return found
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise AssertionError(
                    f"{len(found)} of {count} expected records arrived in {timeout}s "
                    f"(rejected requests: {self.rejected})"
                )
            with self._lock:
                self._lock.wait(min(remaining, 0.5))

    # -- the HTTP side ---------------------------------------------------------------------

    def _accept(self, path: str, body: bytes, headers: Mapping[str, str]) -> bytes:
        if path == TRACES_PATH:
            traces = ExportTraceServiceRequest()
            traces.ParseFromString(body)
            with self._lock:
                self.trace_requests.append(traces)
                self.headers.append(headers)
                self._lock.notify_all()
            return ExportTraceServiceResponse().SerializeToString()
        metrics = ExportMetricsServiceRequest()
        metrics.ParseFromString(body)
        with self._lock:
            self.metric_requests.append(metrics)
            self.headers.append(headers)
            self._lock.notify_all()
        return ExportMetricsServiceResponse().SerializeToString()

    def _reject(self, path: str, status: int, reason: str) -> None:
        with self._lock:
            self.rejected.append((path, status, reason))
            self._lock.notify_all()

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        receiver = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"  # keep-alive, as the exporter's session expects

            def do_POST(self) -> None:
                path = self.path.split("?", 1)[0]
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length) if 0 < length <= _MAX_BODY else b""
                if path not in (TRACES_PATH, METRICS_PATH):
                    return self._refuse(path, 404, "no such OTLP path")
                ctype = (self.headers.get("Content-Type") or "").split(";")[0].strip()
                if ctype != _PROTOBUF:
                    return self._refuse(path, 415, f"content type {ctype!r}")
                encoding = (self.headers.get("Content-Encoding") or "").strip().lower()
                try:
                    if encoding == "gzip":
                        body = gzip.decompress(body)
                    elif encoding == "deflate":
                        body = zlib.decompress(body)
                    elif encoding not in ("", "identity"):
                        return self._refuse(path, 415, f"content encoding {encoding!r}")
                    reply = receiver._accept(path, body, dict(self.headers.items()))
                except (DecodeError, OSError, EOFError, zlib.error) as err:
                    return self._refuse(path, 400, f"undecodable body: {err!r}")
                self.send_response(200)
                self.send_header("Content-Type", _PROTOBUF)
                self.send_header("Content-Length", str(len(reply)))
                self.end_headers()
                self.wfile.write(reply)
                return None

            def _refuse(self, path: str, status: int, reason: str) -> None:
                receiver._reject(path, status, reason)
                payload = reason.encode()
                self.send_response(status)
                self.send_header("Content-Type", "text/plain")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # quiet: pytest shows the assertion, not the access log

        return Handler
