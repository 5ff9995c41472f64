"""Fixtures for the pytest plugin's tests: inner pytest runs, each in a clean subprocess.

The inner tests reach the session's PostgreSQL through ``PGLEAK_INNER_*`` environment
variables (``DSN`` for libpq, ``URL`` without a driver, ``HOST``, ``PORT``, ``USER``,
``DBNAME``), so each inner file reads its server the same way an application's suite would.
"""

from __future__ import annotations

import re

import pytest

from tests.conftest import Server

#: Plugins an inner run does not want unless it says so: random order would make the output
#: unstable; pytest-asyncio warns about its unset loop scope; pytest-django is for its own run.
QUIET = ("-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:asyncio", "-p", "no:django")


@pytest.fixture
def inner(
    pytester: pytest.Pytester, pg: Server, monkeypatch: pytest.MonkeyPatch
) -> pytest.Pytester:
    """A pytester whose subprocess runs see the session's server."""
    monkeypatch.setenv("PGLEAK_INNER_DSN", pg.dsn)
    monkeypatch.setenv("PGLEAK_INNER_URL", pg.url(""))
    monkeypatch.setenv("PGLEAK_INNER_HOST", pg.host)
    monkeypatch.setenv("PGLEAK_INNER_PORT", str(pg.port))
    monkeypatch.setenv("PGLEAK_INNER_USER", pg.user)
    monkeypatch.setenv("PGLEAK_INNER_DBNAME", pg.dbname)
    for name in ("PGLEAK_LEAK_THRESHOLD", "DJANGO_SETTINGS_MODULE", "PYTEST_PLUGINS"):
        monkeypatch.delenv(name, raising=False)
    return pytester


def site(source: str, tag: str, filename: str, function: str | None = None) -> str:
    """``file:line in function`` of the line marked ``# <tag>`` in ``source``: a checkout site.

    The function is the enclosing ``def`` unless given (a lambda's is ``<lambda>``).
    """
    lines = source.splitlines()
    for number, line in enumerate(lines, 1):
        if line.rstrip().endswith(f"# {tag}"):
            if function is not None:
                return f"{filename}:{number} in {function}"
            for back in range(number - 1, -1, -1):
                found = re.match(r"\s*(?:async )?def (\w+)", lines[back])
                if found:
                    return f"{filename}:{number} in {found.group(1)}"
    raise AssertionError(f"no line tagged {tag!r}")
