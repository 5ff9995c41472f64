"""What pgleak adds to one checkout + checkin, per pool path and setting, measured in one process.

Usage::

    python benchmarks/bench_cost.py            # every path and setting (a few minutes)
    python benchmarks/bench_cost.py --quick    # smoke run for CI
    python benchmarks/bench_cost.py --paths psycopg_pool,asyncpg --settings default

The method, chosen for shared, noisy machines (wall-time ratios of separate processes swing by
20% between runs of the same code):

* one process, one throwaway server, pools of one warmed-up connection;
* blocks of ``N`` bare checkout + checkin cycles alternate with blocks of the same cycles with
  pgleak installed (``install()`` before the block, ``uninstall()`` after it), the order
  swapped every round so that drift cancels;
* each block is timed with ``time.thread_time_ns()``: CPU time of this thread only, so other
  processes on the machine do not inflate it (an asyncio loop runs its I/O callbacks in the
  same thread, so the driver's work is counted, the server's is not);
* the result is the median over rounds of the paired difference (instrumented minus bare, per
  cycle), with the bare cost beside it, and a 95% confidence interval of that median from the
  order statistics of the rounds (distribution-free: one disturbed round moves it little, and
  a wide interval says the machine was too busy for the number to mean much);
* the wall time of a bare checkout + ``SELECT 1`` + checkin cycle is measured too, to state the
  added cost as a share of a cycle that does something.

Settings: ``default`` (stack on; OpenTelemetry API present, no SDK; tags and retry on),
``no_stack`` (``capture_stack=False``), and ``otel_sdk`` (an SDK tracer provider with a batch
processor whose exporter drops every span: a span per checkout); on request ``otel_off`` (an
SDK provider whose sampler records nothing, measured as ``otel_sdk`` is: pgleak's observer work
without the SDK's recording and without its export thread). For ``otel_sdk`` pgleak's own
share is measured against the same span made by hand in the same cycle: the uninstalled block
runs each checkout + checkin inside a span started with the same attributes, made current
where pgleak makes its span current (around the user's block: not on psycopg2's bare
``putconn(getconn())``), given two more at the end and ended, on the same provider (what an
instrumentation that reported the same span would pay the SDK), and the installed block runs
the same loop without it; their difference is what pgleak adds beyond the SDK's span. On
SQLAlchemy asyncio the span is started and ended where pgleak's is, in the pool's ``checkout``
and ``checkin`` events inside SQLAlchemy's greenlets (``_PoolSpan``): made in the coroutine
instead, the same span cost less, and the difference was read as pgleak's. The span
alone in a tight loop is printed beside it: it runs with hot caches, so it understates what the
span costs inside a cycle, and subtracting it overstated pgleak's share.

``--split`` adds, per row, the same median paired difference of the thread's user time and of
its system time (``getrusage(RUSAGE_THREAD)``; the kernel splits the thread's exact CPU time
between the two by its tick samples, so each is good to a tick or so per block): on the
asyncio paths the kernel's share moves with what the machine's other core is doing (docs/
performance.md). ``--control`` runs every row as an A/A comparison: both blocks of a pair run
the bare cycle (for ``otel_sdk``, both with the span made by hand) and nothing is installed,
so the figures show what the method reads when there is nothing to find, on this machine,
now.

``--held`` measures the watchdog with 10,000 checkouts held at once (its thread's CPU per second
of wall time, and memory per held checkout), and memory over 1,000,000 checkout + checkin
cycles; through the core directly, since no server takes 10,000 connections.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import gc
import math
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import bench_checkout as common

import pgleak
from pgleak.embedded import EmbeddedPostgres

TARGETS_US = {"default": 3.0, "no_stack": 1.0, "otel_sdk": 5.0}
PATHS = (
    "sqlalchemy",
    "sqlalchemy_async",
    "psycopg_pool",
    "psycopg_pool_async",
    "psycopg2",
    "asyncpg",
)
#: Frames between the loop and the module's top: checkouts happen deep in an application.
DEPTH = 20

Cycle = Callable[[int], Any]  # runs n cycles; returns None or an awaitable


@dataclass
class Row:
    path: str
    setting: str
    added_ns: float
    bare_ns: float
    query_ns: float
    #: For otel_sdk: the SDK's span alone, in a tight loop (for reference). ``added_ns`` is
    #: then already measured against the same span made by hand in each cycle.
    sdk_span_ns: float | None = None
    #: 95% confidence interval of the median added cost (order statistics of the rounds).
    added_lo_ns: float = float("nan")
    added_hi_ns: float = float("nan")
    #: ``--split``: the median paired difference of user and of system time, per cycle.
    user_ns: float = float("nan")
    sys_ns: float = float("nan")

    @property
    def own_ns(self) -> float:
        return self.added_ns


def _otel_settings(sampled: bool = True) -> dict[str, Any] | None:
    """An SDK tracer provider with a batch processor that drops every span; no metrics.

    ``sampled=False`` (setting ``otel_off``): a provider whose sampler records nothing, for
    both blocks alike: what is left is pgleak's own observer work, without the SDK's
    recording and its export thread (the same setting as ``bench_instructions.py``'s).
    """
    if not sampled:
        try:
            from opentelemetry.sdk.trace import TracerProvider
            from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
        except ImportError:
            return None
        return {"otel": True, "tracer_provider": TracerProvider(sampler=ALWAYS_OFF)}
    sdk = common._otel_sdk()
    return None if sdk is None else {"otel": True, "tracer_provider": sdk["tracer_provider"]}


#: The attributes pgleak puts on a checkout span (docs/otel.md), as the SDK receives them.
_SPAN_ATTRIBUTES: dict[str, Any] = {
    "db.system.name": "postgresql",
    "db.client.connection.pool.name": "psycopg_pool ConnectionPool 'pool-1' (host=127.0.0.1)",
    "server.address": "127.0.0.1",
    "server.port": 5432,
    "db.namespace": "postgres",
    "code.file.path": "/srv/app/orders.py",
    "code.line.number": 42,
    "code.function.name": "order_history",
    "pgleak.checkout_id": 1234,
    "pgleak.holder": "thread 'MainThread'",
    "pgleak.waited_s": 0.0,
}


def _sdk_span_ns(settings: dict[str, Any], n: int) -> float:
    """The SDK's own cost of a span like pgleak's checkout span, made directly.

    Start with the same attributes, two more at the end, end: what any instrumentation that
    reported the same span would pay the SDK (its attribute validation is most of it).
    What pgleak adds beyond this is its own share.
    """
    tracer = settings["tracer_provider"].get_tracer("bench")
    samples = []
    for _ in range(9):
        t = time.thread_time_ns()
        for _ in range(n):
            span = tracer.start_span(
                "pgleak.checkout", start_time=time.time_ns(), attributes=_SPAN_ATTRIBUTES
            )
            span.set_attributes({"pgleak.held_s": 0.001, "pgleak.outcome": "returned"})
            span.end(end_time=time.time_ns())
        samples.append((time.thread_time_ns() - t) / n)
    return statistics.median(samples)


def _one_by_one(run: Cycle) -> Cycle:
    """``run``'s cycles one call at a time: the loop the hand-made span's cycles run in."""

    def cycles(n: int) -> None:
        for _ in range(n):
            run(1)

    return cycles


#: Paths whose bare cycle has no ``with`` block (``putconn(getconn())``): pgleak's span is
#: never made current there (it is started at the checkin, under the checkout's context), so
#: the span made by hand is not either. Made current, it charged the bare side for an attach
#: and a detach pgleak does not do, and understated pgleak's share on that path.
_NEVER_CURRENT = frozenset({"psycopg2"})


def _hand_spanned(run: Cycle, settings: dict[str, Any], path: str) -> Cycle:
    """Each of ``run``'s cycles inside the span pgleak would make for it, made by hand.

    The same span as pgleak's on every path (``tests/otel`` pins it): the same eleven
    attributes of the same types at the start, two more at the end, made current around the
    user's block exactly where pgleak makes it current (not on :data:`_NEVER_CURRENT` paths).
    """
    from opentelemetry import context, trace

    start_span = settings["tracer_provider"].get_tracer("bench").start_span
    attach, detach, current = context.attach, context.detach, trace.set_span_in_context
    now = time.time_ns
    made_current = path not in _NEVER_CURRENT

    def cycles(n: int) -> None:
        for _ in range(n):
            span = start_span("pgleak.checkout", start_time=now(), attributes=_SPAN_ATTRIBUTES)
            if made_current:
                token = attach(current(span))
                run(1)
                detach(token)
            else:
                run(1)
            span.set_attributes({"pgleak.held_s": 0.001, "pgleak.outcome": "returned"})
            span.end(end_time=now())

    return cycles


class _PoolSpan:
    """The span made by hand inside the pool, where pgleak makes its own: SQLAlchemy asyncio.

    SQLAlchemy's asyncio engine runs its pool's checkout and checkin in a greenlet of their
    own (``greenlet_spawn``), and pgleak starts and ends its span there (right after
    ``_ConnectionFairy._checkout`` returns, right before ``Pool._return_conn``). Made in the
    coroutine around the block instead, the same span cost the bare side several µs less
    (docs/performance.md, session 13), and that difference, where the SDK ran rather than
    anything pgleak does, was read as pgleak's. So on this path the span is made in the pool's
    ``checkout`` and ``checkin`` events (which fire next to pgleak's hooks, in the same
    greenlets) and made current inside the user's block, as pgleak's is. The listeners are
    there for both blocks of a pair (on pgleak's side they make nothing), so SQLAlchemy's event
    dispatch costs both sides alike.
    """

    def __init__(self, engine: Any) -> None:
        self.pool = engine.sync_engine.pool
        self.connect = engine.connect
        self.tracer: Any = None
        self.span: Any = None
        self.ended = 0
        self.listening = False

    def _checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        if self.tracer is not None:
            self.span = self.tracer.start_span(
                "pgleak.checkout", start_time=time.time_ns(), attributes=_SPAN_ATTRIBUTES
            )

    def _checkin(self, dbapi_connection: Any, record: Any) -> None:
        span, self.span = self.span, None
        if span is not None:
            span.set_attributes({"pgleak.held_s": 0.001, "pgleak.outcome": "returned"})
            span.end(end_time=time.time_ns())
            self.ended += 1

    def listen(self) -> None:
        from sqlalchemy import event

        if not self.listening:
            event.listen(self.pool, "checkout", self._checkout)
            event.listen(self.pool, "checkin", self._checkin)
            self.listening = True

    def remove(self) -> None:
        from sqlalchemy import event

        if self.listening:
            event.remove(self.pool, "checkout", self._checkout)
            event.remove(self.pool, "checkin", self._checkin)
            self.listening = False

    def cycles(self, tracer: Any) -> Callable[[int], Awaitable[None]]:
        """The bare cycle, with the span made by hand when ``tracer`` is given."""
        from opentelemetry import context, trace

        attach, detach, current = context.attach, context.detach, trace.set_span_in_context
        connect = self.connect
        self.listen()

        async def cycles(n: int) -> None:
            self.tracer, ended = tracer, self.ended
            for _ in range(n):
                async with connect():
                    if tracer is not None:  # current inside the block, as pgleak's is
                        detach(attach(current(self.span)))
            if tracer is not None and self.ended - ended != n:
                # Events that stopped firing (another SQLAlchemy) would leave the bare side
                # without its span, and the whole span would be read as pgleak's share.
                raise RuntimeError(f"{self.ended - ended} spans made by hand for {n} cycles")

        return cycles


#: Bare cycles whose span made by hand is made inside the pool (:class:`_PoolSpan`).
_POOL_SPANS: dict[Callable[[int], Awaitable[Any]], _PoolSpan] = {}


def _ahand_spanned(
    run: Callable[[int], Awaitable[Any]], settings: dict[str, Any] | None, path: str
) -> Callable[[int], Awaitable[Any]]:
    """:func:`_hand_spanned` for an asyncio path; without ``settings``, the same loop bare."""
    from opentelemetry import context, trace

    tracer = None if settings is None else settings["tracer_provider"].get_tracer("bench")
    if run in _POOL_SPANS:
        return _POOL_SPANS[run].cycles(tracer)
    attach, detach, current = context.attach, context.detach, trace.set_span_in_context
    now = time.time_ns
    made_current = path not in _NEVER_CURRENT

    async def cycles(n: int) -> None:
        for _ in range(n):
            if tracer is None:
                await run(1)
                continue
            span = tracer.start_span(
                "pgleak.checkout", start_time=now(), attributes=_SPAN_ATTRIBUTES
            )
            if made_current:
                token = attach(current(span))
                await run(1)
                detach(token)
            else:
                await run(1)
            span.set_attributes({"pgleak.held_s": 0.001, "pgleak.outcome": "returned"})
            span.end(end_time=now())

    return cycles


def cells(result: Result) -> str:
    """A diagnosis row's measured cells in Markdown: added (its interval), bare, user, system."""
    added, bare, lo, hi, user, system = (value / 1000 for value in result)
    return (
        f"{added:+.2f} µs | {lo:.2f} to {hi:.2f} µs | {bare:.2f} µs | {user:+.2f} µs | "
        f"{system:+.2f} µs |"
    )


def rounds_main(
    doc: str | None, run: Callable[[int], Coroutine[Any, Any, None]], argv: list[str] | None
) -> int:
    """A diagnosis script's command line: ``--rounds`` block pairs per row, then ``run``."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0] if doc else None)
    parser.add_argument("--rounds", type=int, default=21, help="block pairs per row (21)")
    args = parser.parse_args(argv)
    asyncio.run(run(args.rounds))
    return 0


def _deep(depth: int, fn: Callable[[], Any]) -> Any:
    return fn() if depth == 0 else _deep(depth - 1, fn)


async def _adeep(depth: int, fn: Callable[[], Awaitable[Any]]) -> Any:
    return await fn() if depth == 0 else await _adeep(depth - 1, fn)


#: (median added, median bare, the added median's 95% interval low and high, median added user
#: time, median added system time), ns per cycle; the last two NaN without ``--split``.
Result = tuple[float, float, float, float, float, float]
#: One block's cost per cycle: (thread CPU, user, system), ns; user and system NaN unsplit.
Spent = tuple[float, float, float]
_NAN = float("nan")


class _Clock:
    """Times one block: thread CPU time always; user and system time apart with ``split``.

    ``getrusage`` runs outside the thread-CPU window, so asking for the split does not change
    the figure it splits.
    """

    def __init__(self, split: bool) -> None:
        self._usage: Callable[[], Any] | None = None
        if split:  # Linux only; not imported otherwise (no ``resource`` on Windows)
            import resource

            self._usage = functools.partial(resource.getrusage, resource.RUSAGE_THREAD)

    def start(self) -> tuple[int, Any]:
        usage = self._usage() if self._usage is not None else None
        return time.thread_time_ns(), usage

    def stop(self, started: tuple[int, Any], cycles: int) -> Spent:
        spent = time.thread_time_ns() - started[0]
        before = started[1]
        if before is None:
            return spent / cycles, _NAN, _NAN
        assert self._usage is not None
        after = self._usage()
        user = (after.ru_utime - before.ru_utime) * 1e9 / cycles
        system = (after.ru_stime - before.ru_stime) * 1e9 / cycles
        return spent / cycles, user, system


class Bench:
    """Alternating bare and instrumented blocks of one path, in the thread that runs it."""

    def __init__(
        self, rounds: int, cycles: int, split: bool = False, control: bool = False
    ) -> None:
        self.rounds = rounds
        self.cycles = cycles
        self.clock = _Clock(split)
        #: A/A: the "installed" block runs the bare one's cycle and installs nothing.
        self.control = control

    def sync(self, run: Cycle, settings: dict[str, Any], path: str) -> Result:
        """``settings`` with a tracer provider: against the span made by hand (module doc)."""
        runs = {False: run, True: run}
        if "tracer_provider" in settings:
            runs = {False: _hand_spanned(run, settings, path), True: _one_by_one(run)}
        if self.control:
            runs[True] = runs[False]

        def block(installed: bool) -> Spent:
            cycle = runs[installed]
            install = installed and not self.control
            if install:
                pgleak.install(**settings)
            try:
                cycle(20)
                gc.disable()
                started = self.clock.start()
                _deep(DEPTH, lambda: cycle(self.cycles))
                spent = self.clock.stop(started, self.cycles)
                gc.enable()
            finally:
                if install:
                    pgleak.uninstall()
            return spent

        return self._pairs(block)

    async def asyncio(
        self, run: Callable[[int], Awaitable[Any]], settings: dict[str, Any], path: str
    ) -> Result:
        runs = {False: run, True: run}
        if "tracer_provider" in settings:
            runs = {
                False: _ahand_spanned(run, settings, path),
                True: _ahand_spanned(run, None, path),
            }
        if self.control:
            runs[True] = runs[False]
        try:
            return await self._async_pairs(runs, settings)
        finally:
            if run in _POOL_SPANS:  # the next row's cycles run without the listeners
                _POOL_SPANS[run].remove()

    async def _async_pairs(
        self, runs: dict[bool, Callable[[int], Awaitable[Any]]], settings: dict[str, Any]
    ) -> Result:
        pairs: list[dict[bool, Spent]] = []
        for i in range(self.rounds):
            pair: dict[bool, Spent] = {}
            for installed in (False, True) if i % 2 == 0 else (True, False):
                cycle = runs[installed]
                install = installed and not self.control
                if install:
                    pgleak.install(**settings)
                try:
                    await cycle(20)
                    gc.disable()
                    started = self.clock.start()
                    await _adeep(DEPTH, functools.partial(cycle, self.cycles))
                    pair[installed] = self.clock.stop(started, self.cycles)
                    gc.enable()
                finally:
                    if install:
                        pgleak.uninstall()
            pairs.append(pair)
        return _medians(pairs)

    def _pairs(self, block: Callable[[bool], Spent]) -> Result:
        pairs = []
        for i in range(self.rounds):
            order = (False, True) if i % 2 == 0 else (True, False)
            pairs.append({installed: block(installed) for installed in order})
        return _medians(pairs)


def _medians(pairs: list[dict[bool, Spent]]) -> Result:
    """Medians of the paired differences: thread CPU (with its interval), user, system."""

    def added(part: int) -> list[float]:
        return [pair[True][part] - pair[False][part] for pair in pairs]

    lo, hi = _median_ci(added(0))
    bare = statistics.median(pair[False][0] for pair in pairs)
    return (
        statistics.median(added(0)),
        bare,
        lo,
        hi,
        statistics.median(added(1)),
        statistics.median(added(2)),
    )


def _median_ci(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median: the k-th smallest and k-th largest value,
    k the largest rank the binomial(n, 1/2) puts below (1 - confidence) / 2 on each side.

    On a shared machine one round can be far off; this says how far the median itself can be
    trusted (21 rounds: from the 6th to the 16th value). Too few rounds: the whole range.
    """
    ordered = sorted(values)
    n = len(ordered)
    tail = (1 - confidence) / 2
    k, mass = 0, 0.0
    while k < n and mass + math.comb(n, k) / 2**n <= tail:
        mass += math.comb(n, k) / 2**n
        k += 1
    if k == 0:
        return ordered[0], ordered[-1]
    return ordered[k - 1], ordered[n - k]


def _wall_ns(run: Callable[[int], Any], n: int) -> float:
    samples = []
    for _ in range(5):
        t = time.perf_counter_ns()
        run(n)
        samples.append((time.perf_counter_ns() - t) / n)
    return statistics.median(samples)


async def _awall_ns(run: Callable[[int], Awaitable[Any]], n: int) -> float:
    samples = []
    for _ in range(5):
        t = time.perf_counter_ns()
        await run(n)
        samples.append((time.perf_counter_ns() - t) / n)
    return statistics.median(samples)


# -- the six paths ------------------------------------------------------------------------------


def sync_paths(server: EmbeddedPostgres) -> dict[str, tuple[Any, Cycle, Cycle, Callable[[], None]]]:
    """path -> (pool, bare cycles, query cycles, close)."""
    import psycopg2.pool
    import psycopg_pool
    import sqlalchemy as sa

    dsn = f"host={server.host} port={server.port} user={server.user} dbname={server.dbname}"
    url = f"postgresql+psycopg://{server.user}@{server.host}:{server.port}/{server.dbname}"
    out: dict[str, tuple[Any, Cycle, Cycle, Callable[[], None]]] = {}

    engine = sa.create_engine(url, pool_size=1, max_overflow=0)
    select = sa.text("SELECT 1")

    def sa_bare(n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            with connect():
                pass

    def sa_query(n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            with connect() as conn:
                conn.execute(select)

    out["sqlalchemy"] = (engine, sa_bare, sa_query, engine.dispose)

    pool = psycopg_pool.ConnectionPool(dsn, min_size=1, max_size=1, open=True)
    pool.wait()

    def pp_bare(n: int) -> None:
        connection = pool.connection
        for _ in range(n):
            with connection():
                pass

    def pp_query(n: int) -> None:
        connection = pool.connection
        for _ in range(n):
            with connection() as conn:
                conn.execute("SELECT 1")

    out["psycopg_pool"] = (pool, pp_bare, pp_query, pool.close)

    p2 = psycopg2.pool.ThreadedConnectionPool(1, 1, dsn)

    def p2_bare(n: int) -> None:
        getconn, putconn = p2.getconn, p2.putconn
        for _ in range(n):
            putconn(getconn())

    def p2_query(n: int) -> None:
        getconn, putconn = p2.getconn, p2.putconn
        for _ in range(n):
            conn = getconn()
            with conn.cursor() as cur:
                cur.execute("SELECT 1")
            conn.rollback()
            putconn(conn)

    out["psycopg2"] = (p2, p2_bare, p2_query, p2.closeall)
    return out


async def async_paths(
    server: EmbeddedPostgres,
) -> dict[str, tuple[Any, Callable[[int], Awaitable[None]], Callable[[int], Awaitable[None]], Any]]:
    import asyncpg
    import psycopg_pool
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    dsn = f"host={server.host} port={server.port} user={server.user} dbname={server.dbname}"
    base = f"{server.user}@{server.host}:{server.port}/{server.dbname}"
    out: dict[str, Any] = {}

    engine = create_async_engine(f"postgresql+asyncpg://{base}", pool_size=1, max_overflow=0)
    select = text("SELECT 1")

    async def sa_bare(n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            async with connect():
                pass

    async def sa_query(n: int) -> None:
        connect = engine.connect
        for _ in range(n):
            async with connect() as conn:
                await conn.execute(select)

    out["sqlalchemy_async"] = (engine, sa_bare, sa_query, engine.dispose)
    _POOL_SPANS[sa_bare] = _PoolSpan(engine)

    pool = psycopg_pool.AsyncConnectionPool(dsn, min_size=1, max_size=1, open=False)
    await pool.open(wait=True)

    async def pp_bare(n: int) -> None:
        connection = pool.connection
        for _ in range(n):
            async with connection():
                pass

    async def pp_query(n: int) -> None:
        connection = pool.connection
        for _ in range(n):
            async with connection() as conn:
                await conn.execute("SELECT 1")

    out["psycopg_pool_async"] = (pool, pp_bare, pp_query, pool.close)

    async def no_reset(_con: Any) -> None:
        """The release's reset is a round trip (``RESET ALL``, ``UNLISTEN *``...) whose CPU
        time swings by tens of µs per block: it hid what pgleak adds. pgleak does nothing
        about the reset, so the cycle is measured without it."""

    apool = await asyncpg.create_pool(
        f"postgresql://{base}", min_size=1, max_size=1, reset=no_reset
    )

    async def apg_bare(n: int) -> None:
        acquire = apool.acquire
        for _ in range(n):
            async with acquire():
                pass

    async def apg_query(n: int) -> None:
        acquire = apool.acquire
        for _ in range(n):
            async with acquire() as conn:
                await conn.fetchval("SELECT 1")

    out["asyncpg"] = (apool, apg_bare, apg_query, apool.close)
    return out


def measure(
    server: EmbeddedPostgres, paths: list[str], settings: dict[str, dict[str, Any]], bench: Bench
) -> list[Row]:
    rows: list[Row] = []
    spans: dict[str, float] = {}
    for name, kwargs in settings.items():
        if "tracer_provider" in kwargs:
            spans[name] = _sdk_span_ns(kwargs, 2000)

    made = sync_paths(server)
    for path, (_, _, _, close) in made.items():
        if path not in paths:
            close()  # made together; only the paths asked for run
    sync = {k: v for k, v in made.items() if k in paths}
    for path, (_, bare, query, close) in sync.items():
        bare(200)
        query_ns = _wall_ns(query, 500)
        for name, kwargs in settings.items():
            added, bare_ns, lo, hi, user, system = bench.sync(bare, kwargs, path)
            rows.append(
                Row(path, name, added, bare_ns, query_ns, spans.get(name), lo, hi, user, system)
            )
            _log(rows[-1])
        close()

    async def run_async() -> None:
        made = await async_paths(server)
        for path, (_, _, _, close) in made.items():
            if path not in paths:
                await close()  # made together: left open, their tasks end pending at exit
        found = {k: v for k, v in made.items() if k in paths}
        for path, (_, bare, query, close) in found.items():
            await bare(200)
            query_ns = await _awall_ns(query, 300)
            for name, kwargs in settings.items():
                added, bare_ns, lo, hi, user, system = await bench.asyncio(bare, kwargs, path)
                rows.append(
                    Row(path, name, added, bare_ns, query_ns, spans.get(name), lo, hi, user, system)
                )
                _log(rows[-1])
            await close()

    if any(p in paths for p in ("sqlalchemy_async", "psycopg_pool_async", "asyncpg")):
        asyncio.run(run_async())
    return rows


def _log(row: Row) -> None:
    split = ""
    if not math.isnan(row.user_ns):
        split = f" (user {row.user_ns / 1000:+.2f}, system {row.sys_ns / 1000:+.2f})"
    print(
        f"  {row.path:20s} {row.setting:9s} +{row.added_ns / 1000:6.2f} µs "
        f"[{row.added_lo_ns / 1000:.2f}, {row.added_hi_ns / 1000:.2f}] over "
        f"{row.bare_ns / 1000:6.2f} µs{split}",
        file=sys.stderr,
        flush=True,
    )


# -- 10,000 held, 1,000,000 cycles ---------------------------------------------------------------


class _Conn:
    """Stands for a connection object: weak-referenceable, nothing more (the core needs no more)."""


def held(count: int, cycles: int) -> dict[str, float]:
    from pgleak._core import core

    pgleak.install(leak_threshold=3600)
    try:
        pool_obj = _Conn()
        handle = core.pool(pool_obj, "bench")
        conns = [_Conn() for _ in range(count)]
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]

        def take(conn: _Conn) -> Any:
            return _deep(DEPTH, lambda: core.checkout(handle, conn, index=True))

        leases = [take(c) for c in conns]
        core.watchdog.wait_for_pass(10)  # the watchdog's own index of them counts too
        per_held = (tracemalloc.get_traced_memory()[0] - before) / count
        tracemalloc.stop()
        thread = core.watchdog.thread
        assert thread is not None
        assert thread.ident is not None
        clock = time.pthread_getcpuclockid(thread.ident)
        cpu0, wall0 = time.clock_gettime(clock), time.monotonic()
        end = wall0 + 5.0
        while time.monotonic() < end:  # bounded: five seconds of the watchdog's own passes
            core.watchdog.wake()
            time.sleep(0.25)
        share = (time.clock_gettime(clock) - cpu0) / (time.monotonic() - wall0)
        for lease in leases:
            if lease is not None:
                core.checkin(lease)
        conn = _Conn()
        for _ in range(cycles // 10):  # warm-up: caches filled, free lists primed
            lease = core.checkout(handle, conn, index=True)
            if lease is not None:
                core.checkin(lease)
        gc.collect()
        tracemalloc.start()
        start = tracemalloc.get_traced_memory()[0]
        for _ in range(cycles):
            lease = core.checkout(handle, conn, index=True)
            if lease is not None:
                core.checkin(lease)
        gc.collect()
        growth = tracemalloc.get_traced_memory()[0] - start
        tracemalloc.stop()
    finally:
        pgleak.uninstall()
    return {"sweep_cpu_share": share, "bytes_per_held": per_held, "growth_bytes": growth}


# -- output -------------------------------------------------------------------------------------


def print_table(rows: list[Row], control: bool = False) -> None:
    split = any(not math.isnan(row.user_ns) for row in rows)
    print(
        "| path | setting | added per checkout + checkin | 95% CI of the median | bare cycle "
        "| share of a SELECT 1 cycle | target |" + (" user | system |" if split else "")
    )
    print("|---|---|---|---|---|---|---|" + ("---:|---:|" if split else ""))
    for row in rows:
        target = None if control else TARGETS_US.get(row.setting)
        own = row.own_ns / 1000
        added = f"+{row.added_ns / 1000:.2f} µs"
        if row.sdk_span_ns is not None:
            added = (
                f"pgleak's own +{own:.2f} µs beyond the same span made by hand in the cycle"
                f" (the span alone, tight loop: {row.sdk_span_ns / 1000:.2f} µs)"
            )
        verdict = "" if target is None else ("met" if own <= target else f"NOT met (≤ {target} µs)")
        if control:
            verdict = "A/A: nothing installed"
        parts = f" {row.user_ns / 1000:+.2f} µs | {row.sys_ns / 1000:+.2f} µs |" if split else ""
        share = 100 * row.added_ns / row.query_ns if row.query_ns else float("nan")
        print(
            f"| {row.path} | {row.setting} | {added} | "
            f"{row.added_lo_ns / 1000:.2f} to {row.added_hi_ns / 1000:.2f} µs | "
            f"{row.bare_ns / 1000:.2f} µs | "
            f"{share:+.1f}% of {row.query_ns / 1000:.0f} µs | {verdict} |{parts}"
        )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument("--quick", action="store_true", help="a smoke run: few, short rounds")
    parser.add_argument("--paths", default=",".join(PATHS), help="comma-separated; default all")
    parser.add_argument("--settings", default="default,no_stack,otel_sdk", help="comma-separated")
    parser.add_argument("--held", action="store_true", help="also 10,000 held and 1M cycles")
    parser.add_argument("--rounds", type=int, help="bare/pgleak block pairs per row (21)")
    parser.add_argument("--cycles", type=int, help="checkout + checkin cycles per block (3000)")
    parser.add_argument(
        "--split", action="store_true", help="also user and system time apart (Linux)"
    )
    parser.add_argument(
        "--control", action="store_true", help="A/A: both blocks bare, nothing installed"
    )
    args = parser.parse_args(argv)
    if args.split:
        try:
            import resource

            resource.RUSAGE_THREAD  # noqa: B018 - Linux only
        except (ImportError, AttributeError):
            parser.error("--split needs getrusage(RUSAGE_THREAD) (Linux)")
    paths = [p for p in args.paths.split(",") if p]
    unknown = set(paths) - set(PATHS)
    if unknown:
        parser.error(f"unknown paths: {', '.join(sorted(unknown))}")
    settings: dict[str, dict[str, Any]] = {}
    for name in args.settings.split(","):
        if name == "default":
            settings[name] = {}
        elif name == "no_stack":
            settings[name] = {"capture_stack": False}
        elif name in ("otel_sdk", "otel_off"):
            otel = _otel_settings(sampled=name == "otel_sdk")
            if otel is None:
                print(f"opentelemetry-sdk not installed: {name} skipped", file=sys.stderr)
                continue
            settings[name] = otel
        else:
            parser.error(f"unknown setting {name!r}")
    rounds, cycles = (3, 300) if args.quick else (21, 3000)
    bench = Bench(
        rounds=args.rounds or rounds,
        cycles=args.cycles or cycles,
        split=args.split,
        control=args.control,
    )
    with EmbeddedPostgres(max_connections=20) as server:
        rows = measure(server, paths, settings, bench)
    print()
    print_table(rows, control=args.control)
    if args.held:
        count, cycles = (1000, 10_000) if args.quick else (10_000, 1_000_000)
        result = held(count, cycles)
        print()
        print(
            f"{count:,} checkouts held: watchdog thread CPU "
            f"{100 * result['sweep_cpu_share']:.2f}% of a core; {result['bytes_per_held']:.0f} "
            f"bytes per held checkout (stack on, {DEPTH} frames deep)"
        )
        print(
            f"{cycles:,} checkout + checkin cycles after warm-up: traced memory grew by "
            f"{result['growth_bytes']:,} bytes"
        )
    print()
    print(
        f"CPython {platform.python_version()}, {threading.active_count()} threads; "
        f"median of {bench.rounds} rounds of {bench.cycles} cycles, bare and pgleak blocks "
        "alternating, thread CPU time; SELECT 1 share against the bare cycle's wall time."
    )
    print(f"Command: `.venv/bin/python benchmarks/bench_cost.py {' '.join(argv or sys.argv[1:])}`")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
