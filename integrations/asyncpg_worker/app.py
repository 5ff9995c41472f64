"""asyncpg: a job worker whose "nothing to do" path returns without releasing its connection.

Run: .venv/bin/python integrations/asyncpg_worker/app.py

It starts a throwaway PostgreSQL, queues nine invoice jobs for three worker tasks sharing an
asyncpg pool of three connections, and prints what pgleak reports. The bug: a job for an invoice
that was sent already (a message delivered twice) returns before ``pool.release(conn)``. After
three such jobs the pool is dry and every later job times out. (The fix: ``async with
pool.acquire() as conn:``.)
"""

from __future__ import annotations

import asyncio
import logging
import sys

import asyncpg

import pgleak
from pgleak.embedded import EmbeddedPostgres

# Report connections held over 1 s (default 30 s).
pgleak.install(leak_threshold=1)  # <- the one line of set-up

# pgleak reports on the standard logger "pgleak": any logging set-up shows them.
logging.basicConfig(stream=sys.stdout, level="INFO", format="%(levelname)s %(name)s: %(message)s")


async def send_invoice(pool: asyncpg.Pool, invoice_id: int) -> str:
    conn = await pool.acquire(timeout=2)  # <- the leaking line
    sent = await conn.fetchval("SELECT sent FROM invoices WHERE id = $1", invoice_id)
    if sent:
        return "sent already, skipped"  # BUG: returns without releasing conn
    await conn.execute("UPDATE invoices SET sent = true WHERE id = $1", invoice_id)
    await pool.release(conn)
    return "sent"


async def worker(name: str, pool: asyncpg.Pool, queue: asyncio.Queue[int]) -> None:
    while True:
        invoice_id = await queue.get()
        try:
            print(f"{name}: invoice {invoice_id}: {await send_invoice(pool, invoice_id)}")
        except asyncio.TimeoutError:
            print(f"{name}: invoice {invoice_id}: failed, no connection within 2s")
        finally:
            queue.task_done()


async def run(url: str) -> None:
    pool = await asyncpg.create_pool(url, min_size=1, max_size=3)
    await pool.execute(
        "CREATE TABLE invoices AS SELECT n AS id, n IN (3, 5, 6) AS sent"
        " FROM generate_series(1, 9) n"
    )
    queue: asyncio.Queue[int] = asyncio.Queue()
    for invoice_id in range(1, 10):
        queue.put_nowait(invoice_id)
    workers = [
        asyncio.create_task(worker(f"worker-{n}", pool, queue), name=f"worker-{n}")
        for n in (1, 2, 3)
    ]
    await queue.join()
    for task in workers:
        task.cancel()
    pool.terminate()  # pool.close() would wait forever for the leaked connections


def main() -> int:
    events: list[pgleak.LeakEvent] = []
    pgleak.add_sink(events.append)  # every event, to name the culprit at the end
    with EmbeddedPostgres(max_connections=5) as pg:
        asyncio.run(run(pg.url(driver="")))
    pgleak.uninstall()  # logs the counts of repeated reports now rather than at exit

    exhausted = [event for event in events if event.event == "pool.exhausted"]
    if not exhausted or not exhausted[0].holders:
        print("pgleak reported no exhausted pool", file=sys.stderr)
        return 1
    print(f"pgleak named the leaking line: {exhausted[0].holders[0].site}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
