"""What pgleak adds to a checkout + checkin of every other pool it tracks, against a real server.

Usage::

    python benchmarks/bench_pools.py            # full run, about two minutes
    python benchmarks/bench_pools.py --quick    # smoke run for CI

Same method as ``bench_checkout.py`` (which covers SQLAlchemy): one process, one throwaway
server, pools of one connection, configurations interleaved round by round (bare library,
``install(capture_stack=False)``, ``install()``), median per-iteration time over rounds, the
garbage collector off while timing, loops run 20 Python frames deep, the process and its
backends pinned to one CPU. Two workloads per pool: the bare checkout + checkin and the same
around ``SELECT 1``.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import platform
import statistics
import sys
import time
from collections.abc import Awaitable, Callable
from functools import partial
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_checkout as common

import pgleak
from pgleak.embedded import EmbeddedPostgres

CONFIGS: tuple[tuple[str, str, dict[str, Any] | None], ...] = (
    ("bare", "library alone", None),
    ("no_stack", "install(capture_stack=False)", {"capture_stack": False}),
    ("default", f"install() (stack_depth={pgleak.Settings().stack_depth})", {}),
)

SyncLoop = Callable[[Any, int], None]
AsyncLoop = Callable[[Any, int], Awaitable[None]]


# -- workloads ----------------------------------------------------------------------------------


def pp_bare(pool: Any, n: int) -> None:
    connection = pool.connection
    for _ in range(n):
        with connection():
            pass


def pp_query(pool: Any, n: int) -> None:
    connection = pool.connection
    for _ in range(n):
        with connection() as conn:
            conn.execute("select 1")


async def pp_async_bare(pool: Any, n: int) -> None:
    connection = pool.connection
    for _ in range(n):
        async with connection():
            pass


async def pp_async_query(pool: Any, n: int) -> None:
    connection = pool.connection
    for _ in range(n):
        async with connection() as conn:
            await conn.execute("select 1")


def p2_bare(pool: Any, n: int) -> None:
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        putconn(getconn())


def p2_query(pool: Any, n: int) -> None:
    getconn, putconn = pool.getconn, pool.putconn
    for _ in range(n):
        conn = getconn()
        with conn.cursor() as cur:
            cur.execute("select 1")
            cur.fetchone()
        conn.rollback()
        putconn(conn)


async def apg_bare(pool: Any, n: int) -> None:
    acquire = pool.acquire
    for _ in range(n):
        async with acquire():
            pass


async def apg_query(pool: Any, n: int) -> None:
    acquire = pool.acquire
    for _ in range(n):
        async with acquire() as conn:
            await conn.fetchval("select 1")


# -- timing ---------------------------------------------------------------------------------


def _time_sync(loop: SyncLoop, pool: Any, n: int) -> int:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        loop(pool, n)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


async def _time_async(loop: AsyncLoop, pool: Any, n: int) -> int:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        await loop(pool, n)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


def _enter(settings: dict[str, Any] | None, adapter: str) -> None:
    if settings is not None:
        pgleak.install(**settings)
        if adapter not in pgleak.installed():
            raise SystemExit(f"pgleak's {adapter} adapter is not installed: nothing to measure")


def _iterations(per_iteration_ns: float, plan: common.Plan) -> int:
    wanted = int(plan.round_seconds / len(CONFIGS) * 1e9 / max(per_iteration_ns, 1.0))
    return max(plan.min_iterations, min(plan.max_iterations, wanted))


def measure_sync(
    name: str, loop: SyncLoop, pool: Any, plan: common.Plan, depth: int
) -> dict[str, float]:
    common.at_depth(depth, partial(_time_sync, loop, pool, plan.warmup_iterations))
    spent = common.at_depth(depth, partial(_time_sync, loop, pool, plan.calibrate_iterations))
    n = _iterations(spent / plan.calibrate_iterations, plan)
    per_round: dict[str, list[float]] = {key: [] for key, _, _ in CONFIGS}
    common.log(f"{name}: {plan.rounds} rounds x {len(CONFIGS)} configs x {n} iterations")
    for _ in range(plan.rounds):
        for key, _, settings in CONFIGS:
            _enter(settings, name.split(maxsplit=1)[0])
            common.at_depth(depth, partial(_time_sync, loop, pool, plan.warmup_iterations))
            per_round[key].append(common.at_depth(depth, partial(_time_sync, loop, pool, n)) / n)
            pgleak.uninstall()
    return {key: statistics.median(values) for key, values in per_round.items()}


async def measure_async(
    name: str, loop: AsyncLoop, pool: Any, plan: common.Plan, depth: int
) -> dict[str, float]:
    async def timed(n: int) -> int:
        return await common.at_depth_async(depth, partial(_time_async, loop, pool, n))

    await timed(plan.warmup_iterations)
    spent = await timed(plan.calibrate_iterations)
    n = _iterations(spent / plan.calibrate_iterations, plan)
    per_round: dict[str, list[float]] = {key: [] for key, _, _ in CONFIGS}
    common.log(f"{name}: {plan.rounds} rounds x {len(CONFIGS)} configs x {n} iterations")
    for _ in range(plan.rounds):
        for key, _, settings in CONFIGS:
            _enter(settings, name.split(maxsplit=1)[0])
            await timed(plan.warmup_iterations)
            per_round[key].append(await timed(n) / n)
            pgleak.uninstall()
    return {key: statistics.median(values) for key, values in per_round.items()}


# -- pools ----------------------------------------------------------------------------------


def run_psycopg_pool(
    server: EmbeddedPostgres, plan: common.Plan, depth: int, pinning: common.Pinning
) -> dict[str, dict[str, float]]:
    from psycopg_pool import ConnectionPool

    results = {}
    with ConnectionPool(server.dsn(), min_size=1, max_size=1, open=True) as pool:
        with pool.connection() as conn:
            pinning.backend("psycopg_pool", int(conn.info.backend_pid))
        results["psycopg_pool bare"] = measure_sync("psycopg_pool bare", pp_bare, pool, plan, depth)
        results["psycopg_pool query"] = measure_sync(
            "psycopg_pool query", pp_query, pool, plan, depth
        )
    return results


async def run_psycopg_pool_async(
    server: EmbeddedPostgres, plan: common.Plan, depth: int, pinning: common.Pinning
) -> dict[str, dict[str, float]]:
    from psycopg_pool import AsyncConnectionPool

    results = {}
    async with AsyncConnectionPool(server.dsn(), min_size=1, max_size=1, open=False) as pool:
        async with pool.connection() as conn:
            pinning.backend("psycopg_pool-async", int(conn.info.backend_pid))
        results["psycopg_pool async bare"] = await measure_async(
            "psycopg_pool async bare", pp_async_bare, pool, plan, depth
        )
        results["psycopg_pool async query"] = await measure_async(
            "psycopg_pool async query", pp_async_query, pool, plan, depth
        )
    return results


def run_psycopg2(
    server: EmbeddedPostgres, plan: common.Plan, depth: int, pinning: common.Pinning
) -> dict[str, dict[str, float]]:
    from psycopg2.pool import ThreadedConnectionPool

    pool = ThreadedConnectionPool(1, 1, server.dsn())
    try:
        conn = pool.getconn()
        pinning.backend("psycopg2", int(conn.get_backend_pid()))
        pool.putconn(conn)
        return {
            "psycopg2 bare": measure_sync("psycopg2 bare", p2_bare, pool, plan, depth),
            "psycopg2 query": measure_sync("psycopg2 query", p2_query, pool, plan, depth),
        }
    finally:
        pool.closeall()


async def run_asyncpg(
    server: EmbeddedPostgres, plan: common.Plan, depth: int, pinning: common.Pinning
) -> dict[str, dict[str, float]]:
    import asyncpg

    pool = await asyncpg.create_pool(
        host=server.host,
        port=server.port,
        user=server.user,
        database=server.dbname,
        min_size=1,
        max_size=1,
    )
    try:
        async with pool.acquire() as conn:
            pinning.backend("asyncpg", int(conn.get_server_pid()))
        return {
            "asyncpg bare": await measure_async("asyncpg bare", apg_bare, pool, plan, depth),
            "asyncpg query": await measure_async("asyncpg query", apg_query, pool, plan, depth),
        }
    finally:
        await pool.close()


# -- main -----------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="few rounds: a smoke run")
    parser.add_argument("--depth", type=int, default=20, help="extra frames under the loops")
    parser.add_argument("--no-pin", action="store_true", help="do not pin to one CPU")
    args = parser.parse_args(argv)
    plan = common.QUICK if args.quick else common.FULL
    pinning = common.Pinning(not args.no_pin)
    results: dict[str, dict[str, float]] = {}
    try:
        with EmbeddedPostgres(max_connections=20) as server:
            results |= run_psycopg_pool(server, plan, args.depth, pinning)
            results |= asyncio.run(run_psycopg_pool_async(server, plan, args.depth, pinning))
            results |= run_psycopg2(server, plan, args.depth, pinning)
            results |= asyncio.run(run_asyncpg(server, plan, args.depth, pinning))
            pg_version = server.version
    finally:
        pinning.restore()

    header = "| workload | " + " | ".join(label for _, label, _ in CONFIGS) + " |"
    print("\n" + header)
    print("|---|" + "---:|" * len(CONFIGS))
    for workload, medians in results.items():
        bare = medians["bare"]
        cells = [f"{bare / 1000:.2f} µs"]
        for key, _, _ in CONFIGS[1:]:
            value = medians[key]
            cells.append(
                f"{value / 1000:.2f} µs (+{(value - bare) / 1000:.2f} µs, "
                f"{(value - bare) / bare * 100:+.1f}%)"
            )
        print(f"| {workload} | " + " | ".join(cells) + " |")
    print(
        f"\nCPython {platform.python_version()}, PostgreSQL {pg_version}, "
        f"psycopg-pool {common.version_of('psycopg-pool')}, "
        f"psycopg2 {common.version_of('psycopg2-binary')}, asyncpg {common.version_of('asyncpg')};"
        f" {pinning.note}; median of {plan.rounds} interleaved rounds; pools of one connection; "
        f"gc off while timing; loops run {args.depth} frames deep."
    )
    print("Command: `python benchmarks/bench_pools.py" + (" --quick" if args.quick else "") + "`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
