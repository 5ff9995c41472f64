"""The Django test project served in each mode, shared by the tests of a module.

Starting a server costs about half a second; a module's tests share one per (server, mode)
and read only their own part of its log (``DjangoServer.mark()``). The servers run with the
garbage collector off (``DJANGO_SITE_MANUAL_GC``), so a dropped connection is collected when a
test asks (``/gc/``) and not at a random moment in between; after each test every server it
used collects, so connections leaked by one test do not pile up into the next.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import pytest

import pgleak
from pgleak._appname import _render, _short_host
from tests.conftest import Server
from tests.django_site.server import DjangoServer, Kind, Response, serve, view_site

APP = "pgleak.integrations.django"
KINDS: tuple[Kind, ...] = ("wsgi", "asgi")
#: Django's three ways of holding connections.
MODES: dict[str, dict[str, Any]] = {
    "per-request": {"conn_max_age": 0},
    "persistent": {"conn_max_age": 60},
    "native-pool": {"pool": {"min_size": 1, "max_size": 4, "timeout": 5}},
}
THRESHOLD = 0.3
#: A service name that must not reach the server as it is (quotes, non-ASCII, 300+ bytes).
HOSTILE_SERVICE = "it's \"shop\" \\ x'; DROP TABLE t; -- café 日本 " + "k" * 300
#: The application's own name in the OPTIONS of the ``named`` alias, kept as it is.
OWN_NAME = "my 'app' \\ \"quoted\""
#: ``PGLEAK`` of the shared servers: the one line in ``INSTALLED_APPS`` reads it.
PGLEAK: dict[str, Any] = {
    "leak_threshold": THRESHOLD,
    "report_interval": 0.01,
    "service_name": HOSTILE_SERVICE,
}
ENV = {
    # PGLEAK wins over the environment, as install()'s keyword arguments do.
    "PGLEAK_LEAK_THRESHOLD": "99",
    "DJANGO_SITE_MANUAL_GC": "1",
    "DJANGO_SITE_NAMED_APPLICATION_NAME": OWN_NAME,
}


def site(name: str) -> str:
    """``file:line`` of the line marked ``# site: NAME`` in the test project."""
    return view_site(name)


def names(event: Mapping[str, Any], name: str) -> bool:
    """The event's checkout was made at the line marked ``# site: NAME`` (its newest frame)."""
    stack = event.get("stack") or []
    return bool(stack) and str(stack[-1]).startswith(site(name) + " in ")


def tag_of(service: str, process: int) -> str:
    """The ``application_name`` pgleak gives the connections of server process ``process``."""
    fields = {"service": service, "host": _short_host(), "pid": str(process)}
    return _render("{service}@{host}:{pid}", fields, ("host", "service"), frozenset())


def database(mode: str, alias: str = "default") -> str:
    """The start of the pool name of an alias's checkouts in ``mode``."""
    return f"django {alias!r} pool-" if mode == "native-pool" else f"django {alias!r} ("


class Sites:
    """Servers started on first use, one per (kind, mode, variant), stopped at the end."""

    def __init__(self, pg: Server, log_dir: Path, **options: Any) -> None:
        self._pg = pg
        self._log_dir = log_dir
        self._options = options
        self._servers: dict[tuple[str, ...], DjangoServer] = {}
        self._stack = contextlib.ExitStack()
        self.touched: list[DjangoServer] = []

    def get(self, kind: Kind, mode: str, **more: Any) -> DjangoServer:
        key = (kind, mode, repr(sorted(more.items())))
        server = self._servers.get(key)
        if server is None or server.process.poll() is not None:
            options = {**self._options, **MODES[mode]}
            for name, value in more.items():  # dicts (pgleak, env) are merged, not replaced
                base = options.get(name)
                options[name] = {**base, **value} if isinstance(base, dict) else value
            server = self._stack.enter_context(
                serve(kind, self._pg, log_dir=self._log_dir, **options)
            )
            self._servers[key] = server
        self.touched.append(server)
        return server

    def collect(self) -> None:
        """Let every server used since the last call collect what it dropped."""
        for server in self.touched:
            if server.process.poll() is None:
                server.get_json("/gc/")
        self.touched.clear()

    def close(self) -> None:
        self._stack.close()


@contextlib.contextmanager
def shared_sites(pg: Server, log_dir: Path, **options: Any) -> Iterator[Sites]:
    sites = Sites(pg, log_dir, **options)
    try:
        yield sites
    finally:
        sites.close()


@contextlib.contextmanager
def full(dsn: str, slots: int, refusal: str) -> Iterator[list[Any]]:
    """Every one of the ``slots`` of the server at ``dsn`` taken by a direct connection.

    The next connection is refused with a message matching ``refusal``; the connections still
    open are closed on exit.
    """
    import psycopg

    conns: list[Any] = []
    with pgleak.suppress():
        try:
            deadline = time.monotonic() + 10
            while len(conns) < slots:  # bounded: 10 s
                try:
                    conns.append(psycopg.connect(dsn))
                except psycopg.OperationalError:
                    # A server's connection from the request just served may still be
                    # closing (Django closes it on request_finished, after the response).
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(0.05)
            with pytest.raises(psycopg.OperationalError, match=refusal):
                psycopg.connect(dsn).close()
            yield conns
        finally:
            for conn in conns:
                conn.close()


def request_freeing_a_slot_when(
    server: DjangoServer, conns: list[Any], refused: Callable[[], object], path: str = "/query/"
) -> Response:
    """GET ``path`` while the server is full; free one slot once ``refused()`` holds."""
    replies: list[Response] = []
    thread = threading.Thread(target=lambda: replies.append(server.get(path, timeout=30)))
    thread.start()
    try:
        server.wait_for(refused, timeout=15, what="a refused connection attempt")
        conns.pop().close()
    finally:
        thread.join(30)
    (reply,) = replies
    return reply
