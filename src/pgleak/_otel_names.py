"""The names pgleak's spans and metrics carry: OpenTelemetry's semantic conventions and its own.

Hard-coded rather than imported from ``opentelemetry-semantic-conventions``, which pins an exact
API version; ``tests/otel/test_names.py`` checks them against it. A module of its own so that
the span side (:mod:`pgleak._otel`) and the metrics side (:mod:`pgleak._otel_metrics`) share
one spelling of each.
"""

from __future__ import annotations

from typing import Final

#: The instrumentation scope (tracer and meter name).
SCOPE: Final = "pgleak"
#: The semantic-conventions version whose names pgleak uses.
SCHEMA_URL: Final = "https://opentelemetry.io/schemas/1.44.0"
#: The checkout span. No convention exists for connection checkouts; the name says whose it is.
SPAN_NAME: Final = "pgleak.checkout"

# -- semantic-convention attributes -------------------------------------------------------------
DB_SYSTEM_NAME: Final = "db.system.name"
POSTGRESQL: Final = "postgresql"
DB_NAMESPACE: Final = "db.namespace"
DB_RESPONSE_STATUS_CODE: Final = "db.response.status_code"
POOL_NAME: Final = "db.client.connection.pool.name"
STATE: Final = "db.client.connection.state"
IDLE: Final = "idle"
USED: Final = "used"
SERVER_ADDRESS: Final = "server.address"
SERVER_PORT: Final = "server.port"
CODE_FUNCTION_NAME: Final = "code.function.name"
CODE_FILE_PATH: Final = "code.file.path"
CODE_LINE_NUMBER: Final = "code.line.number"
CODE_STACKTRACE: Final = "code.stacktrace"
ERROR_TYPE: Final = "error.type"

# -- semantic-convention metrics (``db.client.connection.*``, Development stability) ------------
COUNT: Final = "db.client.connection.count"
MAX: Final = "db.client.connection.max"
IDLE_MAX: Final = "db.client.connection.idle.max"
IDLE_MIN: Final = "db.client.connection.idle.min"
PENDING_REQUESTS: Final = "db.client.connection.pending_requests"
TIMEOUTS: Final = "db.client.connection.timeouts"
CREATE_TIME: Final = "db.client.connection.create_time"
WAIT_TIME: Final = "db.client.connection.wait_time"
USE_TIME: Final = "db.client.connection.use_time"

# -- pgleak's own -------------------------------------------------------------------------------
#: Counter: leaks reported, by ``pgleak.leak.kind``.
LEAKS: Final = "pgleak.connection.leaks"
#: UpDownCounter: checkouts held past their threshold and not returned yet.
SUSPECTED_NOW: Final = "pgleak.connection.suspected"
LEAK_KIND: Final = "pgleak.leak.kind"
#: Span attribute: the most serious leak event the checkout had.
LEAK: Final = "pgleak.leak"

#: Histogram buckets, seconds: a wait is usually well under a millisecond, a hold a few ms, a
#: leak minutes. (The SDK's default buckets are made for milliseconds.)
BUCKETS: Final = (
    0.0001,
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    300.0,
)
