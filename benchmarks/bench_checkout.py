"""What pgleak adds to a SQLAlchemy connection checkout + checkin, against a real PostgreSQL.

Usage::

    python benchmarks/bench_checkout.py            # full run, well under 3 minutes
    python benchmarks/bench_checkout.py --quick    # smoke run for CI, under 30 seconds
    python benchmarks/bench_checkout.py --json results.json
    python benchmarks/bench_checkout.py --otel-variants   # + OTel metrics only, and unsampled

One process, one throwaway server (``pgleak.embedded.EmbeddedPostgres``), four workloads:

* ``sync bare``   ``with engine.connect(): pass``                            (QueuePool, size 1)
* ``sync query``  ``with engine.connect() as c: c.exec_driver_sql("select 1")``
* ``async bare``  ``async with engine.connect(): pass``           (AsyncEngine + asyncpg, size 1)
* ``async query`` ``async with engine.connect() as c: await c.exec_driver_sql("select 1")``

each under eight configurations: pgleak not installed, ``install(capture_stack=False)``,
``install(stack_depth=8)``, ``install()`` (stack capture on, the default depth),
``install(stack_depth=32)`` and ``install(app_name_call_site=True)`` - those six with
``otel=False``, pgleak's own cost - then ``install()`` with the OpenTelemetry API importable
but no SDK set up (what most applications that have the API as a dependency get), and
``install()`` with an OpenTelemetry SDK: a ``TracerProvider`` with a ``BatchSpanProcessor``
whose exporter drops what it is given, and a ``MeterProvider`` with an in-memory reader, so
that what is measured is pgleak's spans and metrics on the application's thread and not an
exporter's network. Plus ``sync 2 lines``, the query loop alternating between two checkout
lines, where a call-site tag changes (one more round trip) at every checkout.
``uninstall()`` runs after every configuration, so "not installed" is measured again in every
round.

Method, chosen for small shared machines: configurations are interleaved (A B C D E, A B C D E,
...) so that drift in machine load hits all of them alike; each round times N iterations per
configuration, N calibrated so that a round takes a few tenths of a second; the reported figure
is the median over rounds of the per-iteration time. The garbage collector is disabled during
each timed block. The timed loops run at the bottom of a helper that first recurses
``--depth`` (default 20) Python frames deep, so that stack capture walks a stack the size of a
web application's rather than a script's.

On Linux the benchmark process and the PostgreSQL backends serving its two pooled connections
are pinned to one CPU (``--no-pin`` turns this off). On a small VM a round trip otherwise takes
~220 us or ~400 us depending on whether the scheduler happens to put client and backend on the
same vCPU, which makes the query loops bimodal from block to block, a spread far wider than the
effect being measured. Pinned, client and server time add up on one CPU, so the query-loop
percentages are, if anything, pessimistic compared with a database across a network.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import gc
import json
import os
import platform
import shlex
import statistics
import sys
import time
from collections.abc import Awaitable, Callable, Coroutine
from functools import partial
from importlib import metadata
from typing import Any, TypeVar

import sqlalchemy
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import Dialect
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, create_async_engine
from sqlalchemy.pool import Pool

import pgleak
from pgleak.embedded import EmbeddedPostgres

T = TypeVar("T")


@dataclasses.dataclass(frozen=True)
class Config:
    key: str
    label: str
    #: ``None``: pgleak is not installed; else the keyword arguments of ``pgleak.install``.
    settings: dict[str, Any] | None


def _otel_sdk(sampled: bool = True) -> dict[str, Any] | None:
    """Providers of a configured OpenTelemetry SDK whose exporter drops every span.

    ``sampled=False``: a sampler that records no trace (``ParentBased(TraceIdRatioBased(0))``),
    what most checkouts meet under a low sampling ratio.
    """
    try:
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import (
            BatchSpanProcessor,
            SpanExporter,
            SpanExportResult,
        )
        from opentelemetry.sdk.trace.sampling import ParentBased, TraceIdRatioBased
    except ImportError:
        return None

    class Drop(SpanExporter):
        def export(self, spans: Any) -> SpanExportResult:
            return SpanExportResult.SUCCESS

    sampler = None if sampled else ParentBased(TraceIdRatioBased(0.0))
    tracer_provider = TracerProvider(sampler=sampler)
    tracer_provider.add_span_processor(BatchSpanProcessor(Drop()))
    meter_provider = MeterProvider(metric_readers=[InMemoryMetricReader()])
    return {"tracer_provider": tracer_provider, "meter_provider": meter_provider}


def _otel_api() -> bool:
    try:
        import opentelemetry.trace  # noqa: F401
    except ImportError:
        return False
    return True


def configs(otel_variants: bool = False) -> tuple[Config, ...]:
    """What is measured: pgleak's own configurations, then OpenTelemetry's (when installed)."""
    own = (
        Config("bare", "not installed (bare SQLAlchemy)", None),
        Config("no_stack", "install(capture_stack=False)", {"capture_stack": False, "otel": False}),
        Config("depth8", "install(stack_depth=8)", {"stack_depth": 8, "otel": False}),
        Config(
            "default",
            f"install() (stack_depth={pgleak.Settings().stack_depth})",
            {"otel": False},
        ),
        Config("depth32", "install(stack_depth=32)", {"stack_depth": 32, "otel": False}),
        Config(
            "call_site",
            "install(app_name_call_site=True)",
            {"app_name_call_site": True, "otel": False},
        ),
    )
    if not _otel_api():
        return own
    otel = [Config("otel_api", "install(), OTel API, no SDK", {"otel": True})]
    sdk = _otel_sdk()
    if sdk is not None:
        otel.append(Config("otel_sdk", "install(), OTel SDK", {"otel": True, **sdk}))
        if otel_variants:
            from opentelemetry.trace import NoOpTracerProvider

            metrics_only = {"otel": True, **sdk, "tracer_provider": NoOpTracerProvider()}
            otel.append(Config("otel_metrics", "install(), OTel SDK, metrics only", metrics_only))
            unsampled = _otel_sdk(sampled=False)
            assert unsampled is not None
            otel.append(
                Config(
                    "otel_unsampled", "install(), OTel SDK, unsampled", {"otel": True, **unsampled}
                )
            )
    return own + tuple(otel)


#: Set by ``main`` (``--otel-variants`` adds two).
CONFIGS: tuple[Config, ...] = ()

TARGET_QUERY_PCT = 2.0  # <= 2 % added on the sync query loop
TARGET_BARE_US = 3.0  # <= 3 us added per bare sync cycle with stack capture on
STACK_CONFIGS = ("depth8", "default", "depth32")


@dataclasses.dataclass(frozen=True)
class Plan:
    rounds: int
    round_seconds: float  # wall time one round (all configurations) should take
    calibrate_iterations: int
    warmup_iterations: int
    min_iterations: int
    max_iterations: int


FULL = Plan(
    rounds=15,
    round_seconds=0.3,
    calibrate_iterations=300,
    warmup_iterations=30,
    min_iterations=50,
    max_iterations=20_000,
)
QUICK = Plan(
    rounds=5,
    round_seconds=0.1,
    calibrate_iterations=60,
    warmup_iterations=10,
    min_iterations=20,
    max_iterations=2_000,
)


@dataclasses.dataclass
class Result:
    workload: str
    description: str
    iterations: int
    #: config key -> per-iteration nanoseconds, one value per round.
    per_round_ns: dict[str, list[float]]
    #: config key -> frames in the stack pgleak recorded for one checkout (None: not tracked).
    captured_frames: dict[str, int | None]
    #: wall seconds of each round's timed blocks (all configurations).
    round_seconds: list[float]

    def median_ns(self, key: str) -> float:
        return statistics.median(self.per_round_ns[key])

    def paired_delta_ns(self, key: str) -> list[float]:
        """Per round: config minus bare of the same round (cancels drift between rounds)."""
        return [
            c - b for c, b in zip(self.per_round_ns[key], self.per_round_ns["bare"], strict=True)
        ]


# -- the workloads -------------------------------------------------------------------------------


def sync_bare(engine: Engine, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        with connect():
            pass


def sync_query(engine: Engine, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        with connect() as c:
            c.exec_driver_sql("select 1")


def sync_query_two_lines(engine: Engine, n: int) -> None:
    """Checkouts alternate between two lines: a call-site tag changes at every checkout."""
    connect = engine.connect
    for _ in range(n // 2):
        with connect() as c:
            c.exec_driver_sql("select 1")
        with connect() as c:
            c.exec_driver_sql("select 1")


async def async_bare(engine: AsyncEngine, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        async with connect():
            pass


async def async_query(engine: AsyncEngine, n: int) -> None:
    connect = engine.connect
    for _ in range(n):
        async with connect() as c:
            await c.exec_driver_sql("select 1")


SyncLoop = Callable[[Engine, int], None]
AsyncLoop = Callable[[AsyncEngine, int], Coroutine[Any, Any, None]]

SYNC_WORKLOADS: tuple[tuple[str, str, SyncLoop], ...] = (
    ("sync bare", "with engine.connect(): pass", sync_bare),
    ("sync query", 'with engine.connect() as c: c.exec_driver_sql("select 1")', sync_query),
    (
        "sync 2 lines",
        "sync query, alternating between two checkout lines",
        sync_query_two_lines,
    ),
)
ASYNC_WORKLOADS: tuple[tuple[str, str, AsyncLoop], ...] = (
    ("async bare", "async with engine.connect(): pass", async_bare),
    (
        "async query",
        'async with engine.connect() as c: await c.exec_driver_sql("select 1")',
        async_query,
    ),
)


# -- a web-app-sized stack -----------------------------------------------------------------------


def at_depth(depth: int, fn: Callable[[], T]) -> T:
    """Call ``fn`` ``depth`` Python frames below the caller."""
    if depth <= 0:
        return fn()
    return at_depth(depth - 1, fn)


async def at_depth_async(depth: int, fn: Callable[[], Awaitable[T]]) -> T:
    """Await ``fn()`` ``depth`` coroutine frames below the caller."""
    if depth <= 0:
        return await fn()
    return await at_depth_async(depth - 1, fn)


# -- timing --------------------------------------------------------------------------------------


def time_sync(loop: SyncLoop, engine: Engine, n: int) -> int:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        loop(engine, n)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


async def time_async(loop: AsyncLoop, engine: AsyncEngine, n: int) -> int:
    gc.disable()
    try:
        start = time.perf_counter_ns()
        await loop(engine, n)
        return time.perf_counter_ns() - start
    finally:
        gc.enable()


def iterations_for(per_iteration_ns: float, plan: Plan) -> int:
    block_ns = plan.round_seconds / len(CONFIGS) * 1e9
    wanted = int(block_ns / max(per_iteration_ns, 1.0))
    return max(plan.min_iterations, min(plan.max_iterations, wanted))


# -- pgleak on / off -----------------------------------------------------------------------------

_ORIGINAL_POOL_CONNECT = Pool.__dict__["connect"]
_ORIGINAL_ENGINE_CREATED = Dialect.__dict__["engine_created"]
_ORIGINAL_ENGINE_DISPOSE = Engine.__dict__["dispose"]
_ORIGINAL_CONNECTION_ENTER = Connection.__dict__["__enter__"]
restore_failures: list[str] = []


def enter(config: Config) -> None:
    if config.settings is not None:
        pgleak.install(**config.settings)


def leave(config: Config, pools: list[Pool]) -> None:
    """Uninstall and check that SQLAlchemy is exactly as it was (a failure is reported)."""
    pgleak.uninstall()
    problems = []
    if Pool.__dict__["connect"] is not _ORIGINAL_POOL_CONNECT:
        problems.append("Pool.connect not restored")
    if Dialect.__dict__["engine_created"] is not _ORIGINAL_ENGINE_CREATED:
        problems.append("Dialect.engine_created not restored")
    if Engine.__dict__["dispose"] is not _ORIGINAL_ENGINE_DISPOSE:
        problems.append("Engine.dispose not restored")
    if Connection.__dict__["__enter__"] is not _ORIGINAL_CONNECTION_ENTER:
        problems.append("Connection.__enter__ not restored")
    if "__aenter__" in AsyncConnection.__dict__:
        problems.append("AsyncConnection.__aenter__ not removed")
    for pool in pools:
        for name in ("checkout", "checkin", "detach"):
            if getattr(pool.dispatch, name):
                problems.append(f"{type(pool).__name__}.dispatch.{name} still has listeners")
    if problems and len(restore_failures) < 20:
        restore_failures.append(f"after {config.key}: " + "; ".join(problems))


def stack_len() -> int | None:
    """Frames pgleak recorded for the one connection checked out now (None if untracked)."""
    out = pgleak.checked_out()
    return len(out[0].stack) if out else None


# -- CPU pinning ---------------------------------------------------------------------------------


class Pinning:
    """Put this process and the backends of its pooled connections on one CPU (Linux only)."""

    def __init__(self, enabled: bool) -> None:
        self.cpu: int | None = None
        self.note = "off (--no-pin)"
        self.backends: dict[str, int] = {}
        self._saved: set[int] | None = None
        if not enabled:
            return
        if not hasattr(os, "sched_setaffinity"):
            self.note = "not available on this platform"
            return
        try:
            self._saved = os.sched_getaffinity(0)
            self.cpu = max(self._saved)
            os.sched_setaffinity(0, {self.cpu})
        except OSError as exc:
            self.note = f"failed: {exc}"
            self.cpu = None
            return
        self.note = f"process and its PostgreSQL backends on CPU {self.cpu}"

    def backend(self, name: str, pid: int) -> None:
        self.backends[name] = pid
        if self.cpu is None:
            return
        try:
            os.sched_setaffinity(pid, {self.cpu})
        except OSError as exc:
            self.note = f"process on CPU {self.cpu}; backend {pid} not pinned: {exc}"

    def restore(self) -> None:
        if self._saved is not None:
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, self._saved)


# -- running -------------------------------------------------------------------------------------


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def backend_pid_sync(engine: Engine) -> int:
    with engine.connect() as c:
        return int(c.exec_driver_sql("select pg_backend_pid()").scalar_one())


async def backend_pid_async(engine: AsyncEngine) -> int:
    async with engine.connect() as c:
        return int((await c.exec_driver_sql("select pg_backend_pid()")).scalar_one())


def run_sync(engine: Engine, plan: Plan, depth: int, pinning: Pinning) -> list[Result]:
    pools = [engine.pool]
    pinning.backend("sync", backend_pid_sync(engine))
    results = []
    for name, description, loop in SYNC_WORKLOADS:
        # Calibrate N on bare SQLAlchemy (warms the pool, the dialect and the caches too).
        at_depth(depth, partial(time_sync, loop, engine, plan.warmup_iterations))
        spent = at_depth(depth, partial(time_sync, loop, engine, plan.calibrate_iterations))
        n = iterations_for(spent / plan.calibrate_iterations, plan)
        frames: dict[str, int | None] = {}
        for config in CONFIGS:
            enter(config)

            def probe() -> int | None:
                with engine.connect():
                    return stack_len()

            frames[config.key] = at_depth(depth, probe)
            leave(config, pools)
        per_round: dict[str, list[float]] = {c.key: [] for c in CONFIGS}
        rounds: list[float] = []
        log(f"{name}: {plan.rounds} rounds x {len(CONFIGS)} configs x {n} iterations")
        for _ in range(plan.rounds):
            total = 0
            for config in CONFIGS:
                enter(config)
                at_depth(depth, partial(time_sync, loop, engine, plan.warmup_iterations))
                spent = at_depth(depth, partial(time_sync, loop, engine, n))
                leave(config, pools)
                per_round[config.key].append(spent / n)
                total += spent
            rounds.append(total / 1e9)
        results.append(Result(name, description, n, per_round, frames, rounds))
    if backend_pid_sync(engine) != pinning.backends["sync"]:
        pinning.note += "; WARNING: the sync pool replaced its connection during the run"
    return results


async def run_async(url: str, plan: Plan, depth: int, pinning: Pinning) -> list[Result]:
    engine = create_async_engine(url, pool_size=1, max_overflow=0)
    pools = [engine.sync_engine.pool]
    results = []
    try:
        pinning.backend("async", await backend_pid_async(engine))
        for name, description, loop in ASYNC_WORKLOADS:
            await at_depth_async(depth, partial(time_async, loop, engine, plan.warmup_iterations))
            spent = await at_depth_async(
                depth, partial(time_async, loop, engine, plan.calibrate_iterations)
            )
            n = iterations_for(spent / plan.calibrate_iterations, plan)
            frames: dict[str, int | None] = {}
            for config in CONFIGS:
                enter(config)

                async def probe() -> int | None:
                    async with engine.connect():
                        return stack_len()

                frames[config.key] = await at_depth_async(depth, probe)
                leave(config, pools)
            per_round: dict[str, list[float]] = {c.key: [] for c in CONFIGS}
            rounds: list[float] = []
            log(f"{name}: {plan.rounds} rounds x {len(CONFIGS)} configs x {n} iterations")
            for _ in range(plan.rounds):
                total = 0
                for config in CONFIGS:
                    enter(config)
                    await at_depth_async(
                        depth, partial(time_async, loop, engine, plan.warmup_iterations)
                    )
                    spent = await at_depth_async(depth, partial(time_async, loop, engine, n))
                    leave(config, pools)
                    per_round[config.key].append(spent / n)
                    total += spent
                rounds.append(total / 1e9)
            results.append(Result(name, description, n, per_round, frames, rounds))
        if await backend_pid_async(engine) != pinning.backends["async"]:
            pinning.note += "; WARNING: the async pool replaced its connection during the run"
    finally:
        await engine.dispose()
    return results


# -- reporting -----------------------------------------------------------------------------------


def quartiles(values: list[float]) -> tuple[float, float]:
    if len(values) < 2:
        return values[0], values[0]
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def us(ns: float) -> float:
    return ns / 1000.0


def print_table(results: list[Result]) -> None:
    header = (
        f"{'workload':<12} {'configuration':<33} {'us/cycle':>9} {'IQR (us)':>15} "
        f"{'added us':>9} {'overhead':>9} {'paired':>8} {'frames':>6}"
    )
    print(header)
    print("-" * len(header))
    for result in results:
        bare = result.median_ns("bare")
        for config in CONFIGS:
            med = result.median_ns(config.key)
            lo, hi = quartiles(result.per_round_ns[config.key])
            iqr = f"{us(lo):.2f}-{us(hi):.2f}"
            frames = result.captured_frames[config.key]
            frames_text = "-" if frames is None else str(frames)
            if config.key == "bare":
                added = pct = paired = ""
            else:
                added = f"{us(med - bare):+.2f}"
                pct = f"{(med / bare - 1) * 100:+.1f}%"
                paired = f"{us(statistics.median(result.paired_delta_ns(config.key))):+.2f}"
            print(
                f"{result.workload:<12} {config.label:<33} {us(med):>9.2f} {iqr:>15} "
                f"{added:>9} {pct:>9} {paired:>8} {frames_text:>6}"
            )
        print()


def print_markdown(results: list[Result]) -> None:
    keys = [c.key for c in CONFIGS]
    print("| workload | " + " | ".join(c.label for c in CONFIGS) + " |")
    print("|---|" + "---:|" * len(CONFIGS))
    for result in results:
        bare = result.median_ns("bare")
        cells = [f"{us(bare):.2f} µs"]
        for key in keys[1:]:
            med = result.median_ns(key)
            cells.append(
                f"{us(med):.2f} µs ({us(med - bare):+.2f} µs, {(med / bare - 1) * 100:+.1f}%)"
            )
        print(f"| {result.workload} | " + " | ".join(cells) + " |")


def print_targets(results: list[Result]) -> list[dict[str, Any]]:
    by_name = {r.workload: r for r in results}
    verdicts: list[dict[str, Any]] = []
    query = by_name["sync query"]
    for key in keys_with_pgleak():
        pct = (query.median_ns(key) / query.median_ns("bare") - 1) * 100
        verdicts.append(
            {
                "target": f"sync query, {key}: added <= {TARGET_QUERY_PCT:g}%",
                "value": round(pct, 2),
                "unit": "%",
                "met": pct <= TARGET_QUERY_PCT,
            }
        )
    bare = by_name["sync bare"]
    for key in STACK_CONFIGS:
        added = us(bare.median_ns(key) - bare.median_ns("bare"))
        verdicts.append(
            {
                "target": f"sync bare, {key}: added <= {TARGET_BARE_US:g} us",
                "value": round(added, 2),
                "unit": "us",
                "met": added <= TARGET_BARE_US,
            }
        )
    for v in verdicts:
        status = "met" if v["met"] else "NOT MET"
        print(f"  {v['target']:<42} measured {v['value']:+.2f} {v['unit']:<3} -> {status}")
    return verdicts


def keys_with_pgleak() -> list[str]:
    return [c.key for c in CONFIGS if c.settings is not None]


def server_version(engine: Engine) -> str:
    with engine.connect() as c:
        return str(c.exec_driver_sql("show server_version").scalar())


def version_of(distribution: str) -> str:
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        return "?"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--quick", action="store_true", help="few rounds, small N: a smoke run (< 30 s)"
    )
    parser.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="interleaved rounds per workload (default: 15, --quick: 5)",
    )
    parser.add_argument(
        "--depth",
        type=int,
        default=20,
        help="extra Python frames under which the loops run (default: 20)",
    )
    parser.add_argument(
        "--no-pin",
        action="store_true",
        help="do not pin this process and its PostgreSQL backends to one CPU",
    )
    parser.add_argument(
        "--otel-variants",
        action="store_true",
        help="also measure OpenTelemetry with metrics only, and with an unsampled tracer",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the raw numbers here")
    args = parser.parse_args(argv)
    global CONFIGS
    CONFIGS = configs(args.otel_variants)
    plan = QUICK if args.quick else FULL
    if args.rounds is not None:
        plan = dataclasses.replace(plan, rounds=max(1, args.rounds))
    command = shlex.join(getattr(sys, "orig_argv", [sys.executable, *sys.argv]))
    env_knobs = sorted(k for k in os.environ if k.startswith("PGLEAK_"))
    if env_knobs:
        log(f"warning: {', '.join(env_knobs)} set; install() merges them into every config")

    started = time.monotonic()
    pgleak.uninstall()
    pinning = Pinning(not args.no_pin)
    try:
        with EmbeddedPostgres(max_connections=10) as server:
            engine = create_engine(server.url("psycopg"), pool_size=1, max_overflow=0)
            try:
                pg_version = server_version(engine)
                results = run_sync(engine, plan, args.depth, pinning)
            finally:
                engine.dispose()
            results += asyncio.run(run_async(server.url("asyncpg"), plan, args.depth, pinning))
    finally:
        pinning.restore()
    elapsed = time.monotonic() - started

    python = f"{platform.python_implementation()} {platform.python_version()}"
    versions = (
        f"{python}, SQLAlchemy {sqlalchemy.__version__}, psycopg {version_of('psycopg')}, "
        f"asyncpg {version_of('asyncpg')}, PostgreSQL {pg_version}, "
        f"pgleak {pgleak.__version__}"
    )
    method = (
        f"median of {plan.rounds} interleaved rounds (one block per configuration each); "
        f"pool_size=1, "
        f"warmed up; gc disabled during each timed block; loops run {args.depth} Python "
        f"frames deep (to look like a web app's stack)"
    )
    print()
    print(f"pgleak checkout benchmark ({'quick' if args.quick else 'full'} run)")
    print(f"command:     {command}")
    print(
        f"python:      {sys.version.split()[0]} ({platform.python_implementation()}, "
        f"{platform.machine()}, {os.cpu_count()} CPUs)"
    )
    print(
        f"sqlalchemy:  {sqlalchemy.__version__} (psycopg {version_of('psycopg')}, asyncpg "
        f"{version_of('asyncpg')}); pgleak {pgleak.__version__}"
    )
    print(f"postgresql:  {pg_version} (pgleak.embedded.EmbeddedPostgres, TCP on 127.0.0.1)")
    print(
        f"method:      {method}; {plan.warmup_iterations} untimed warm-up iterations after "
        f"each install()"
    )
    print(f"cpu pinning: {pinning.note}")
    for result in results:
        print(
            f"rounds:      {result.workload}: {result.iterations} iterations per config, "
            f"median round {statistics.median(result.round_seconds):.2f} s"
        )
    print(f"wall time:   {elapsed:.1f} s")
    print()
    print(
        "us/cycle = median over rounds of the per-iteration time; IQR = its interquartile "
        "range;\nadded, overhead = median vs the bare median; paired = median over rounds of "
        "(config - bare of the same round);\nframes = stack frames pgleak recorded for one "
        "checkout at this depth"
    )
    print()
    print_table(results)
    print("targets (reported, not asserted):")
    verdicts = print_targets(results)
    if restore_failures:
        print()
        print("WARNING: pgleak.uninstall() did not restore SQLAlchemy exactly:")
        for failure in restore_failures:
            print(f"  {failure}")

    if args.json:
        data = {
            "command": command,
            "quick": args.quick,
            "python": sys.version,
            "sqlalchemy": sqlalchemy.__version__,
            "psycopg": version_of("psycopg"),
            "asyncpg": version_of("asyncpg"),
            "pgleak": pgleak.__version__,
            "postgresql": pg_version,
            "cpu_count": os.cpu_count(),
            "rounds": plan.rounds,
            "depth": args.depth,
            "gc_disabled_while_timing": True,
            "pinned_cpu": pinning.cpu,
            "pinning": pinning.note,
            "wall_seconds": round(elapsed, 2),
            "configs": {
                c.key: {
                    "label": c.label,
                    "install": None
                    if c.settings is None
                    else {
                        k: (type(v).__name__ if k.endswith("_provider") else v)
                        for k, v in c.settings.items()
                    },
                }
                for c in CONFIGS
            },
            "targets": verdicts,
            "restore_failures": restore_failures,
            "workloads": [
                {
                    "workload": r.workload,
                    "code": r.description,
                    "iterations_per_round": r.iterations,
                    "captured_frames": r.captured_frames,
                    "median_ns": {k: r.median_ns(k) for k in r.per_round_ns},
                    "per_round_ns": r.per_round_ns,
                    "round_seconds": r.round_seconds,
                }
                for r in results
            ],
        }
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(data, fh, indent=2)
            fh.write("\n")
        print()
        print(f"raw numbers written to {args.json}")

    print()
    print("markdown (for docs/performance.md):")
    print()
    print_markdown(results)
    print()
    print(f"{versions}; {os.cpu_count()} CPUs, {pinning.note}; {method}.")
    print(f"Command: `{command}`")
    return 0


if __name__ == "__main__":
    sys.exit(main())
