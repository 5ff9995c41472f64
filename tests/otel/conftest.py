"""Fixtures for the OpenTelemetry tests: pgleak installed with in-memory SDK providers.

Each test gets its own ``TracerProvider`` (spans kept in memory, handed over as each ends) and
``MeterProvider`` (an in-memory reader, collected on demand), passed to ``pgleak.install()``
the way an application passes them to the contrib instrumentations. The global providers are
never set here: a process can set them only once, so tests that need them run in a
subprocess.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry test extras are not installed")

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor, SpanExporter, SpanExportResult
from opentelemetry.trace import Tracer

import pgleak
from pgleak._otel import SPAN_NAME
from pgleak.testing import EventCapture, capture_events


class SpanCollector(SpanExporter):
    """Keeps every finished span and wakes whoever waits for one (no polling with sleeps)."""

    def __init__(self) -> None:
        self._cond = threading.Condition()
        self.finished: list[ReadableSpan] = []

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        with self._cond:
            self.finished.extend(spans)
            self._cond.notify_all()
        return SpanExportResult.SUCCESS

    def spans(self, name: str | None = SPAN_NAME) -> list[ReadableSpan]:
        with self._cond:
            return [s for s in self.finished if name is None or s.name == name]

    def clear(self) -> None:
        with self._cond:
            self.finished.clear()

    def wait_for(
        self,
        predicate: Callable[[ReadableSpan], bool] = lambda _s: True,
        count: int = 1,
        name: str | None = SPAN_NAME,
        timeout: float = 10.0,
    ) -> list[ReadableSpan]:
        """The finished spans that match, once there are at least ``count``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                found = [
                    s for s in self.finished if (name is None or s.name == name) and predicate(s)
                ]
                if len(found) >= count:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    names = [s.name for s in self.finished]
                    raise AssertionError(
                        f"{len(found)} of {count} spans within {timeout}s: {names}"
                    )
                self._cond.wait(remaining)


class Otel:
    """What a test inspects: finished spans, collected metrics, and a tracer of its own."""

    def __init__(self) -> None:
        self.collector = SpanCollector()
        self.tracer_provider = TracerProvider()
        self.tracer_provider.add_span_processor(SimpleSpanProcessor(self.collector))
        self.reader = InMemoryMetricReader()
        self.meter_provider = MeterProvider(metric_readers=[self.reader])
        #: The application's own tracer, for the "request" spans checkouts nest under.
        self.tracer: Tracer = self.tracer_provider.get_tracer("tests")

    def spans(self, name: str | None = SPAN_NAME) -> list[ReadableSpan]:
        return self.collector.spans(name)

    def metrics(self) -> dict[str, Any]:
        """Metric name -> the metric (name, unit, data), as the reader collects them now."""
        data = self.reader.get_metrics_data()
        out: dict[str, Any] = {}
        if data is None:
            return out
        for resource_metrics in data.resource_metrics:
            for scope_metrics in resource_metrics.scope_metrics:
                for metric in scope_metrics.metrics:
                    out[metric.name] = metric
        return out

    def collect(self) -> dict[str, list[Any]]:
        """Metric name -> its data points, as the reader collects them now."""
        return {name: list(m.data.data_points) for name, m in self.metrics().items()}

    def points(self, name: str, **attributes: Any) -> list[Any]:
        """Data points of ``name`` whose attributes include ``attributes`` (dots as ``__``)."""
        wanted = {key.replace("__", "."): value for key, value in attributes.items()}
        return [
            p
            for p in self.collect().get(name, [])
            if all(p.attributes.get(k) == v for k, v in wanted.items())
        ]

    def value(self, name: str, pool: str, **attributes: Any) -> Any:
        """The one value (sum, gauge) or count (histogram) of ``name`` for ``pool``."""
        found = self.points(name, db__client__connection__pool__name=pool, **attributes)
        assert len(found) == 1, f"{name} for {pool} {attributes}: {found}"
        point = found[0]
        return point.count if hasattr(point, "bucket_counts") else point.value

    def shutdown(self) -> None:
        self.tracer_provider.shutdown()
        self.meter_provider.shutdown()


def statement(span: ReadableSpan) -> str:
    """The query text of a contrib instrumentation's span (old or new semantic conventions)."""
    attrs = span.attributes or {}
    return str(attrs.get("db.statement") or attrs.get("db.query.text") or "")


@pytest.fixture
def telemetry() -> Iterator[Otel]:
    """Providers only, for tests that install pgleak (and instrumentations) themselves."""
    made = Otel()
    try:
        yield made
    finally:
        pgleak.uninstall()
        made.shutdown()


@pytest.fixture
def otel(leak_threshold: float) -> Iterator[Otel]:
    """pgleak installed with this test's own providers; removed afterwards."""
    telemetry = Otel()
    pgleak.install(
        leak_threshold=leak_threshold,
        report_interval=60,
        tracer_provider=telemetry.tracer_provider,
        meter_provider=telemetry.meter_provider,
    )
    try:
        yield telemetry
    finally:
        pgleak.uninstall()
        telemetry.shutdown()


@pytest.fixture
def otel_events(otel: Otel) -> Iterator[EventCapture]:
    with capture_events() as captured:
        yield captured
