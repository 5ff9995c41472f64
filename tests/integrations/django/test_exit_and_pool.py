"""What a Django server still holds when it exits, and its native pool running dry.

Each test has a server of its own: it is stopped (SIGTERM for gunicorn, SIGINT for uvicorn,
which both exit normally; uvicorn's SIGTERM kills the process by the signal, without exit
hooks: see docs/django.md) or its pool is used up.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from tests.conftest import Server
from tests.django_site.server import Kind, serve
from tests.integrations.django.sites import APP, ENV, KINDS, MODES, PGLEAK, database, names


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("kind", KINDS)
def test_exit_reports_what_is_still_out_and_nothing_django_keeps(
    pg: Server, tmp_path: Path, kind: Kind, mode: str
) -> None:
    options: dict[str, Any] = {"extra_apps": (APP,), "pgleak": PGLEAK, "env": ENV, **MODES[mode]}
    with serve(kind, pg, log_dir=tmp_path, threads=2, **options) as server:
        server.get_json("/query/")  # closed, parked (persistent) or back in the pool
        leaked = server.get_json("/thread-leak/?hold=60")

        def ours(event: dict[str, Any]) -> bool:
            return bool(event["holder"] == f"thread {leaked['thread']!r}")

        (suspected,) = server.wait_for_event("leak.suspected", where=ours)
        assert names(suspected, "thread-leak")
        assert suspected["holder_finished"] is False  # still running: where is it now?
        assert suspected["holder_stack"][-1].split(":")[0].endswith("views.py")
        assert " in work" in suspected["holder_stack"][-1]
        assert server.stop() == 0
    at_exit = {e["checkout_id"]: e for e in server.events("leak.at_exit")}
    assert suspected["checkout_id"] in at_exit
    assert {e["detail"] for e in at_exit.values()} == {"process exit"}
    assert all(e["pool"].startswith(database(mode)) for e in at_exit.values())
    contexts = sorted(str(e["context"]) for e in at_exit.values())
    if (kind, mode) == ("asgi", "persistent"):
        # The request's persistent connection was left in its ended thread: out, too.
        assert contexts == ["GET /query/ (tests.django_site.views.query)", "None"]
    else:
        assert contexts == ["None"]  # the thread's; Django's own connections are not leaks


@pytest.mark.parametrize("kind", KINDS)
def test_native_pool_exhausted_lists_the_holder_and_names_the_waiting_request(
    pg: Server, tmp_path: Path, kind: Kind
) -> None:
    pool = {"min_size": 1, "max_size": 1, "timeout": 1}
    options: dict[str, Any] = {"extra_apps": (APP,), "pgleak": PGLEAK, "env": ENV}
    with serve(kind, pg, log_dir=tmp_path, pool=pool, **options) as server:
        server.get_json("/query/")
        leaked = server.get_json("/thread-leak/?hold=30")  # takes the only connection
        refused = server.get("/query/")  # waits 1 s for it, then Django's OperationalError
        assert refused.status == 500
        (exhausted,) = server.wait_for_event("pool.exhausted")
    label = "GET /query/ (tests.django_site.views.query)"
    assert exhausted["pool"].startswith(database("native-pool"))
    assert exhausted["context"] == label
    assert exhausted["holder"].endswith(f" during {label}")
    assert names(exhausted, "query")  # the waiter's line
    assert exhausted["waited_s"] == pytest.approx(1.0)
    assert "PoolTimeout" in exhausted["detail"]
    (holder,) = exhausted["holders"]
    assert holder["holder"] == f"thread {leaked['thread']!r}"
    assert names(holder, "thread-leak")
    assert holder["state"] == "idle"
    assert "couldn't get a connection after 1.00 sec" in server.log()  # Django's own error
