"""pgleak's hard-coded OpenTelemetry names are the semantic conventions' own.

pgleak does not import ``opentelemetry-semantic-conventions`` at run time (it pins an exact
API version, which would pin the application's); this checks the strings against it instead,
so that a rename upstream shows up here.
"""

from __future__ import annotations

from typing import Any

import pytest

pytest.importorskip(
    "opentelemetry.semconv", reason="the OpenTelemetry test extras are not installed"
)

from opentelemetry.sdk.metrics import MeterProvider
from opentelemetry.semconv._incubating.attributes import db_attributes as db_incubating
from opentelemetry.semconv._incubating.metrics import db_metrics
from opentelemetry.semconv.attributes import (
    code_attributes,
    db_attributes,
    error_attributes,
    server_attributes,
)
from opentelemetry.semconv.schemas import Schemas

from pgleak import _otel_metrics, _otel_names


def test_attribute_names() -> None:
    assert _otel_names.DB_SYSTEM_NAME == db_attributes.DB_SYSTEM_NAME
    assert db_attributes.DbSystemNameValues.POSTGRESQL.value == _otel_names.POSTGRESQL
    assert _otel_names.DB_NAMESPACE == db_attributes.DB_NAMESPACE
    assert _otel_names.DB_RESPONSE_STATUS_CODE == db_attributes.DB_RESPONSE_STATUS_CODE
    assert _otel_names.POOL_NAME == db_incubating.DB_CLIENT_CONNECTION_POOL_NAME
    assert _otel_names.STATE == db_incubating.DB_CLIENT_CONNECTION_STATE
    assert db_incubating.DbClientConnectionStateValues.IDLE.value == _otel_names.IDLE
    assert db_incubating.DbClientConnectionStateValues.USED.value == _otel_names.USED
    assert _otel_names.SERVER_ADDRESS == server_attributes.SERVER_ADDRESS
    assert _otel_names.SERVER_PORT == server_attributes.SERVER_PORT
    assert _otel_names.CODE_FUNCTION_NAME == code_attributes.CODE_FUNCTION_NAME
    assert _otel_names.CODE_FILE_PATH == code_attributes.CODE_FILE_PATH
    assert _otel_names.CODE_LINE_NUMBER == code_attributes.CODE_LINE_NUMBER
    assert _otel_names.CODE_STACKTRACE == code_attributes.CODE_STACKTRACE
    assert _otel_names.ERROR_TYPE == error_attributes.ERROR_TYPE
    assert _otel_names.SCHEMA_URL in {schema.value for schema in Schemas}


# (pgleak's name, the semconv helper that creates the instrument, the kind pgleak uses for it)
METRICS = [
    (_otel_names.COUNT, db_metrics.create_db_client_connection_count, "up_down"),
    (_otel_names.MAX, db_metrics.create_db_client_connection_max, "up_down"),
    (_otel_names.IDLE_MAX, db_metrics.create_db_client_connection_idle_max, "up_down"),
    (_otel_names.IDLE_MIN, db_metrics.create_db_client_connection_idle_min, "up_down"),
    (
        _otel_names.PENDING_REQUESTS,
        db_metrics.create_db_client_connection_pending_requests,
        "up_down",
    ),
    (_otel_names.TIMEOUTS, db_metrics.create_db_client_connection_timeouts, "counter"),
    (_otel_names.CREATE_TIME, db_metrics.create_db_client_connection_create_time, "histogram"),
    (_otel_names.WAIT_TIME, db_metrics.create_db_client_connection_wait_time, "histogram"),
    (_otel_names.USE_TIME, db_metrics.create_db_client_connection_use_time, "histogram"),
]

#: An observable UpDownCounter reports the same OTLP data (a non-monotonic sum) as the
#: synchronous one the convention's helper creates.
KINDS = {
    "up_down": ("_UpDownCounter", "_ObservableUpDownCounter"),
    "counter": ("_Counter", "_Counter"),
    "histogram": ("_Histogram", "_Histogram"),
}


@pytest.mark.parametrize(("name", "create", "kind"), METRICS, ids=[m[0] for m in METRICS])
def test_metric_names_units_and_kinds(name: str, create: Any, kind: str) -> None:
    provider = MeterProvider()
    try:
        convention = create(provider.get_meter("semconv"))
        instruments = _otel_metrics._instruments(provider, "test")
        ours = (
            instruments.observable.get(name)
            or {
                _otel_names.TIMEOUTS: instruments.timeouts,
                _otel_names.CREATE_TIME: instruments.create_time,
                _otel_names.WAIT_TIME: instruments.wait_time,
                _otel_names.USE_TIME: instruments.use_time,
            }[name]
        )
        assert ours.name == convention.name == name
        assert ours.unit == convention.unit
        assert (type(convention).__name__, type(ours).__name__) == KINDS[kind]
    finally:
        provider.shutdown()
