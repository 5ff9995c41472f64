"""What the same SDK span costs on SQLAlchemy asyncio made in the coroutine or inside the pool.

Usage::

    python benchmarks/diag_span_place.py            # ~2 min; --rounds 61 for a tighter interval

``bench_cost.py`` measures pgleak's share beside an OpenTelemetry SDK against the same span made
by hand. Until session 13 the hand-made span on SQLAlchemy asyncio was started and ended in the
coroutine, around ``async with engine.connect()``; pgleak starts and ends its own inside the
pool (after ``_ConnectionFairy._checkout``, before ``Pool._return_conn``), which on this engine
runs in a greenlet that SQLAlchemy spawns for each call into its synchronous core. If where the
span is made changes what the SDK costs, that difference was being read as pgleak's.

This runs nothing of pgleak's: both blocks of each pair run the bare cycle with the same span
made by hand, one in the coroutine (the old reference), one in the pool's ``checkout`` and
``checkin`` events (``bench_cost._PoolSpan``, the reference now). The pool's listeners are
there for both blocks (on the coroutine side they make nothing), so only the place differs.
Measured the ``bench_cost.py`` way (alternating blocks in one process, thread CPU time, median
of paired differences, user and system time apart); a positive figure is what the span costs
more inside the pool.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_cost
from opentelemetry import context, trace

from pgleak.embedded import EmbeddedPostgres


async def run(rounds: int) -> None:
    settings = bench_cost._otel_settings(sampled=True)
    if settings is None:
        raise SystemExit("opentelemetry-sdk is not installed")
    bench = bench_cost.Bench(rounds=rounds, cycles=3000, split=True, control=True)
    path = "sqlalchemy_async"
    with EmbeddedPostgres(max_connections=20) as server:
        made = await bench_cost.async_paths(server)
        for name, (_, _, _, close) in made.items():
            if name != path:
                await close()
        _, bare, _, close = made[path]
        pool_span = bench_cost._POOL_SPANS[bare]
        in_pool = bench_cost._ahand_spanned(bare, settings, path)  # the listeners, and its loop
        tracer = settings["tracer_provider"].get_tracer("bench")
        attach, detach, current = context.attach, context.detach, trace.set_span_in_context
        connect, now, attributes = pool_span.connect, time.time_ns, bench_cost._SPAN_ATTRIBUTES

        async def in_coroutine(n: int) -> None:
            """The reference before session 13, around the same loop as ``in_pool``'s."""
            pool_span.tracer = None  # the listeners stay, and make nothing
            for _ in range(n):
                span = tracer.start_span("pgleak.checkout", start_time=now(), attributes=attributes)
                token = attach(current(span))
                async with connect():
                    pass
                detach(token)
                span.set_attributes({"pgleak.held_s": 0.001, "pgleak.outcome": "returned"})
                span.end(end_time=now())

        runs: dict[bool, Callable[[int], Awaitable[Any]]] = {False: in_coroutine, True: in_pool}
        await runs[True](200)
        try:
            result = await bench._async_pairs(runs, settings)
        finally:
            pool_span.remove()
        print(
            "| SQLAlchemy asyncio, SDK span | in the pool minus in the coroutine | 95% CI |"
            " coroutine-side cycle | user | system |"
        )
        print("|---|---:|---|---:|---:|---:|")
        print(f"| made by hand, nothing installed | {bench_cost.cells(result)}", flush=True)
        await close()


def main(argv: list[str] | None = None) -> int:
    return bench_cost.rounds_main(__doc__, run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
