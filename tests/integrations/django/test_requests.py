"""Django over real HTTP: gunicorn (WSGI) and uvicorn (ASGI), in each of Django's modes.

Per-request connections (``CONN_MAX_AGE=0``), persistent ones (``CONN_MAX_AGE=60``) and
Django's native pool, all set up by the one line in ``INSTALLED_APPS`` and a ``PGLEAK`` dict.
Reports are read back from the server's log, as a JSON log pipeline would get them.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import Any

import pytest

from pgleak._appname import LIMIT, sanitize
from tests.django_site.server import Kind
from tests.integrations.django.sites import (
    HOSTILE_SERVICE,
    KINDS,
    MODES,
    OWN_NAME,
    THRESHOLD,
    Sites,
    database,
    names,
    tag_of,
)

#: Each way a request holds its connection past the threshold, and the state reported.
HOLDS = {
    "idle-in-transaction": (
        "/idle-in-transaction/?seconds=0.7",
        "tests.django_site.views.idle_in_transaction",
        "idle in transaction, inside transaction.atomic()",
        "idle_in_transaction",
    ),
    "async-query": (
        "/async-query/?sleep=0.7",
        "tests.django_site.views.async_query",
        "idle",
        None,  # the holder is the request's sync thread, idle between sync_to_async calls
    ),
}

#: ASGI runs each request in a thread of its own: a persistent connection outlives it.
ASGI_PERSISTENT = ("asgi", "persistent")

modes = pytest.mark.parametrize("mode", sorted(MODES))
kinds = pytest.mark.parametrize("kind", KINDS)


def same(checkout: dict[str, Any]) -> Callable[[dict[str, Any]], bool]:
    """Matches the events about ``checkout`` (the event that reported it first)."""
    return lambda event: bool(event["checkout_id"] == checkout["checkout_id"])


def _path(url: str) -> str:
    return url.split("?", 1)[0]


@pytest.mark.parametrize("hold", sorted(HOLDS))
@modes
@kinds
def test_request_held_past_threshold_names_view_line_request_and_state(
    sites: Sites, kind: Kind, mode: str, hold: str
) -> None:
    url, view, state, holder_function = HOLDS[hold]
    server = sites.get(kind, mode)
    mark = server.mark()
    server.get_json(url)
    label = f"GET {_path(url)} ({view})"

    def ours(event: dict[str, Any]) -> bool:
        return bool(event["context"] == label)

    (suspected,) = server.wait_for_event("leak.suspected", since=mark, where=ours)
    assert names(suspected, hold), suspected["stack"]
    assert suspected["holder"].endswith(f" during {label}")
    assert suspected["state"] == state
    assert suspected["threshold_s"] == pytest.approx(THRESHOLD)  # PGLEAK, not the env's 99
    assert suspected["pool"].startswith(database(mode))
    assert suspected["holder_finished"] is False
    if holder_function is not None:  # where the view is now: inside its sleep
        assert any(f" in {holder_function}" in f for f in suspected["holder_stack"])

    if (kind, mode) == ASGI_PERSISTENT:
        # Parked in a thread that has ended: nothing returns it; the collector frees it.
        # Matched by checkout: each /gc/ may also free connections earlier requests parked.
        collected = server.collect_until("leak.collected", since=mark, where=same(suspected))
        assert (collected["context"], collected["stack"]) == (
            suspected["context"],
            suspected["stack"],
        )
        assert not server.events("leak.returned", since=mark)
    else:
        (returned,) = server.wait_for_event("leak.returned", since=mark, where=ours)
        assert returned["checkout_id"] == suspected["checkout_id"]
        assert returned["held_s"] >= 0.7


@pytest.mark.parametrize(
    ("kind", "mode"),
    # ASGI with persistent connections: test_asgi_persistent_connection_outlives_its_request_thread
    [(kind, mode) for kind in KINDS for mode in sorted(MODES) if (kind, mode) != ASGI_PERSISTENT],
)
def test_a_brief_request_is_never_reported(sites: Sites, kind: Kind, mode: str) -> None:
    server = sites.get(kind, mode)
    mark = server.mark()
    for _ in range(2):
        server.get_json("/query/")
        server.get_json("/async-query/")
    server.get_json("/gc/")  # a connection dropped without a close would be collected now
    # Then a hold that is reported: a brief request's report, due earlier, or a collected
    # one, queued earlier, would come before its reports.
    server.get_json("/idle-in-transaction/?seconds=0.6")
    server.wait_for_event("leak.returned", since=mark)
    reported = [(e["event"], e["context"]) for e in server.events(since=mark)]
    label = "GET /idle-in-transaction/ (tests.django_site.views.idle_in_transaction)"
    assert reported == [("leak.suspected", label), ("leak.returned", label)]


def test_asgi_persistent_connection_outlives_its_request_thread(sites: Sites) -> None:
    """Django ticket #33497: under ASGI, ``CONN_MAX_AGE > 0`` leaks a connection per request.

    Each request's sync code runs in a thread made for it; Django keeps the connection in that
    thread's wrapper, the thread ends, and the connection stays open, unused, until the
    garbage collector frees the wrapper.
    """
    server = sites.get("asgi", "persistent")
    mark = server.mark()
    body = server.get_json("/query/")
    label = "GET /query/ (tests.django_site.views.query)"

    def ours(event: dict[str, Any]) -> bool:
        return bool(event["context"] == label)

    (suspected,) = server.wait_for_event("leak.suspected", since=mark, where=ours)
    assert names(suspected, "query")
    assert suspected["holder"] == f"thread {body['thread']!r} during {label}"
    assert suspected["holder_finished"] is True
    assert suspected["state"] == "idle"
    assert "under ASGI each request runs in a thread of its own" in server.log()
    # Matched by checkout: each /gc/ may also free connections earlier requests parked.
    collected = server.collect_until("leak.collected", since=mark, where=same(suspected))
    assert (collected["context"], collected["stack"]) == (suspected["context"], suspected["stack"])


@modes
@kinds
def test_thread_started_in_a_view_is_reported_then_collected(
    sites: Sites, kind: Kind, mode: str
) -> None:
    """The thread's own connection, which nothing in Django closes, outlives the request."""
    server = sites.get(kind, mode)
    server.get_json("/query/")  # the native pool is created (and pinned) by a request thread
    mark = server.mark()
    leaked = server.get_json("/thread-leak/")  # the thread ends right after its query

    def ours(event: dict[str, Any]) -> bool:
        return bool(event["holder"] == f"thread {leaked['thread']!r}")

    (suspected,) = server.wait_for_event("leak.suspected", since=mark, where=ours)
    assert names(suspected, "thread-leak"), suspected["stack"]
    assert suspected["holder_finished"] is True
    assert suspected["context"] is None  # a thread started in a view is outside the request
    assert suspected["state"] == "idle"
    assert suspected["pool"].startswith(database(mode))
    # Matched by checkout: each /gc/ may also free connections earlier requests parked.
    collected = server.collect_until("leak.collected", since=mark, where=same(suspected))
    assert (collected["context"], collected["stack"]) == (suspected["context"], suspected["stack"])
    assert names(collected, "thread-leak")


@modes
@kinds
def test_tags_in_pg_stat_activity(sites: Sites, kind: Kind, mode: str) -> None:
    """Sanitised default tag; the application's own ``OPTIONS["application_name"]`` kept."""
    server = sites.get(kind, mode)
    for view in ("/query/", "/async-query/"):
        tagged = server.get_json(view)
        assert tagged["application_name"] == tag_of(HOSTILE_SERVICE, tagged["process"])
        assert tagged["application_name"].startswith(sanitize("it's \"shop\" \\ x'; DROP"))
        assert len(tagged["application_name"].encode()) <= LIMIT
        assert tagged["application_name"].isprintable()
        assert tagged["application_name"].isascii()
        assert tagged["pooled"] is (mode == "native-pool")
    own = server.get_json("/query/?using=named")
    assert own["application_name"] == OWN_NAME
    assert own["process"] != os.getpid()
