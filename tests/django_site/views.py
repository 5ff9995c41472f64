"""Views that use the database the ways pgleak must tell apart.

Lines that take a connection end with ``# site: NAME``; ``server.view_site(NAME)`` gives their
``file:line``, to compare with the newest frame of a reported stack.

* ``query/``: a normal query; the connection is Django's to close or keep at request end.
  ``?using=named``: through the second alias, whose ``OPTIONS`` set an ``application_name``.
* ``thread-leak/``: starts a thread that queries through ``django.db.connection`` and never
  closes it: the thread's own connection outlives the request (``?hold=S`` keeps the thread
  alive S seconds after its query; without it the thread ends at once).
* ``idle-in-transaction/``: holds the connection idle inside ``transaction.atomic()`` for
  ``?seconds=S`` (default 1) before answering.
* ``open-transaction/``: turns autocommit off and returns with the transaction still open
  (Django closes such a connection at the end of the request).
* ``async-query/``: an async view; the query runs through ``sync_to_async``; ``?sleep=S``
  awaits S seconds after it, with the connection still open.
* ``gc/``: runs the garbage collector, so a dropped connection is collected now.
* ``health/``: no database; the harness polls it until the server answers.
"""

from __future__ import annotations

import asyncio
import gc
import itertools
import os
import threading
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.db import connection, connections, transaction
from django.http import HttpRequest, HttpResponse, JsonResponse

_thread_numbers = itertools.count(1)


def _describe(cursor: Any, request: HttpRequest | None, using: str = "default") -> dict[str, Any]:
    """What the view's connection is: backend pid and its pg_stat_activity name, mode, who."""
    cursor.execute(
        "SELECT pid, application_name FROM pg_stat_activity WHERE pid = pg_backend_pid()"
    )
    pid, application_name = cursor.fetchone()
    wrapper = connections[using]
    return {
        "pid": pid,
        "application_name": application_name,
        "thread": threading.current_thread().name,
        "process": os.getpid(),
        "pooled": getattr(wrapper, "pool", None) is not None,
        "conn_max_age": wrapper.settings_dict["CONN_MAX_AGE"],
        "in_atomic_block": wrapper.in_atomic_block,
        "request": None if request is None else type(request).__name__,
    }


def _seconds(request: HttpRequest, name: str, default: float) -> float:
    return float(request.GET.get(name, default))


def health(request: HttpRequest) -> HttpResponse:
    return HttpResponse("ok", content_type="text/plain")


def query(request: HttpRequest) -> JsonResponse:
    using = request.GET.get("using", "default")
    with connections[using].cursor() as cursor:  # site: query
        return JsonResponse(_describe(cursor, request, using))


def thread_leak(request: HttpRequest) -> JsonResponse:
    hold = _seconds(request, "hold", 0.0)
    done = threading.Event()
    found: dict[str, Any] = {}

    def work() -> None:
        try:
            # The thread's own connection (connections are per thread): nobody closes it.
            cursor = connection.cursor()  # site: thread-leak
            found.update(_describe(cursor, None))
        finally:
            done.set()
        if hold:
            time.sleep(hold)

    thread = threading.Thread(target=work, name=f"leaky-{next(_thread_numbers)}", daemon=True)
    thread.start()
    done.wait(30)
    return JsonResponse({**found, "thread": thread.name, "request_thread": _current_thread()})


def idle_in_transaction(request: HttpRequest) -> JsonResponse:
    with transaction.atomic(), connection.cursor() as cursor:  # site: idle-in-transaction
        found = _describe(cursor, request)
        time.sleep(_seconds(request, "seconds", 1.0))
    return JsonResponse(found)


def open_transaction(request: HttpRequest) -> JsonResponse:
    transaction.set_autocommit(False)  # site: open-transaction
    with connection.cursor() as cursor:
        found = _describe(cursor, request)
    return JsonResponse(found)


def _async_part(request: HttpRequest) -> dict[str, Any]:
    with connection.cursor() as cursor:  # site: async-query
        return _describe(cursor, request)


async def async_query(request: HttpRequest) -> JsonResponse:
    found = await sync_to_async(_async_part)(request)
    sleep = _seconds(request, "sleep", 0.0)
    if sleep:
        await asyncio.sleep(sleep)
    return JsonResponse({**found, "async": True, "view_thread": _current_thread()})


def collect(request: HttpRequest) -> JsonResponse:
    return JsonResponse({"collected": gc.collect()})


def _current_thread() -> str:
    return threading.current_thread().name
