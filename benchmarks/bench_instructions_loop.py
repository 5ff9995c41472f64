"""Instructions pgleak adds per asyncio checkout + checkin, counted inside the loop only.

Usage::

    python benchmarks/bench_instructions_loop.py --paths asyncpg --settings default,no_stack

``bench_instructions.py`` counts every instruction of the process, so the work pgleak's
watchdog thread and the pools' timers do by the wall clock shows up per cycle, and more so the
slower valgrind runs (a loaded machine: the same commit moved by thousands of instructions).
This runs the same cycles (same paths, pools and depth, from ``bench_cost.py``) inside
``sys.call_tracing``, and has callgrind collect only there (``--collect-atstart=no
--toggle-collect=sys_call_tracing``): no start-up, no other thread. Runs of ``N1`` and ``N2``
cycles in processes of their own; their difference per cycle. By default the asyncio paths;
the sync ones (``--paths psycopg2``) run their loop the same way, inside ``sys.call_tracing``.
``--settings otel_sdk`` counts pgleak's own share as ``bench_instructions.py`` does, against the
same span made by hand in each cycle (the bare run of that row is the hand-spanned cycle); the
batch processor's export thread is not counted on either side, the span's own work in the
loop's thread is; ``--settings otel_off`` the same with a provider whose sampler records
nothing, on both sides: pgleak's own observer work without the SDK's recording. Needs
``valgrind`` on ``PATH``.
"""

from __future__ import annotations

import asyncio
import functools
import sys
import types
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cost
import bench_instructions

PATHS = ("asyncpg", "psycopg_pool_async", "sqlalchemy_async")
SYNC_PATHS = ("sqlalchemy", "psycopg_pool", "psycopg2")
SETTINGS = bench_instructions.SETTINGS
N1, N2 = 500, 1500
#: callgrind counts only inside ``sys.call_tracing`` (the child's loop).
_COLLECT = ("--collect-atstart=no", "--toggle-collect=sys_call_tracing")


def child(path: str, setting: str, installed: bool, n: int, where: dict[str, Any]) -> None:
    import pgleak

    server: Any = types.SimpleNamespace(**where)
    kwargs = bench_instructions._settings(setting)
    spanned = "tracer_provider" in kwargs
    if path in SYNC_PATHS:
        _, run, _, done = bench_cost.sync_paths(server)[path]
        if spanned:
            run = bench_cost._one_by_one(run)
            if not installed:
                run = bench_cost._hand_spanned(run, kwargs, path)
        if installed:
            pgleak.install(**kwargs)
        run(50)
        sys.call_tracing(bench_cost._deep, (bench_cost.DEPTH, lambda: run(n)))  # counted
        done()
        return
    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    _, bare, _, close = loop.run_until_complete(bench_cost.async_paths(server))[path]
    if spanned:
        bare = bench_cost._ahand_spanned(bare, None if installed else kwargs, path)
    if installed:
        pgleak.install(**kwargs)
    loop.run_until_complete(bare(50))
    cycles = bench_cost._adeep(bench_cost.DEPTH, lambda: bare(n))
    sys.call_tracing(loop.run_until_complete, (cycles,))  # the only stretch counted
    loop.run_until_complete(close())
    loop.close()


def main(argv: list[str] | None = None) -> int:
    started = bench_instructions.start(argv, __doc__ or "", PATHS + SYNC_PATHS, child)
    if isinstance(started, int):
        return started
    paths, settings = started
    counted_as = functools.partial(
        bench_instructions.per_cycle, runs=(N1, N2), script=__file__, collect=_COLLECT
    )
    bench_instructions.table(paths, settings, counted_as, bench_instructions._bare_of)
    print(
        f"\nInstructions per checkout + checkin cycle inside the loop (callgrind; runs of {N1}"
        f" and {N2} cycles, {bench_cost.DEPTH} frames deep), CPython {sys.version.split()[0]}."
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
