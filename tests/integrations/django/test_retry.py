"""A Django request refused with 53300 ("too many clients") at connection time, for real.

A dedicated server with ``max_connections=3`` is filled with direct connections; a request
to the Django project must then be refused by PostgreSQL, retried by pgleak (direct
connections: per request and persistent), and answered once the test frees a slot, which it
does only after the first ``connect.retry`` is in the server's log. With the native pool the
pool connects in its own workers, with its own backoff: pgleak adds no retry loop there.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from pgleak.embedded import EmbeddedPostgres
from tests.conftest import Server
from tests.django_site.server import Kind
from tests.integrations.django.sites import (
    APP,
    KINDS,
    Sites,
    database,
    full,
    request_freeing_a_slot_when,
    shared_sites,
)

MAX = 3
RETRY = {
    "retry_deadline": 2.0,
    "retry_max_attempts": 100,
    "retry_base_delay": 0.02,
    "retry_max_delay": 0.2,
    "report_interval": 0.01,
}


@pytest.fixture(scope="module")
def small() -> Iterator[Server]:
    with EmbeddedPostgres(max_connections=MAX) as srv:
        yield Server(srv.host, srv.port, srv.user, srv.dbname, MAX)


@pytest.fixture
def sites(small: Server, tmp_path: Path) -> Iterator[Sites]:
    """Servers of the test's own: a persistent connection left by another test would let a
    request through without connecting, and take a slot the test means to fill."""
    with shared_sites(small, tmp_path, extra_apps=(APP,), pgleak=RETRY) as sites:
        yield sites


@pytest.mark.parametrize("mode", ["per-request", "persistent"])
@pytest.mark.parametrize("kind", KINDS)
def test_refused_connect_is_retried_until_a_slot_frees(
    small: Server, sites: Sites, kind: Kind, mode: str
) -> None:
    server = sites.get(kind, mode)
    mark = server.mark()
    with full(small.dsn, MAX, "too many clients") as conns:
        reply = request_freeing_a_slot_when(
            server, conns, lambda: server.events("connect.retry", since=mark)
        )
    assert reply.status == 200, server.log_tail()
    assert reply.json()["pid"] > 0
    retries = server.events("connect.retry", since=mark)
    assert {e["sqlstate"] for e in retries} == {"53300"}
    assert all(e["pool"].startswith(database(mode)) for e in retries)
    assert all("too many clients" in e["detail"] for e in retries)
    assert not server.events("connect.gave_up", since=mark)


def test_gives_up_at_the_deadline_with_djangos_own_error(small: Server, sites: Sites) -> None:
    server = sites.get("wsgi", "per-request")
    mark = server.mark()
    with full(small.dsn, MAX, "too many clients"):
        reply = server.get("/query/", timeout=30)
    assert reply.status == 500
    (gave_up,) = server.events("connect.gave_up", since=mark)
    assert gave_up["reason"] == "deadline"
    assert gave_up["sqlstate"] == "53300"
    assert len(server.events("connect.retry", since=mark)) >= 2
    # What the application sees is Django's error, as without pgleak.
    log = server.log_path.read_bytes()[mark:].decode()
    assert "django.db.utils.OperationalError" in log
    assert "too many clients already" in log


@pytest.mark.parametrize("kind", KINDS)
def test_native_pool_reconnects_by_itself_and_pgleak_adds_no_retry(
    small: Server, sites: Sites, kind: Kind
) -> None:
    # The pool's first reconnection comes about 1 s after a failed one: wait long enough.
    server = sites.get(kind, "native-pool", pool={"min_size": 1, "max_size": 2, "timeout": 10})
    with full(small.dsn, MAX, "too many clients") as conns:
        reply = request_freeing_a_slot_when(
            server, conns, lambda: "error connecting in 'pool-" in server.log()
        )
    assert reply.status == 200, server.log_tail()
    assert reply.json()["pooled"] is True
    assert not server.events("connect.retry")
    assert not server.events("connect.gave_up")
