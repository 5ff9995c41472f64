"""Flask + SQLAlchemy: a shop whose CSV export holds a database connection while it streams.

Run: .venv/bin/python integrations/flask_sqlalchemy/app.py

It starts a throwaway PostgreSQL, serves the app on 127.0.0.1 with werkzeug's threaded server,
sends it requests with urllib, and prints what pgleak reports. The bug: ``/orders.csv`` streams
straight from a database cursor, so its connection stays checked out until the client has read
the last byte. Three clients that stop reading hold the whole pool, and every page of the shop
fails. (The fix: stream from rows fetched up front, or fetch each chunk in its own
``with engine.connect()`` block.)
"""

from __future__ import annotations

import logging
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from typing import Any

import sqlalchemy as sa
from flask import Flask, Response
from werkzeug.serving import make_server

import pgleak
from pgleak.embedded import EmbeddedPostgres

# Report connections held over 1 s (default 30 s); the dev server's frames are counted, not listed.
pgleak.install(leak_threshold=1)  # <- the one line of set-up

# pgleak reports on the standard logger "pgleak": any logging set-up shows them.
logging.basicConfig(stream=sys.stdout, level="INFO", format="%(levelname)s %(name)s: %(message)s")
logging.getLogger("werkzeug").setLevel("WARNING")  # no access log


def create_app(engine: sa.Engine) -> Flask:
    app = Flask(__name__)

    @app.get("/customers/<int:customer_id>")
    def customer(customer_id: int) -> dict[str, Any]:
        with engine.connect() as conn:  # correct: back in the pool at the end of the block
            total = conn.execute(
                sa.text("SELECT sum(total) FROM orders WHERE customer_id = :id"),
                {"id": customer_id},
            ).scalar()
        return {"customer": customer_id, "total": float(total or 0)}

    @app.get("/orders.csv")
    def orders_csv() -> Response:
        conn = engine.connect()  # <- the leaking line
        rows = conn.execution_options(yield_per=1000).execute(sa.text("SELECT * FROM orders"))

        def generate() -> Iterator[str]:
            yield "id,customer_id,total,address\n"
            for chunk in rows.partitions():  # BUG: a client that stops reading keeps conn
                yield "".join(f"{r.id},{r.customer_id},{r.total},{r.address}\n" for r in chunk)
            conn.close()

        return Response(generate(), mimetype="text/csv")

    @app.errorhandler(sa.exc.TimeoutError)  # the pool is dry: "QueuePool limit ... reached"
    def busy(exc: sa.exc.TimeoutError) -> tuple[str, int]:
        return "busy, try again later", 503

    return app


def get(url: str) -> str:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return f"{response.status} {response.read().decode().strip()}"
    except urllib.error.HTTPError as exc:
        return f"{exc.code} {exc.read().decode().strip()}"


def main() -> int:
    events: list[pgleak.LeakEvent] = []
    pgleak.add_sink(events.append)  # every event, to name the culprit at the end
    with EmbeddedPostgres(max_connections=5) as pg:
        engine = sa.create_engine(pg.url("psycopg"), pool_size=3, max_overflow=0, pool_timeout=2)
        with engine.begin() as conn:  # 100,000 orders: a 14 MB export
            conn.execute(
                sa.text(
                    "CREATE TABLE orders AS SELECT n AS id, n % 100 AS customer_id,"
                    " n % 70 + 0.5 AS total, repeat(md5(n::text), 4) AS address"
                    " FROM generate_series(1, 100000) n"
                )
            )
        server = make_server("127.0.0.1", 0, create_app(engine), threaded=True)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        base = f"http://127.0.0.1:{server.port}"

        print("GET /customers/7 ->", get(f"{base}/customers/7"))
        # Three clients on a slow network start the export, then stop reading.
        stalled = [urllib.request.urlopen(f"{base}/orders.csv", timeout=10) for _ in range(3)]
        print("GET /orders.csv -> 200, three times; the clients stop reading")
        print("GET /customers/7 ->", get(f"{base}/customers/7"))  # waits pool_timeout=2s
        for response in stalled:  # the clients read to the end after all
            print(f"GET /orders.csv: read {len(response.read()) // 1_000_000} MB")
        server.shutdown()
        engine.dispose()
    pgleak.uninstall()  # logs the counts of repeated reports now rather than at exit

    exhausted = [event for event in events if event.event == "pool.exhausted"]
    if not exhausted or not exhausted[0].holders:
        print("pgleak reported no exhausted pool", file=sys.stderr)
        return 1
    print(f"pgleak named the leaking line: {exhausted[0].holders[0].site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
