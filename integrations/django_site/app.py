"""Django: a shop whose mailer threads keep their database connections forever.

Run: .venv/bin/python integrations/django_site/app.py

It starts a throwaway PostgreSQL with three connection slots, serves the shop in ``shop/``
with the standard library's threaded WSGI server on 127.0.0.1, sends it requests with urllib,
and prints what pgleak reports. pgleak is set up by one line in ``shop/settings.py``: the app
in ``INSTALLED_APPS``, configured by the ``PGLEAK`` dict next to it.

The bug: ``checkout`` hands the confirmation mail to a pool of mailer threads. The first query
in each mailer thread opens a Django connection of the thread's own, and Django closes only
the connections of requests: each mailer keeps one, idle, for the life of the process. Three
orders placed at once start three mailers, which then hold every slot of the server, and each
later request is refused with "sorry, too many clients already". (The fix, in
``shop/views.py``: ``close_old_connections()`` around each task.)
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from socketserver import ThreadingMixIn
from typing import Any
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server

import pgleak
from pgleak.embedded import EmbeddedPostgres

# pgleak reports on the standard logger "pgleak": any logging set-up shows them.
logging.basicConfig(stream=sys.stdout, level="INFO", format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("django.request").setLevel("CRITICAL")  # the refused requests print below


class ThreadedServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


class QuietHandler(WSGIRequestHandler):
    def log_message(self, format: str, *args: Any) -> None:  # no access log
        pass


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return f"{response.status} {response.read().decode().strip()}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.reason}"


def main() -> int:
    events: list[pgleak.LeakEvent] = []
    pgleak.add_sink(events.append)  # every event, to name the culprit at the end
    suspected = threading.Event()

    def notice(event: pgleak.LeakEvent) -> None:
        if event.event == "leak.suspected":
            suspected.set()

    pgleak.add_sink(notice)
    with EmbeddedPostgres(max_connections=3) as pg:
        os.environ.update(
            DJANGO_SETTINGS_MODULE="shop.settings",
            SHOP_DB_HOST=pg.host,
            SHOP_DB_PORT=str(pg.port),
            SHOP_DB_USER=pg.user,
            SHOP_DB_NAME=pg.dbname,
        )
        sys.path.insert(0, str(Path(__file__).resolve().parent))  # the "shop" package
        from django.apps import apps
        from django.core.wsgi import get_wsgi_application
        from django.db import connection

        application = get_wsgi_application()  # django.setup(): pgleak installs itself here
        with connection.schema_editor() as schema:
            schema.create_model(apps.get_model("shop", "Order"))
        connection.close()

        server = make_server(
            "127.0.0.1", 0, application, server_class=ThreadedServer, handler_class=QuietHandler
        )
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.server_port}"

        print("GET /orders/ ->", get(f"{base}/orders/"))
        emails = [f"{name}@example.com" for name in ("ann", "bob", "eve")]
        with ThreadPoolExecutor(max_workers=3) as customers:  # three orders at once
            replies = customers.map(lambda e: get(f"{base}/checkout/?email={e}"), emails)
            for email, reply in zip(emails, replies, strict=True):
                print(f"GET /checkout/?email={email} ->", reply)
        suspected.wait(10)  # the mailers' connections are held past the 1 s threshold
        print("GET /orders/ ->", get(f"{base}/orders/"), "(the server is full)")
        for held in pgleak.checked_out():
            print(f"held {held.held_s:.1f}s by {held.holder}, checked out at {held.site}")
        server.shutdown()
        pgleak.uninstall()  # logs the counts of repeated reports now rather than at exit

    reports = [e for e in events if e.event == "leak.suspected" and e.checkout is not None]
    if not reports or reports[0].checkout is None or not reports[0].checkout.site:
        print("pgleak reported no leak", file=sys.stderr)
        return 1
    print(f"pgleak named the leaking line: {reports[0].checkout.site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
