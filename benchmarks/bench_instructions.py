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
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cost

PATHS = bench_cost.PATHS
SETTINGS: dict[str, dict[str, Any]] = {"default": {}, "no_stack": {"capture_stack": False}}
#: Counted only when asked for (``--settings otel_sdk``): against the same span made by hand in
#: each cycle, as ``bench_cost.py`` measures it, so the bare run of that row is the hand-spanned
#: cycle, not the default's bare one. ``otel_off``: the same with a tracer provider whose sampler
#: records nothing (``ALWAYS_OFF``), on both sides: pgleak's observer work without the SDK's
#: recording, which ``otel_sdk``'s figure would otherwise hide it among.
OPTIONAL = ("otel_sdk", "otel_off")
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
    if setting in ("otel_sdk", "otel_off"):
        otel = bench_cost._otel_settings(sampled=setting == "otel_sdk")
        if otel is None:
            raise SystemExit(f"opentelemetry-sdk not installed: {setting} cannot be counted")
        return otel
    return SETTINGS[setting]


def _bare_of(setting: str) -> str:
    """The setting whose uninstalled run is ``setting``'s baseline."""
    return setting if setting in OPTIONAL else "default"


def count(
    path: str,
    setting: str,
    installed: bool,
    n: int,
    where: dict[str, Any],
    script: str = __file__,
    collect: tuple[str, ...] = (),
) -> int:
    """Instructions of one child run of ``script`` under callgrind (``collect``: its options
    saying where to count; by default the whole process)."""
    args = [
        "valgrind",
        "--tool=callgrind",
        "--callgrind-out-file=/dev/null",
        *collect,
        sys.executable,
        script,
        "--child",
        f"{path}:{setting}:{int(installed)}:{n}",
        *(f"--{key}={value}" for key, value in where.items()),
    ]
    done = subprocess.run(args, capture_output=True, text=True, check=False, timeout=1800)
    found = _REFS.findall(done.stderr)
    if done.returncode != 0 or not found:
        raise RuntimeError(f"{' '.join(args)} failed:\n{done.stderr[-2000:]}")
    return int(found[-1].replace(",", ""))


def per_cycle(
    path: str,
    setting: str,
    installed: bool,
    where: dict[str, Any],
    runs: tuple[int, int] = (N1, N2),
    script: str = __file__,
    collect: tuple[str, ...] = (),
) -> float:
    low = count(path, setting, installed, runs[0], where, script, collect)
    high = count(path, setting, installed, runs[1], where, script, collect)
    return (high - low) / (runs[1] - runs[0])


def table(
    paths: list[str],
    settings: list[str],
    counted_as: Callable[[str, str, bool, dict[str, Any]], float],
    bare_of: Callable[[str], str] = lambda setting: "default",
) -> None:
    """Count every path bare and under every setting, one process each, as many at once as
    there are CPUs, against one throwaway server; print the markdown rows."""
    from pgleak.embedded import EmbeddedPostgres

    print("| path | setting | bare cycle | pgleak adds | added / bare |")
    print("|---|---|---:|---:|---:|")
    with EmbeddedPostgres(max_connections=20) as server:
        where = {
            "host": server.host,
            "port": server.port,
            "user": server.user,
            "dbname": server.dbname,
        }
        bares = dict.fromkeys(bare_of(setting) for setting in settings)
        jobs = [(path, bare, False) for path in paths for bare in bares] + [
            (path, setting, True) for path in paths for setting in settings
        ]

        def run(job: tuple[str, str, bool]) -> float:
            return counted_as(job[0], job[1], job[2], where)

        with ThreadPoolExecutor(max_workers=os.cpu_count() or 2) as pool:
            counted = dict(zip(jobs, pool.map(run, jobs), strict=True))
        for path in paths:
            for setting in settings:
                bare = counted[(path, bare_of(setting), False)]
                added = counted[(path, setting, True)] - bare
                print(f"| {path} | {setting} | {bare:,.0f} | +{added:,.0f} | {added / bare:+.0%} |")


def parse(argv: list[str] | None, doc: str, paths: tuple[str, ...]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=doc.split("\n\n", maxsplit=1)[0])
    parser.add_argument("--paths", default=",".join(paths))
    parser.add_argument("--settings", default=",".join(SETTINGS))
    parser.add_argument("--child", help=argparse.SUPPRESS)
    for key in ("host", "port", "user", "dbname"):
        parser.add_argument(f"--{key}", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def start(
    argv: list[str] | None, doc: str, paths: tuple[str, ...], child: Callable[..., None]
) -> tuple[list[str], list[str]] | int:
    """The paths and settings to count; or, for a counted child run (``child`` run) or a
    machine without valgrind, the exit code."""
    args = parse(argv, doc, paths)
    if args.child:
        path, setting, installed, n = args.child.split(":")
        where = {
            "host": args.host,
            "port": int(args.port),
            "user": args.user,
            "dbname": args.dbname,
        }
        child(path, setting, installed == "1", int(n), where)
        return 0
    if shutil.which("valgrind") is None:
        print("counting instructions needs valgrind (apt install valgrind)", file=sys.stderr)
        return 2
    return [p for p in args.paths.split(",") if p], [s for s in args.settings.split(",") if s]


def main(argv: list[str] | None = None) -> int:
    started = start(argv, __doc__ or "", PATHS, child)
    if isinstance(started, int):
        return started
    paths, settings = started
    table(paths, settings, per_cycle, _bare_of)
    print(
        f"\nInstructions per checkout + checkin cycle (callgrind; runs of {N1} and {N2} cycles,"
        f" {bench_cost.DEPTH} frames deep), CPython {sys.version.split()[0]}."
        f"\nCommand: `{os.path.basename(sys.executable)} benchmarks/bench_instructions.py"
        f" --paths {','.join(paths)} --settings {','.join(settings)}`"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
