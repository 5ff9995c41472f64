"""Servers' and frameworks' dispatch frames are counted in one line, not listed.

Real servers on loopback (the stdlib's ``http.server`` and Flask on werkzeug's dev server), each
request leaking a connection from a real psycopg_pool against the suite's PostgreSQL: the
report must name the user's line, keep the user's frames between framework frames, show no
socketserver/werkzeug/flask frame and say how many it left out.
"""

from __future__ import annotations

import contextlib
import http.server
import re
import threading
import urllib.request
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from psycopg_pool import ConnectionPool

import pgleak
from pgleak import _stack
from pgleak.testing import EventCapture, capture_events
from tests.conftest import Server
from tests.helpers import site_of

_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
_OMITTED = re.compile(r"^\.\.\. (\d+) frames? of (.+) omitted$")
_FRAMEWORK_FILES = ("socketserver.py", "http/server.py", "/werkzeug/", "/flask/")


@pytest.fixture
def pool(pg: Server) -> Iterator[ConnectionPool[Any]]:
    with ConnectionPool(pg.dsn, min_size=0, max_size=2, open=True) as pool:
        yield pool


@contextlib.contextmanager
def _serving(make: Callable[[], Any]) -> Iterator[str]:
    """Run ``make()``'s server (bound to 127.0.0.1:0) in a thread; yield its base URL."""
    server = make()
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def _leak_and_report(url: str, held: list[Any], events: EventCapture) -> list[str]:
    with _OPENER.open(url, timeout=10) as response:
        assert response.read() == b"ok"
    assert len(held) == 1
    [event] = events.wait_for("leak.suspected", timeout=10)
    assert event.checkout is not None
    return event.checkout.stack


def _omitted(stack: list[str]) -> list[tuple[int, set[str]]]:
    return [(int(m[1]), set(m[2].split(", "))) for m in map(_OMITTED.match, stack) if m is not None]


def test_http_server_request_frames_are_one_counted_line(
    pg: Server, events: EventCapture, pool: ConnectionPool[Any]
) -> None:
    held: list[Any] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            held.append(pool.getconn())  # HTTP-LEAK
            self.send_response(200)
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(b"ok")

        def log_message(self, format: str, *args: Any) -> None:
            pass

    try:
        with _serving(lambda: http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)) as url:
            stack = _leak_and_report(url, held, events)
    finally:
        for conn in held:
            pool.putconn(conn)
    assert stack[-1].startswith(site_of("HTTP-LEAK") + " in do_GET")
    assert not [entry for entry in stack if any(f in entry for f in _FRAMEWORK_FILES)], stack
    [(count, names)] = _omitted(stack)
    assert names == {"socketserver", "http.server"}
    assert count >= 4  # process_request_thread, finish_request, handle, handle_one_request
    assert _OMITTED.match(stack[-2])  # where they were: right outside the handler


def _flask_app(pool: ConnectionPool[Any], held: list[Any]) -> Any:
    import flask

    app = flask.Flask(__name__)

    @app.get("/")
    def index() -> str:
        held.append(pool.getconn())  # FLASK-LEAK
        return "ok"

    inner = app.wsgi_app

    def middleware(environ: Any, start_response: Any) -> Any:
        return inner(environ, start_response)  # USER-MIDDLEWARE

    app.wsgi_app = middleware  # type: ignore[method-assign]
    return app


def _flask_stack(pool: ConnectionPool[Any], events: EventCapture) -> list[str]:
    from werkzeug.serving import make_server

    held: list[Any] = []
    app = _flask_app(pool, held)
    try:
        with _serving(lambda: make_server("127.0.0.1", 0, app, threaded=True)) as url:
            return _leak_and_report(url, held, events)
    finally:
        for conn in held:
            pool.putconn(conn)


def test_flask_request_frames_are_counted_and_user_frames_between_them_kept(
    pg: Server, events: EventCapture, pool: ConnectionPool[Any]
) -> None:
    stack = _flask_stack(pool, events)
    assert stack[-1].startswith(site_of("FLASK-LEAK") + " in index")
    assert not [entry for entry in stack if any(f in entry for f in _FRAMEWORK_FILES)], stack
    [middleware] = [i for i, entry in enumerate(stack) if " in middleware" in entry]
    assert stack[middleware].startswith(site_of("USER-MIDDLEWARE"))
    (outer, outer_names), (inner, inner_names) = _omitted(stack)
    # The server's frames (and Flask.__call__) outside the user's middleware, then Flask's
    # between it and the view.
    assert {"socketserver", "werkzeug", "flask"} <= outer_names
    assert outer_names <= {"socketserver", "http.server", "werkzeug", "flask"}
    assert outer >= 5
    assert inner_names == {"flask"}
    assert inner >= 2
    assert _OMITTED.match(stack[middleware - 1])
    assert _OMITTED.match(stack[middleware + 1])
    assert middleware + 2 == len(stack) - 1


def test_keep_framework_frames_shows_them(pg: Server, pool: ConnectionPool[Any]) -> None:
    pgleak.install(leak_threshold=0.2, keep_framework_frames=True)
    try:
        with capture_events() as events:
            stack = _flask_stack(pool, events)
    finally:
        pgleak.uninstall()
    assert stack[-1].startswith(site_of("FLASK-LEAK") + " in index")
    assert not _omitted(stack)
    assert any("/werkzeug/" in entry for entry in stack)
    assert any("/flask/" in entry for entry in stack)
    assert _stack._keep_frameworks is False  # uninstall() restored the default


def test_folding_of_stacks_without_user_frames_and_of_the_newest_frame() -> None:
    import werkzeug

    filename = str(werkzeug.__file__)
    entries = [(_stack._framework(filename), f"{filename}:1 in f"), ("", "user.py:2 in g")]
    assert entries[0][0] == "werkzeug"
    assert _stack._fold_frameworks(entries) == ["... 1 frame of werkzeug omitted", "user.py:2 in g"]
    only = entries[:1]
    assert _stack._fold_frameworks(only) == [only[0][1]]
    # Framework frames only (a holder blocked in the server's write): the newest 3 are shown.
    server = [("werkzeug", f"{filename}:{n} in f{n}") for n in range(6)]
    assert _stack._fold_frameworks(server) == [
        "... 3 frames of werkzeug omitted",
        *(text for _, text in server[3:]),
    ]
    assert _stack._fold_frameworks(server[:4]) == [text for _, text in server[:4]]
    # A framework frame newer than the user's is the checkout's own line: shown.
    newer = [entries[1], entries[0]]
    assert _stack._fold_frameworks(newer) == [text for _, text in newer]
