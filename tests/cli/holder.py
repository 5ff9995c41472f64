"""A real client process for the doctor's tests: pgleak installed, a psycopg_pool holding
connections, and optionally one of them left idle in a transaction.

``python -m tests.cli.holder DSN SERVICE N [--txn]`` opens a pool of N connections (pgleak
tags each ``SERVICE@host:pid``), prints ``ready <backend pid> ...`` and holds everything until
its stdin closes.
"""

from __future__ import annotations

import sys

import pgleak


def main(argv: list[str]) -> None:
    dsn, service, size = argv[0], argv[1], int(argv[2])
    pgleak.install(service_name=service, leak_threshold=3600)
    import psycopg_pool

    pool = psycopg_pool.ConnectionPool(dsn, min_size=size, max_size=size, open=True)
    pool.wait(timeout=30)
    held = [pool.getconn(timeout=10) for _ in range(size)]
    pids = []
    for n, conn in enumerate(held):
        pids.append(conn.execute("select pg_backend_pid()").fetchone()[0])  # type: ignore[index]
        if "--txn" in argv and n == 0:
            continue  # left open: BEGIN happened with the select, no commit follows
        conn.commit()
    print("ready", *pids, flush=True)
    sys.stdin.read()  # until the test closes our stdin
    for conn in held:
        conn.rollback()
        pool.putconn(conn)
    pool.close()


if __name__ == "__main__":
    main(sys.argv[1:])
