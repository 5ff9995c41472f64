"""``application_name`` tags as the real server shows them in ``pg_stat_activity``, for every
adapter, with hostile inputs; and call-site tags, which cost a round trip only on change."""

from __future__ import annotations

import os
import re
from collections.abc import Iterator

import pytest

import pgleak
from pgleak._appname import LIMIT, sanitize, tags
from tests.bouncer import PgBouncer
from tests.conftest import Server
from tests.integrations.appname_clients import CLIENTS, Endpoint, checkout_sites

HOSTILE_SERVICE = "it's \"svc\" \\ x'; DROP TABLE t; -- café 日本 " + "k" * 1024
HOSTILE_USER = "my 'app' \\ \"quoted\""


@pytest.fixture
def direct(pg: Server) -> Endpoint:
    return Endpoint(pg.host, pg.port, pg.user, pg.dbname)


@pytest.fixture
def tagged() -> Iterator[None]:
    pgleak.install(service_name=HOSTILE_SERVICE)
    try:
        yield
    finally:
        pgleak.uninstall()


def _printable(value: str) -> bool:
    return len(value.encode()) <= LIMIT and all(32 <= ord(ch) < 127 for ch in value)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_default_tag_names_service_host_pid(client: str, direct: Endpoint, tagged: None) -> None:
    seen = CLIENTS[client](direct, None)
    assert seen == tags.base
    assert _printable(seen)
    assert seen.startswith("it's \"svc\" \\ x'; DROP TABLE t; -- cafe ?? kkk")
    assert seen.endswith(f":{os.getpid()}")


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_the_applications_own_value_is_kept(client: str, direct: Endpoint, tagged: None) -> None:
    assert CLIENTS[client](direct, HOSTILE_USER) == HOSTILE_USER


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_prefix_mode_puts_the_tag_before_the_applications_value(
    client: str, direct: Endpoint
) -> None:
    pgleak.install(service_name="svc", app_name_prefix=True)
    try:
        seen = CLIENTS[client](direct, HOSTILE_USER + " é" * 600)
        assert seen == sanitize(f"{tags.base} {HOSTILE_USER}" + " e" * 600)
        assert seen.startswith(f"{tags.base} {HOSTILE_USER}")
        assert _printable(seen)
    finally:
        pgleak.uninstall()


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_untagged_when_switched_off(client: str, direct: Endpoint) -> None:
    pgleak.install(tag_connections=False)
    try:
        seen = CLIENTS[client](direct, None)
    finally:
        pgleak.uninstall()
    assert "@" not in seen  # the driver's own default (empty, or psql-like), not a tag


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_call_site_tag_names_the_checkout_line(client: str, direct: Endpoint) -> None:
    pgleak.install(service_name="svc", app_name_call_site=True)
    try:
        seen = CLIENTS[client](direct, None)
    finally:
        pgleak.uninstall()
    match = re.fullmatch(r"svc:(appname_clients\.py:\d+)", seen)
    assert match, seen
    assert match.group(1) in checkout_sites()


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_call_site_tag_never_replaces_the_applications_value(client: str, direct: Endpoint) -> None:
    pgleak.install(service_name="svc", app_name_call_site=True)
    try:
        assert CLIENTS[client](direct, "mine") == "mine"
    finally:
        pgleak.uninstall()


def _last_query(pg: Server, pid: int) -> str:
    import psycopg

    with pgleak.suppress(), psycopg.connect(pg.dsn, autocommit=True) as conn:
        row = conn.execute("select query from pg_stat_activity where pid = %s", (pid,)).fetchone()
    assert row is not None
    return str(row[0])


def test_call_site_tag_costs_a_round_trip_only_when_the_line_changes(pg: Server) -> None:
    """The server's record of each backend's last statement shows when pgleak sent one."""
    from psycopg_pool import ConnectionPool

    pgleak.install(service_name="svc", app_name_call_site=True)
    try:
        kwargs = {"autocommit": True}
        with ConnectionPool(pg.dsn, min_size=1, max_size=1, kwargs=kwargs, open=True) as pool:
            for round_ in range(3):
                with pool.connection() as conn:  # the same line, three times
                    pid = conn.info.backend_pid
                    if round_ == 0:
                        conn.execute("select 'marker'")
            assert _last_query(pg, pid) == "select 'marker'"  # no set_config after the first
            with pool.connection() as conn:  # another line
                assert conn.info.backend_pid == pid
            assert "set_config('application_name'" in _last_query(pg, pid)
    finally:
        pgleak.uninstall()


# -- through PgBouncer (transaction mode), which keeps application_name per client -------------


@pytest.fixture
def via_bouncer(bouncer: PgBouncer, pg: Server) -> Endpoint:
    return Endpoint(bouncer.host, bouncer.port, pg.user, pg.dbname, bouncer=True)


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_tags_through_pgbouncer(client: str, via_bouncer: Endpoint, tagged: None) -> None:
    assert CLIENTS[client](via_bouncer, None) == tags.base
    assert CLIENTS[client](via_bouncer, HOSTILE_USER) == HOSTILE_USER


@pytest.mark.parametrize("client", sorted(CLIENTS))
def test_call_site_tags_through_pgbouncer(client: str, via_bouncer: Endpoint) -> None:
    pgleak.install(service_name="svc", app_name_call_site=True)
    try:
        seen = CLIENTS[client](via_bouncer, None)
    finally:
        pgleak.uninstall()
    match = re.fullmatch(r"svc:(appname_clients\.py:\d+)", seen)
    assert match, seen
    assert match.group(1) in checkout_sites()


def test_call_site_tags_switched_on_while_installed_tag_the_next_checkout(pg: Server) -> None:
    """The C wrappers keep the answer "call-site tags off" between checkouts; switching them
    on (a second ``install()``: the same wrappers) must reach the very next checkout."""
    from psycopg_pool import ConnectionPool

    pgleak.install(service_name="svc")
    try:
        kwargs = {"autocommit": True}
        with ConnectionPool(pg.dsn, min_size=1, max_size=1, kwargs=kwargs, open=True) as pool:
            for _ in range(3):  # off, and kept so
                with pool.connection() as conn:
                    seen = conn.execute("select current_setting('application_name')").fetchone()
                    assert seen is not None
                    assert seen[0] == tags.base
            pgleak.install(service_name="svc", app_name_call_site=True)
            with pool.connection() as conn:
                seen = conn.execute("select current_setting('application_name')").fetchone()
    finally:
        pgleak.uninstall()
    assert seen is not None
    assert re.fullmatch(r"svc:test_application_name\.py:\d+", seen[0]), seen
