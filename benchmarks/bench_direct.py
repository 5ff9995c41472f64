"""What pgleak adds to a direct ``connect()`` + ``close()`` of each driver, against a real server.

Usage::

    python benchmarks/bench_direct.py            # full run, about a minute
    python benchmarks/bench_direct.py --quick    # smoke run for CI

One process, one throwaway server on loopback; per round, each driver's loop runs once without
pgleak and once with ``install()`` (defaults: tag, retry, stack capture), the order alternating
from round to round. Timed with ``time.thread_time()``: the client's own CPU time, which is
what pgleak adds to (the wall time of a connect is mostly the server forking a backend and
authenticating, which pgleak does not change, and which would bury the difference in noise).
The figure is the median over rounds of the CPU time per connect + close.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import statistics
import time
from collections.abc import Callable

import pgleak
from pgleak.embedded import EmbeddedPostgres


def _psycopg2(dsn: str, n: int) -> None:
    import psycopg2

    for _ in range(n):
        psycopg2.connect(dsn).close()


def _psycopg(dsn: str, n: int) -> None:
    import psycopg

    for _ in range(n):
        psycopg.connect(dsn).close()


def _asyncpg(url: str, loop: asyncio.AbstractEventLoop) -> Callable[[str, int], None]:
    import asyncpg

    async def run(n: int) -> None:
        for _ in range(n):
            await (await asyncpg.connect(url)).close()

    return lambda _dsn, n: loop.run_until_complete(run(n))


def _per_call(work: Callable[[str, int], None], dsn: str, n: int) -> tuple[float, float]:
    """(client CPU seconds, wall seconds) per connect + close."""
    gc.collect()
    gc.disable()
    try:
        start, wall = time.thread_time(), time.perf_counter()
        work(dsn, n)
        return (time.thread_time() - start) / n, (time.perf_counter() - wall) / n
    finally:
        gc.enable()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    rounds, n = (3, 5) if args.quick else (15, 40)
    loop = asyncio.new_event_loop()
    with EmbeddedPostgres(max_connections=20) as server:
        dsn = server.dsn()
        url = f"postgresql://{server.user}@{server.host}:{server.port}/{server.dbname}"
        drivers: dict[str, tuple[Callable[[str, int], None], str]] = {
            "psycopg2.connect": (_psycopg2, dsn),
            "psycopg.connect": (_psycopg, dsn),
            "asyncpg.connect": (_asyncpg(url, loop), url),
        }
        results: dict[str, dict[bool, list[tuple[float, float]]]] = {
            name: {False: [], True: []} for name in drivers
        }
        for work, target in drivers.values():  # warm up imports, caches, the server
            work(target, 2)
        for r in range(rounds):
            for on in (r % 2 == 0, r % 2 == 1):
                if on:
                    pgleak.install()
                for name, (work, target) in drivers.items():
                    results[name][on].append(_per_call(work, target, n))
                if on:
                    pgleak.uninstall()
    loop.close()
    print(f"{rounds} rounds x {n} connect + close per driver; medians per connect + close")
    print("| driver | CPU without | CPU with `install()` | added | wall without | added (wall) |")
    print("|---|---:|---:|---:|---:|---:|")
    for name, by in results.items():
        cpu = [statistics.median(t[0] for t in by[on]) for on in (False, True)]
        wall = [statistics.median(t[1] for t in by[on]) for on in (False, True)]
        print(
            f"| {name} | {cpu[0] * 1e6:.0f} µs | {cpu[1] * 1e6:.0f} µs | "
            f"{(cpu[1] - cpu[0]) * 1e6:+.0f} µs | {wall[0] * 1e3:.2f} ms | "
            f"{(wall[1] - wall[0]) / wall[0]:+.1%} |"
        )


if __name__ == "__main__":
    main()
