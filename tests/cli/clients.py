"""Real clients in every state the doctor tells apart, and the doctor run as a subprocess."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

ROOT = Path(__file__).resolve().parents[2]


@dataclasses.dataclass
class Result:
    code: int
    out: str
    err: str


def doctor(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> Result:
    """``python -m pgleak ARGS`` in a fresh interpreter, as a user or cron job runs it."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("PG")}
    full_env.pop("DATABASE_URL", None)
    full_env.update(env or {})
    done = subprocess.run(
        [sys.executable, "-m", "pgleak", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=full_env,
        cwd=ROOT,
        check=False,
    )
    return Result(done.returncode, done.stdout, done.stderr)


@dataclasses.dataclass
class Holder:
    """A :mod:`tests.cli.holder` process and the backend pids its pool holds."""

    proc: subprocess.Popen[str]
    backend_pids: list[int]


@contextlib.contextmanager
def holders(dsn: str, *specs: tuple[str, int, bool]) -> Iterator[list[Holder]]:
    """Start one holder process per ``(service, connections, leave a transaction open)``."""
    started: list[Holder] = []
    try:
        procs = [
            subprocess.Popen(
                [sys.executable, "-m", "tests.cli.holder", dsn, service, str(size)]
                + (["--txn"] if txn else []),
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                text=True,
                cwd=ROOT,
            )
            for service, size, txn in specs
        ]
        for proc in procs:
            assert proc.stdout is not None
            line = proc.stdout.readline().split()  # blocks until "ready ..." or EOF
            assert line[:1] == ["ready"], f"holder failed to start: {line}"
            started.append(Holder(proc, [int(p) for p in line[1:]]))
        yield started
    finally:
        for holder in started:
            assert holder.proc.stdin is not None
            holder.proc.stdin.close()
        for holder in started:
            holder.proc.wait(timeout=30)


@contextlib.contextmanager
def sleeper(dsn: str, seconds: float = 60) -> Iterator[int]:
    """A backend running ``pg_sleep``: its pid while it sleeps; cancelled on the way out."""
    conn = psycopg.connect(dsn, application_name="report-runner", autocommit=True)
    pid = conn.info.backend_pid
    ready = threading.Event()

    def run() -> None:
        ready.set()
        with contextlib.suppress(psycopg.errors.QueryCanceled):
            conn.execute("select pg_sleep(%s)", (seconds,))

    thread = threading.Thread(target=run)
    thread.start()
    ready.wait(10)
    with psycopg.connect(dsn, autocommit=True) as watcher:
        for _ in range(500):  # until the server shows it sleeping
            row = watcher.execute(
                "select state from pg_stat_activity where pid = %s", (pid,)
            ).fetchone()
            if row and row[0] == "active":
                break
            threading.Event().wait(0.01)
    try:
        yield pid
    finally:
        conn.cancel_safe()
        thread.join(30)
        conn.close()


def wait_gone(dsn: str, pid: int) -> bool:
    """Whether backend ``pid`` has left pg_stat_activity (pg_terminate_backend only signals)."""
    with psycopg.connect(dsn, autocommit=True) as conn:
        for _ in range(500):
            row: Any = conn.execute(
                "select count(*) from pg_stat_activity where pid = %s", (pid,)
            ).fetchone()
            if not row[0]:
                return True
            threading.Event().wait(0.01)
    return False
