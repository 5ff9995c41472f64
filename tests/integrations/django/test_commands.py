"""Management commands and Celery-style workers: processes outside the request cycle.

``fake_worker`` (in the test project) runs tasks that query the database on the main thread's
connection. Without ``close_old_connections()`` between tasks, as Celery's Django fixup calls,
nothing ends the connection's use until the command returns (Django then closes every
connection): a worker that never closes, reported while it idles between tasks.
"""

from __future__ import annotations

import subprocess

import pytest

from tests.conftest import Server
from tests.django_site.server import INTERNAL_ERROR, manage, parse_events
from tests.integrations.django.sites import APP, MODES, PGLEAK, THRESHOLD, database, names

LINGER = 0.6  # idle after the last task, connection still open: longer than the threshold


def _worker(pg: Server, mode: str, *extra: str) -> subprocess.CompletedProcess[str]:
    args = ("--tasks", "3", "--interval", "0.05", "--linger", str(LINGER), *extra)
    result = manage(pg, "fake_worker", *args, extra_apps=(APP,), pgleak=PGLEAK, **MODES[mode])
    assert result.returncode == 0, result.stderr
    assert INTERNAL_ERROR not in result.stderr, result.stderr
    assert "task 2 ran on backend" in result.stdout
    return result


@pytest.mark.parametrize("mode", sorted(MODES))
def test_worker_that_never_closes_is_reported_idle_between_tasks(pg: Server, mode: str) -> None:
    result = _worker(pg, mode)
    (suspected,) = parse_events(result.stderr, "leak.suspected")
    assert names(suspected, "worker-task")
    assert suspected["context"] == "command fake_worker"
    assert suspected["holder"] == "thread 'MainThread' during command fake_worker"
    assert suspected["threshold_s"] == pytest.approx(THRESHOLD)
    assert suspected["state"] == "idle"
    assert suspected["pool"].startswith(database(mode))
    # Where the worker is now: waiting in its own loop, the connection kept.
    assert " in handle" in suspected["holder_stack"][-1]
    assert suspected["holder_stack"][-1] != suspected["stack"][-1]
    # The command's end closes every connection (BaseCommand.run_from_argv).
    (returned,) = parse_events(result.stderr, "leak.returned")
    assert returned["checkout_id"] == suspected["checkout_id"]
    assert returned["held_s"] >= LINGER
    assert not parse_events(result.stderr, "leak.at_exit")


@pytest.mark.parametrize("mode", ["per-request", "persistent"])
def test_worker_closing_old_connections_between_tasks_is_not_reported(
    pg: Server, mode: str
) -> None:
    result = _worker(pg, mode, "--close-old")
    assert parse_events(result.stderr) == []
    backends = {line.rsplit(" ", 1)[1] for line in result.stdout.splitlines()}
    # Persistent: one connection kept across tasks (parked, not leaked); else one per task.
    assert len(backends) == (1 if mode == "persistent" else 3)
