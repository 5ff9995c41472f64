"""Instructions pgleak adds per checkout + checkin, counted by valgrind: a measure noise can't move.

Usage::

    python benchmarks/bench_instructions.py                    # all six paths (~3 min)
    python benchmarks/bench_instructions.py --paths psycopg2 --settings no_stack

``bench_cost.py`` measures time, as issue 12 states its goals; on a shared machine its
confidence intervals are a microsecond wide, wider than most single changes to the hot path.
This counts the CPU instructions the same cycles execute (``valgrind --tool=callgrind``, which
counts every instruction of the process exactly, whatever else runs on the machine), so a
change of a few hundred instructions shows, run to run, to the instruction. Each path is run
with ``N1`` and ``N2`` cycles, in processes of their own, bare and with pgleak installed; the
difference between the two runs cancels start-up, import and the server connection, leaving
instructions per cycle. Same paths, pools and depth as ``bench_cost.py``.

Instructions are not time (a cache miss costs hundreds of cycles, an instruction a fraction of
one): the ratio of pgleak's instructions to the bare cycle's is a guide to where time goes and
a check that a change went the right way, not a replacement for ``bench_cost.py``'s figures.
Needs ``valgrind`` on ``PATH``.
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

PATHS = bench_cost.PATHS
SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "no_stack": {"capture_stack": False}}
#: Counted only when asked for (``--settings otel_sdk``): against the same span made by hand in
#: each cycle, as ``bench_cost.py`` measures it, so the bare run of that row is the hand-spanned
#: cycle, not the default's bare one.
OPTIONAL = ("otel_sdk",)
N1, N2 = 1000, 6000
_REFS = re.compile(r"(?:I\s+refs|Collected)\s*:\s*([\d,]+)")


def child(path: str, setting: str, installed: bool, n: int, where: dict[str, Any]) -> None:
    """Run ``n`` bare cycles of ``path`` (after a warm-up), with pgleak installed or not."""
    import pgleak

    server: Any = types.SimpleNamespace(**where)
    kwargs = _settings(setting)
    spanned = "tracer_provider" in kwargs
    if path in ("sqlalchemy", "psycopg_pool", "psycopg2"):
        _, bare, _, close = bench_cost.sync_paths(server)[path]
        run = bare
        if spanned:
            run = bench_cost._one_by_one(bare)
            if not installed:
                run = bench_cost._hand_spanned(bare, kwargs, path)
        if installed:
            pgleak.install(**kwargs)
        run(50)
        bench_cost._deep(bench_cost.DEPTH, lambda: run(n))
        close()
        return

    async def main() -> None:
        _, bare, _, close = (await bench_cost.async_paths(server))[path]
        arun = bare
        if spanned:
            arun = bench_cost._ahand_spanned(bare, None if installed else kwargs, path)
        if installed:
            pgleak.install(**kwargs)
        await arun(50)
        await bench_cost._adeep(bench_cost.DEPTH, lambda: arun(n))
        await close()

    asyncio.run(main())


def _settings(setting: str) -> dict[str, Any]:
    if setting == "otel_sdk":
        otel = bench_cost._otel_settings()
        if otel is None:
            raise SystemExit("opentelemetry-sdk not installed: otel_sdk cannot be counted")
        return otel
    return SETTINGS[setting]


def _bare_of(setting: str) -> str:
    """The setting whose uninstalled run is ``setting``'s baseline."""
    return setting if setting in OPTIONAL else "default"


def count(path: str, setting: str, installed: bool, n: int, where: dict[str, Any]) -> int:
    args = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        sys.executable,
        __file__,
        "--child",
        f"{path}:{setting}:{int(installed)}:{n}",
        *(f"--{key}={value}" for key, value in where.items()),
    ]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=900)
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
        print("bench_instructions.py needs valgrind (apt install valgrind)", file=sys.stderr)
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
        # Every count runs in a process of its own: as many at once as there are CPUs.
        bares = dict.fromkeys(_bare_of(setting) for setting in settings)
        jobs = [(path, bare, False) for path in paths for bare in bares] + [
            (path, setting, True) for path in paths for setting in settings
        ]

        def run(job: tuple[str, str, bool]) -> float:
            return per_cycle(job[0], job[1], job[2], where)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            counted = dict(zip(jobs, pool.map(run, jobs), strict=True))
        for path in paths:
            for setting in settings:
                bare = counted[(path, _bare_of(setting), False)]
                added = counted[(path, setting, True)] - bare
                print(f"| {path} | {setting} | {bare:,.0f} | +{added:,.0f} | {added / bare:+.0%} |")
    print(
        f"\nInstructions per checkout + checkin cycle (callgrind; runs of {N1} and {N2} cycles,"
        f" {bench_cost.DEPTH} frames deep), CPython {sys.version.split()[0]}."
        f"\nCommand: `{os.path.basename(sys.executable)} benchmarks/bench_instructions.py"
        f" --paths {','.join(paths)} --settings {','.join(settings)}`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
