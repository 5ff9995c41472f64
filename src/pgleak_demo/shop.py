"""A small multi-threaded SQLAlchemy app with the connection bugs real apps have.

Each handler stands for a web request served by a worker thread. Three of them are buggy:

* ``order_history`` returns early on an empty result and never closes its connection: the
  classic leak that ends in ``FATAL: sorry, too many clients already``.
* ``nightly_export`` holds its connection while it "formats a report" for several seconds:
  not a leak, but it looks like one until it comes back.
* ``cart_count`` forgets to close, but drops its last reference, so the connection is
  garbage-collected: SQLAlchemy quietly returns it, pgleak says where it came from.
"""

from __future__ import annotations

import gc
import time

import sqlalchemy as sa


def product_page(engine: sa.Engine, product_id: int) -> int:
    """A correct handler: the connection goes back to the pool when the block ends."""
    with engine.connect() as conn:
        return int(conn.execute(sa.text("select :id * 2"), {"id": product_id}).scalar_one())


def order_history(engine: sa.Engine, customer_id: int) -> list[int]:
    """BUG: the early return skips conn.close(); every call leaks one connection."""
    conn = engine.connect()  # <- the leaking line
    rows = conn.execute(sa.text("select 1 where :c < 0"), {"c": customer_id}).all()
    if not rows:
        return []
    result = [row[0] for row in rows]
    conn.close()
    return result


def nightly_export(engine: sa.Engine, seconds: float) -> int:
    """Holds a connection while doing slow work that does not need it."""
    conn = engine.connect()
    try:
        count = int(conn.execute(sa.text("select 42")).scalar_one())
        time.sleep(seconds)  # "formatting the report" with the connection still checked out
        return count
    finally:
        conn.close()


def cart_count(engine: sa.Engine) -> int:
    """BUG: never closes; the connection object is simply dropped."""
    conn = engine.connect()
    value = int(conn.execute(sa.text("select 3")).scalar_one())
    del conn
    gc.collect()
    return value
