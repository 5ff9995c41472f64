"""Django's checkouts become OpenTelemetry spans and metrics like every other adapter's.

Run in a subprocess of its own (Django's settings are process-wide), with the SDK's in-memory
exporter and reader; the child prints what they hold as JSON.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from typing import Any

import pytest

from tests.conftest import Server
from tests.django_site.server import ROOT

SCRIPT = """
import json, os, sys
import django
from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.sdk.metrics.export import InMemoryMetricReader
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

import pgleak

exporter, reader = InMemorySpanExporter(), InMemoryMetricReader()
tracer_provider = TracerProvider()
tracer_provider.add_span_processor(SimpleSpanProcessor(exporter))
meter_provider = MeterProvider(metric_readers=[reader])
pgleak.install(tracer_provider=tracer_provider, meter_provider=meter_provider)
django.setup()
from django.db import connection

with pgleak.context("job nightly-report"):
    with connection.cursor() as cursor:  # THE CHECKOUT
        cursor.execute("select 1")
    connection.close()

spans = [
    {"name": s.name, "kind": s.kind.name, "attributes": dict(s.attributes or {})}
    for s in exporter.get_finished_spans()
]
data = reader.get_metrics_data()
metrics = sorted(
    m.name for rm in data.resource_metrics for sm in rm.scope_metrics for m in sm.metrics
)
print(json.dumps({"spans": spans, "metrics": metrics}))
"""


def _run(pg: Server, pool: bool) -> dict[str, Any]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DJANGO_SITE_")}
    env.update(
        PYTHONPATH=str(ROOT),
        DJANGO_SETTINGS_MODULE="tests.django_site.settings",
        DJANGO_SITE_DB_HOST=pg.host,
        DJANGO_SITE_DB_PORT=str(pg.port),
        DJANGO_SITE_DB_USER=pg.user,
        DJANGO_SITE_DB_NAME=pg.dbname,
    )
    if pool:
        env["DJANGO_SITE_POOL"] = json.dumps({"min_size": 0, "max_size": 2})
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    result: dict[str, Any] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


@pytest.mark.parametrize("pool", [False, True], ids=["direct", "native-pool"])
def test_django_checkouts_are_spans_and_metrics(pg: Server, pool: bool) -> None:
    out = _run(pg, pool)
    lines = SCRIPT.splitlines()
    checkout_line = 1 + lines.index(next(x for x in lines if x.endswith("# THE CHECKOUT")))
    spans = [s for s in out["spans"] if s["name"] == "pgleak.checkout"]
    (span,) = [s for s in spans if s["attributes"].get("code.line.number") == checkout_line]
    attrs = span["attributes"]
    assert span["kind"] == "INTERNAL"
    assert attrs["db.system.name"] == "postgresql"
    assert str(attrs["db.client.connection.pool.name"]).startswith("django 'default'")
    assert attrs["code.file.path"] == "<string>"
    assert attrs["pgleak.context"] == "job nightly-report"
    assert "db.client.connection.count" in out["metrics"]
    assert "db.client.connection.use_time" in out["metrics"]
