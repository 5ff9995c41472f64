"""The Django test project, served for real: each server and connection mode answers queries.

Groundwork for the Django integration's tests: these only prove the harness (a real gunicorn
or uvicorn process, a real PostgreSQL, real HTTP, the server's log read back), not pgleak's
Django behaviour.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.django_site.server import Kind, serve, view_site

POOL = {"min_size": 1, "max_size": 4, "timeout": 5}

MODES: dict[str, dict[str, Any]] = {
    "per-request": {"conn_max_age": 0},
    "persistent": {"conn_max_age": 60},
    "native-pool": {"pool": POOL},
}


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_serves_sync_and_async_queries(pg: Server, kind: Kind, mode: str, tmp_path: Path) -> None:
    with serve(kind, pg, log_dir=tmp_path, **MODES[mode]) as server:
        sync = server.get_json("/query/")
        in_async_view = server.get_json("/async-query/")
    for body in (sync, in_async_view):
        assert isinstance(body["pid"], int)
        assert body["pid"] > 0
        assert body["request"] == ("WSGIRequest" if kind == "wsgi" else "ASGIRequest")
        assert body["pooled"] is (mode == "native-pool")
        assert body["conn_max_age"] == MODES[mode].get("conn_max_age", 0)
    assert in_async_view["async"] is True
    ready = "Listening at: " if kind == "wsgi" else "Uvicorn running on "
    assert ready + server.base_url in server.log()
    assert server.process.returncode == 0


@pytest.mark.parametrize("kind", ["wsgi", "asgi"])
def test_server_log_carries_pgleak_events(pg: Server, kind: Kind, tmp_path: Path) -> None:
    """``pgleak.install()`` in the server's ``wsgi.py``/``asgi.py``; its events are read back.

    Django's native pool is a ``psycopg_pool.ConnectionPool``, which pgleak's existing adapter
    already tracks: a thread that takes a pooled connection and never gives it back is
    reported while the server runs, and again when the server exits.
    """
    with serve(kind, pg, pool=POOL, install={"leak_threshold": 0.5}, log_dir=tmp_path) as server:
        leaked = server.get_json("/thread-leak/?hold=60")
        (suspected,) = server.wait_for_event("leak.suspected", timeout=15)
    assert suspected["holder"] == f"thread {leaked['thread']!r}"
    site = view_site("thread-leak")
    assert any(frame.startswith(site + " in ") for frame in suspected["stack"]), suspected
    at_exit = server.events("leak.at_exit")
    assert [event["checkout_id"] for event in at_exit] == [suspected["checkout_id"]]
