"""Why pgleak's instructions cost about twice as much on SQLAlchemy asyncio: a diagnosis.

Usage::

    python benchmarks/diag_munmap.py            # ~5 min; --rounds 11 for a quicker look

Under SQLAlchemy asyncio each checkout + checkin runs two short-lived greenlets, and each frees
the 16 KB frame chunk it ran on: about two ``munmap`` and two fresh ``mmap`` a cycle (``strace
-c`` counted 2.1 a cycle on CPython 3.11, 3.12 and 3.13 alike, with pgleak or without), whose
pages the kernel zeroes on first touch (half a 32 KB data cache of writes each time) and whose
unmapping flushes TLB entries. Callgrind's cache simulation cannot see that (the kernel's work
is not simulated), so it counted the same misses for pgleak on SQLAlchemy asyncio as on asyncpg,
while the clock said about twice the cost per instruction.

This measures pgleak's added cost the ``bench_cost.py`` way (alternating blocks in one process,
thread CPU time, median of paired differences, user and system time apart) on asyncpg's cycle,
which frees no frame chunk, twice: as it is, and with an anonymous 16 KB ``mmap`` + four page
touches + ``munmap`` added to every cycle on both sides of each pair. If the figure with the
mapping is larger, the same pgleak work costs more in a cycle that maps and unmaps memory: the
amplifier is the cycle's, and what pgleak can do about it is touch fewer lines, not run fewer
instructions.
"""

from __future__ import annotations

import mmap
import sys
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cost

from pgleak.embedded import EmbeddedPostgres

PAGE = mmap.PAGESIZE
CHUNK = 16 * 1024  # CPython 3.11's frame data-stack chunk


def with_mapping(bare: Callable[[int], Awaitable[Any]]) -> Callable[[int], Awaitable[None]]:
    """``bare``'s cycle with a fresh mapping touched before it and unmapped after it."""

    async def cycles(n: int) -> None:
        for _ in range(n):
            chunk = mmap.mmap(-1, CHUNK)
            for offset in range(0, CHUNK, PAGE):
                chunk[offset] = 1
            await bare(1)
            chunk.close()

    return cycles


def one_by_one(bare: Callable[[int], Awaitable[Any]]) -> Callable[[int], Awaitable[None]]:
    """``bare``'s cycle driven by the same kind of loop as :func:`with_mapping`'s."""

    async def cycles(n: int) -> None:
        for _ in range(n):
            await bare(1)

    return cycles


async def run(rounds: int) -> None:
    settings: dict[str, dict[str, Any]] = {"default": {}}
    otel_off = bench_cost._otel_settings(sampled=False)
    if otel_off is not None:
        settings["otel_off"] = otel_off
    bench = bench_cost.Bench(rounds=rounds, cycles=3000, split=True)
    with EmbeddedPostgres(max_connections=20) as server:
        made = await bench_cost.async_paths(server)
        for path, (_, _, _, close) in made.items():
            if path != "asyncpg":
                await close()
        _, bare, _, close = made["asyncpg"]
        print("| asyncpg cycle | setting | added | 95% CI | bare cycle | user | system |")
        print("|---|---|---:|---|---:|---:|---:|")
        cycles = {"as it is": one_by_one(bare), "+ 16 KB mapped, unmapped": with_mapping(bare)}
        for label, cycle in cycles.items():
            await cycle(200)
            for name, kwargs in settings.items():
                result = await bench.asyncio(cycle, kwargs, "asyncpg")
                print(f"| {label} | {name} | {bench_cost.cells(result)}", flush=True)
        await close()


def main(argv: list[str] | None = None) -> int:
    return bench_cost.rounds_main(__doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
