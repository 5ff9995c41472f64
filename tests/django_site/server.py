"""Serve the test project over real HTTP: gunicorn (WSGI) or uvicorn (ASGI), one subprocess each.

A subprocess per server, not a thread in the test process, because:

* Django's settings are per process: each server gets its own mode (``CONN_MAX_AGE``, native
  pool, ``PGLEAK``) from its environment, and the test process never configures Django;
* the connection bookkeeping is the server's own (Django's class-level pool registry, the
  per-thread connections, pgleak's ledger), untouched by the tests' ``install()``/``uninstall()``;
* a server really exits: pgleak's ``leak.at_exit`` reports, gunicorn's forked worker and
  uvicorn's event loop are the real ones.

The price is reading results from outside: HTTP responses, and the server's log (stdout and
stderr go to one file; pgleak's records carry their event as a JSON line, see ``logfmt.py``).

    with serve("wsgi", pg, conn_max_age=60) as server:
        body = server.get_json("/query/")
        events = server.wait_for_event("leak.suspected")
"""

from __future__ import annotations

import atexit
import contextlib
import dataclasses
import json
import linecache
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal, Protocol

from tests.django_site.logfmt import EVENT_PREFIX

__all__ = [
    "DjangoServer",
    "Kind",
    "Response",
    "ServerFailed",
    "manage",
    "parse_events",
    "serve",
    "view_site",
]

Kind = Literal["wsgi", "asgi"]

#: The repository root: the subprocess imports ``tests.django_site`` from here.
ROOT = Path(__file__).resolve().parents[2]
VIEWS = Path(__file__).resolve().with_name("views.py")
#: What pgleak logs (on ``pgleak.internal``) when it swallowed one of its own errors.
INTERNAL_ERROR = "pgleak: internal error in "
_PORT_IN_USE = ("Address already in use", "[Errno 98]", "address already in use")


class DbTarget(Protocol):
    """Where the project's database is (``tests.conftest.Server`` is one)."""

    @property
    def host(self) -> str: ...
    @property
    def port(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def dbname(self) -> str: ...


class ServerFailed(RuntimeError):
    """The server did not start, or died; the message ends with its log."""


@dataclasses.dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    headers: dict[str, str]

    def json(self) -> Any:
        return json.loads(self.body)


def view_site(name: str) -> str:
    """``"file:line"`` of the line in ``views.py`` (or a command) marked ``# site: NAME``."""
    candidates = [VIEWS, *sorted(VIEWS.parent.glob("management/commands/*.py"))]
    hits = [
        f"{path}:{number}"
        for path in candidates
        for number, text in enumerate(linecache.getlines(str(path)), 1)
        if text.rstrip().endswith(f"# site: {name}")
    ]
    assert len(hits) == 1, f"site {name!r} marked {len(hits)} times"
    return hits[0]


@dataclasses.dataclass
class DjangoServer:
    """A running server: its URL, its process and its log."""

    kind: Kind
    base_url: str
    process: subprocess.Popen[bytes]
    log_path: Path

    def url(self, path: str) -> str:
        return self.base_url + path

    def get(self, path: str, timeout: float = 15.0) -> Response:
        """GET ``path``; any status is returned, not raised."""
        request = urllib.request.Request(self.url(path), headers={"Connection": "close"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as reply:
                return Response(reply.status, reply.read(), dict(reply.headers.items()))
        except urllib.error.HTTPError as err:
            with err:
                return Response(err.code, err.read(), dict(err.headers.items()))

    def get_json(self, path: str, timeout: float = 15.0) -> Any:
        """GET ``path``, which must answer 200 with JSON."""
        reply = self.get(path, timeout)
        if reply.status != 200:
            raise AssertionError(
                f"GET {path}: HTTP {reply.status}\n{reply.body[:2000]!r}\n{self.log_tail()}"
            )
        return reply.json()

    def log(self) -> str:
        """Everything the server wrote to stdout and stderr so far."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def log_tail(self, lines: int = 60) -> str:
        tail = "\n".join(self.log().splitlines()[-lines:])
        return f"--- {self.kind} server log (last {lines} lines) ---\n{tail}"

    def mark(self) -> int:
        """Where the log ends now: ``events(since=mark)`` sees only what is written after.

        Tests that share a server take a mark first, so that they read their own events.
        """
        return self.log_path.stat().st_size

    def events(self, kind: str | None = None, since: int = 0) -> list[dict[str, Any]]:
        """pgleak's events from the log, oldest first (``kind``: only that event)."""
        with self.log_path.open("rb") as log:
            log.seek(since)
            text = log.read().decode("utf-8", errors="replace")
        # The server may be half-way through writing a line: only complete lines count (the
        # rest is read on the next poll).
        return parse_events(text[: text.rfind("\n") + 1], kind)

    def wait_for(
        self, check: Callable[[], Any], timeout: float = 10.0, what: str = "condition"
    ) -> Any:
        """Poll ``check()`` until it returns something truthy; fail with the log at timeout."""
        deadline = time.monotonic() + timeout
        while True:
            result = check()
            if result:
                return result
            if time.monotonic() >= deadline:
                raise AssertionError(f"no {what} after {timeout}s\n{self.log_tail()}")
            time.sleep(0.05)

    def wait_for_log(self, needle: str, timeout: float = 10.0) -> str:
        return str(
            self.wait_for(lambda: needle in self.log() and self.log(), timeout, repr(needle))
        )

    def wait_for_event(
        self,
        kind: str,
        timeout: float = 10.0,
        count: int = 1,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
    ) -> list[Any]:
        """The first ``count`` events of ``kind`` (after ``since``, matching ``where``)."""

        def found() -> list[Any] | None:
            events = [e for e in self.events(kind, since) if where is None or where(e)]
            return events[:count] if len(events) >= count else None

        result: list[Any] = self.wait_for(found, timeout, f"{count} {kind} event(s)")
        return result

    def collect_until(
        self,
        kind: str,
        since: int = 0,
        where: Callable[[dict[str, Any]], bool] | None = None,
        timeout: float = 10.0,
    ) -> dict[str, Any]:
        """Have the server collect garbage (``/gc/``) until a ``kind`` event appears.

        A connection parked in a finished request thread becomes garbage only once that
        thread has really ended, which the server does not announce (on a loaded machine it
        can be after the next request): each ``/gc/`` is one more chance, until ``timeout``.
        """

        def found() -> dict[str, Any] | None:
            self.get_json("/gc/")
            events = [e for e in self.events(kind, since) if where is None or where(e)]
            return events[0] if events else None

        result: dict[str, Any] = self.wait_for(found, timeout, f"{kind} event after /gc/")
        return result

    def stop(self, timeout: float = 15.0, sig: signal.Signals | None = None) -> int:
        """Shut the server down gracefully (SIGKILL after ``timeout``); its exit code.

        The default signal lets the Python process exit normally, so that exit-time reports
        (``leak.at_exit``) are written: SIGTERM for gunicorn (exit code 0), SIGINT for uvicorn
        (0). uvicorn on SIGTERM also shuts down gracefully but then re-raises SIGTERM with the
        default handler, so the process dies by the signal (exit code -15) without running
        interpreter shutdown (no ``threading`` or ``atexit`` hooks): pass ``sig=SIGTERM`` to
        test what an orchestrator's stop does.
        """
        if sig is None:
            sig = signal.SIGTERM if self.kind == "wsgi" else signal.SIGINT
        if self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(timeout)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)
        return self.process.returncode


def parse_events(text: str, kind: str | None = None) -> list[dict[str, Any]]:
    """pgleak's events in a log ``text`` (see ``logfmt.py``), oldest first."""
    found = []
    for line in text.splitlines():
        if line.startswith(EVENT_PREFIX):
            event = json.loads(line[len(EVENT_PREFIX) :])
            if kind is None or event.get("event") == kind:
                found.append(event)
    return found


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _command(kind: Kind, port: int, threads: int) -> list[str]:
    if kind == "wsgi":
        # gthread: a pool of request threads in one forked worker, each with its own Django
        # connection, as most production WSGI deployments run.
        return [
            sys.executable,
            "-m",
            "gunicorn",
            "--bind",
            f"127.0.0.1:{port}",
            "--workers",
            "1",
            "--worker-class",
            "gthread",
            "--threads",
            str(threads),
            "--timeout",
            "120",
            "--graceful-timeout",
            "5",
            "--no-control-socket",
            "--error-logfile",
            "-",
            "--access-logfile",
            "-",
            "--log-level",
            "info",
            "tests.django_site.wsgi:application",
        ]
    return [
        sys.executable,
        "-m",
        "uvicorn",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--lifespan",
        "off",
        "--timeout-graceful-shutdown",
        "5",
        "--log-level",
        "info",
        "tests.django_site.asgi:application",
    ]


def _environment(
    db: DbTarget,
    conn_max_age: int | None,
    pool: Mapping[str, Any] | bool | None,
    db_options: Mapping[str, Any] | None,
    pgleak_setting: Mapping[str, Any] | None,
    install: Mapping[str, Any] | None,
    extra_apps: tuple[str, ...],
    extra_middleware: tuple[str, ...],
    env: Mapping[str, str] | None,
) -> dict[str, str]:
    environ = {
        key: value for key, value in os.environ.items() if not key.startswith("DJANGO_SITE_")
    }
    environ.pop("DJANGO_SETTINGS_MODULE", None)
    path = environ.get("PYTHONPATH")
    environ.update(
        PYTHONPATH=str(ROOT) + (os.pathsep + path if path else ""),
        PYTHONUNBUFFERED="1",
        DJANGO_SETTINGS_MODULE="tests.django_site.settings",
        DJANGO_SITE_DB_HOST=db.host,
        DJANGO_SITE_DB_PORT=str(db.port),
        DJANGO_SITE_DB_USER=db.user,
        DJANGO_SITE_DB_NAME=db.dbname,
        DJANGO_SITE_CONN_MAX_AGE="none" if conn_max_age is None else str(conn_max_age),
    )
    if pool:
        environ["DJANGO_SITE_POOL"] = json.dumps(pool)
    if db_options:
        environ["DJANGO_SITE_DB_OPTIONS"] = json.dumps(dict(db_options))
    if pgleak_setting is not None:
        environ["DJANGO_SITE_PGLEAK"] = json.dumps(dict(pgleak_setting))
    if install is not None:
        environ["DJANGO_SITE_INSTALL"] = json.dumps(dict(install))
    if extra_apps:
        environ["DJANGO_SITE_EXTRA_APPS"] = ",".join(extra_apps)
    if extra_middleware:
        environ["DJANGO_SITE_EXTRA_MIDDLEWARE"] = ",".join(extra_middleware)
    environ.update(env or {})
    return environ


def _start(
    kind: Kind, environ: dict[str, str], log_path: Path, threads: int, startup_timeout: float
) -> DjangoServer:
    """Start the server on a free port and wait until it answers ``/health/``."""
    for _attempt in range(3):
        port = _free_port()
        with log_path.open("ab") as log:
            process = subprocess.Popen(
                _command(kind, port, threads),
                cwd=ROOT,
                env=environ,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # a ^C in the test run is not also the server's
            )
        server = DjangoServer(kind, f"http://127.0.0.1:{port}", process, log_path)
        deadline = time.monotonic() + startup_timeout
        while True:
            if process.poll() is not None:
                break
            with contextlib.suppress(OSError):
                if server.get("/health/", timeout=2.0).status == 200:
                    return server
            if time.monotonic() >= deadline:
                server.stop()
                raise ServerFailed(
                    f"{kind} server not ready after {startup_timeout}s\n{server.log_tail()}"
                )
            time.sleep(0.05)
        if not any(text in server.log() for text in _PORT_IN_USE):
            break  # died for another reason than a lost race for the port
    raise ServerFailed(
        f"{kind} server exited with {process.returncode} during startup\n{server.log_tail()}"
    )


def manage(
    db: DbTarget,
    *args: str,
    conn_max_age: int | None = 0,
    pool: Mapping[str, Any] | bool | None = None,
    pgleak: Mapping[str, Any] | None = None,
    extra_apps: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m django ARGS`` in the test project, configured as :func:`serve` does.

    A management command is its own process, like a Celery worker: it loads the project
    (``django.setup()``, so ``INSTALLED_APPS`` and ``PGLEAK`` apply) and exits when done.
    Its log (with pgleak's JSON event lines) is on stderr: :func:`parse_events`.
    """
    environ = _environment(db, conn_max_age, pool, None, pgleak, None, extra_apps, (), env)
    return subprocess.run(
        [sys.executable, "-m", "django", *args],
        cwd=ROOT,
        env=environ,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@contextlib.contextmanager
def serve(
    kind: Kind,
    db: DbTarget,
    *,
    conn_max_age: int | None = 0,
    pool: Mapping[str, Any] | bool | None = None,
    db_options: Mapping[str, Any] | None = None,
    pgleak: Mapping[str, Any] | None = None,
    install: Mapping[str, Any] | None = None,
    extra_apps: tuple[str, ...] = (),
    extra_middleware: tuple[str, ...] = (),
    env: Mapping[str, str] | None = None,
    threads: int = 4,
    startup_timeout: float = 30.0,
    log_dir: Path | None = None,
) -> Iterator[DjangoServer]:
    """Run the test project under gunicorn (``"wsgi"``) or uvicorn (``"asgi"``) on 127.0.0.1.

    Args:
        kind: ``"wsgi"`` (gunicorn, one gthread worker with ``threads`` threads) or ``"asgi"``
            (uvicorn, one process).
        db: The PostgreSQL server (the ``pg`` fixture).
        conn_max_age: Django's ``CONN_MAX_AGE``: 0 (a connection per request), seconds, or
            ``None`` (unlimited).
        pool: Django's ``OPTIONS["pool"]`` (``True`` or ``ConnectionPool`` arguments);
            requires ``conn_max_age=0``.
        db_options: More ``OPTIONS`` (``application_name``, ...).
        pgleak: The ``PGLEAK`` setting; ``None``: not set at all.
        install: ``pgleak.install(**install)`` at the top of ``wsgi.py``/``asgi.py``;
            ``None``: not called.
        extra_apps: Added to ``INSTALLED_APPS`` (``"pgleak.integrations.django"``).
        extra_middleware: Added to ``MIDDLEWARE``.
        env: More environment variables (``PGLEAK_*``, ...).
        threads: gunicorn's request threads.
        startup_timeout: Seconds to wait for the first answer.
        log_dir: Where the server's log file goes (``tmp_path``); default: a temporary
            directory removed when the test process exits. The log stays readable after the
            block, for what the server wrote while stopping (``leak.at_exit``).

    Yields:
        The running server; it is stopped (gracefully, then killed) when the block ends. If
        the block fails, the end of the server's log is written to stderr.
    """
    environ = _environment(
        db,
        conn_max_age,
        pool,
        db_options,
        pgleak,
        install,
        extra_apps,
        extra_middleware,
        env,
    )
    if log_dir is None:
        log_dir = Path(tempfile.mkdtemp(prefix=f"pgleak-django-{kind}-"))
        atexit.register(shutil.rmtree, log_dir, ignore_errors=True)
    fd, name = tempfile.mkstemp(prefix=f"{kind}-", suffix=".log", dir=log_dir)
    os.close(fd)
    log_path = Path(name)
    server = _start(kind, environ, log_path, threads, startup_timeout)
    try:
        yield server
    except BaseException:
        server.stop()
        sys.stderr.write(server.log_tail(200) + "\n")
        raise
    finally:
        server.stop()
    # As tests/conftest.py does in the test process: pgleak's own failures fail the test.
    assert INTERNAL_ERROR not in server.log(), server.log_tail(200)
