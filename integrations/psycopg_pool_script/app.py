"""psycopg_pool: a nightly import whose validation branch never puts its connection back.

Run: .venv/bin/python integrations/psycopg_pool_script/app.py

It starts a throwaway PostgreSQL, loads ten batches of payments with three threads sharing a
psycopg ``ConnectionPool`` of three connections, and prints what pgleak reports. The bug: a
batch that fails validation raises between ``pool.getconn()`` and ``pool.putconn(conn)``. After
three bad batches the pool is dry and every later batch times out. (The fix: ``with
pool.connection() as conn:``.)
"""

from __future__ import annotations

import logging
import sys
from concurrent.futures import ThreadPoolExecutor

from psycopg_pool import ConnectionPool, PoolTimeout

import pgleak
from pgleak.embedded import EmbeddedPostgres

# Report connections held over 1 s (default 30 s).
pgleak.install(leak_threshold=1)  # <- the one line of set-up

# pgleak reports on the standard logger "pgleak": any logging set-up shows them.
logging.basicConfig(stream=sys.stdout, level="INFO", format="%(levelname)s %(name)s: %(message)s")


def load_batch(pool: ConnectionPool, batch: list[tuple[int, float]]) -> int:
    conn = pool.getconn()  # <- the leaking line
    if any(amount < 0 for _, amount in batch):
        raise ValueError(f"negative amount in the batch from id {batch[0][0]}")  # BUG: no putconn
    with conn.cursor() as cur:
        cur.executemany("INSERT INTO payments (id, amount) VALUES (%s, %s)", batch)
    conn.commit()
    pool.putconn(conn)
    return len(batch)


def main() -> int:
    events: list[pgleak.LeakEvent] = []
    pgleak.add_sink(events.append)  # every event, to name the culprit at the end
    with (
        EmbeddedPostgres(max_connections=5) as pg,
        ConnectionPool(pg.dsn(), min_size=1, max_size=3, timeout=2) as pool,
    ):
        with pool.connection() as conn:
            conn.execute("CREATE TABLE payments (id int PRIMARY KEY, amount numeric)")
        batches = [[(n * 100 + i, 9.99) for i in range(100)] for n in range(10)]
        for n in (2, 4, 5):  # three batches have a refund in them
            batches[n][50] = (n * 100 + 50, -9.99)
        with ThreadPoolExecutor(max_workers=3, thread_name_prefix="loader") as executor:
            futures = [executor.submit(load_batch, pool, batch) for batch in batches]
            for n, future in enumerate(futures):
                try:
                    print(f"batch {n}: {future.result()} rows loaded")
                except (ValueError, PoolTimeout) as exc:
                    print(f"batch {n}: failed: {type(exc).__name__}: {exc}")
    pgleak.uninstall()  # logs the counts of repeated reports now rather than at exit

    exhausted = [event for event in events if event.event == "pool.exhausted"]
    if not exhausted or not exhausted[0].holders:
        print("pgleak reported no exhausted pool", file=sys.stderr)
        return 1
    print(f"pgleak named the leaking line: {exhausted[0].holders[0].site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
