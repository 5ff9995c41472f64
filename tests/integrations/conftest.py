"""Fixtures for the integration tests: a real PgBouncer in front of the session's server."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import pgleak
from pgleak.testing import EventCapture, capture_events
from tests.bouncer import PgBouncer, require_pgbouncer
from tests.conftest import Server

#: Client connections the session bouncer takes; the next one is refused with 08P01.
BOUNCER_MAX_CLIENT_CONN = 3


@pytest.fixture(scope="session")
def bouncer(pg: Server) -> Iterator[PgBouncer]:
    """PgBouncer (transaction pooling, ``max_client_conn=3``) in front of the session server.

    Skips when ``pgbouncer`` is not installed (CI installs it).
    """
    require_pgbouncer()
    with PgBouncer(
        pg.host,
        pg.port,
        user=pg.user,
        dbname=pg.dbname,
        max_client_conn=BOUNCER_MAX_CLIENT_CONN,
        default_pool_size=2,
    ) as running:
        yield running


@pytest.fixture
def retrying() -> Iterator[EventCapture]:
    """pgleak installed with fast retries and a long deadline; the events it emits."""
    pgleak.install(
        retry_deadline=5.0,
        retry_max_attempts=100,
        retry_base_delay=0.02,
        retry_max_delay=0.2,
        report_interval=60,
    )
    try:
        with capture_events() as events:
            yield events
    finally:
        pgleak.uninstall()
