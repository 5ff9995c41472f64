"""Instructions pgleak adds per asyncio checkout + checkin, counted inside the loop only.

Usage::

    python benchmarks/bench_instructions_loop.py --paths asyncpg --settings default,no_stack

``bench_instructions.py`` counts every instruction of the process, so the work pgleak's
watchdog thread and the pools' timers do by the wall clock shows up per cycle, and more so the
slower valgrind runs (a loaded machine: the same commit moved by thousands of instructions).
This runs the same cycles (same paths, pools and depth, from ``bench_cost.py``) inside
``sys.call_tracing``, and has callgrind collect only there (``--collect-atstart=no
--toggle-collect=sys_call_tracing``): no start-up, no other thread. Runs of ``N1`` and ``N2``
cycles in processes of their own; their difference per cycle. asyncio paths only (the sync
ones' loop is not an event loop to hand over). Needs ``valgrind`` on ``PATH``.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import subprocess
import sys
import types
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cost

PATHS = ("asyncpg", "psycopg_pool_async", "sqlalchemy_async")
SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "no_stack": {"capture_stack": False}}
N1, N2 = 500, 1500
_REFS = re.compile(r"(?:I\s+refs|Collected)\s*:\s*([\d,]+)")


def child(path: str, setting: str, installed: bool, n: int, where: dict[str, Any]) -> None:
    import pgleak

    server: Any = types.SimpleNamespace(**where)
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _, bare, _, close = loop.run_until_complete(bench_cost.async_paths(server))[path]
    if installed:
        pgleak.install(**SETTINGS[setting])
    loop.run_until_complete(bare(50))
    cycles = bench_cost._adeep(bench_cost.DEPTH, lambda: bare(n))
    sys.call_tracing(loop.run_until_complete, (cycles,))  # the only stretch counted
    loop.run_until_complete(close())
    loop.close()


def count(path: str, setting: str, installed: bool, n: int, where: dict[str, Any]) -> int:
    args = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        "--collect-atstart=no",
        "--toggle-collect=sys_call_tracing",
        sys.executable,
        __file__,
        "--child",
        f"{path}:{setting}:{int(installed)}:{n}",
        *(f"--{key}={value}" for key, value in where.items()),
    ]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=1800)
    found = _REFS.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def per_cycle(path: str, setting: str, installed: bool, where: dict[str, Any]) -> float:
    low = count(path, setting, installed, N1, where)
    high = count(path, setting, installed, N2, where)
    return (high - low) / (N2 - N1)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--paths", default=",".join(PATHS))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for key in ("host", "port", "user", "dbname"):
        parser.add_argument(f"--{key}", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        path, setting, installed, n = args.child.split(":")
        where = {"host": args.host, "port": int(args.port), "user": args.user}
        child(path, setting, installed == "1", int(n), {**where, "dbname": args.dbname})
        return 0
    if shutil.which("valgrind") is None:
        print("bench_instructions_loop.py needs valgrind (apt install valgrind)", file=sys.stderr)
        return 2
    from pgleak.embedded import EmbeddedPostgres

    paths = [p for p in args.paths.split(",") if p]
    settings = [s for s in args.settings.split(",") if s]
    print("| path | setting | bare cycle | pgleak adds | added / bare |")
    print("|---|---|---:|---:|---:|")
    with EmbeddedPostgres(max_connections=20) as server:
        where = {
            "host": server.host,
            "port": server.port,
            "user": server.user,
            "dbname": server.dbname,
        }
        jobs = [(path, "default", False) for path in paths] + [
            (path, setting, True) for path in paths for setting in settings
        ]

        def run(job: tuple[str, str, bool]) -> float:
            return per_cycle(job[0], job[1], job[2], where)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            counted = dict(zip(jobs, pool.map(run, jobs), strict=True))
        for path in paths:
            bare = counted[(path, "default", False)]
            for setting in settings:
                added = counted[(path, setting, True)] - bare
                print(f"| {path} | {setting} | {bare:,.0f} | +{added:,.0f} | {added / bare:+.0%} |")
    print(
        f"\nInstructions per checkout + checkin cycle inside the loop (callgrind; runs of {N1}"
        f" and {N2} cycles, {bench_cost.DEPTH} frames deep), CPython {sys.version.split()[0]}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
