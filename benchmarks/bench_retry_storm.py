"""A connection storm against a full server: pgleak's retry vs. a fixed-interval retry loop.

Usage::

    python benchmarks/bench_retry_storm.py            # full run, under two minutes
    python benchmarks/bench_retry_storm.py --quick    # smoke run, under 30 s

A throwaway server with ``max_connections=5`` starts full: five holders keep every slot and
give one back every ``--release-every`` seconds. ``--clients`` threads then each open a
connection at the same moment, run ``SELECT 1``, keep it ``--work`` seconds (a request) and
close it. Every connection attempt made by the clients is counted, so the two strategies are
compared on what the server sees (attempts: each refused one is a fork-less but real
authentication round trip for the postmaster) and on what the application sees (failures,
latency):

* ``pgleak``: ``pgleak.install()`` with default settings; each client's connect goes through
  ``pgleak._retry.retry_connect`` (what every adapter calls);
* ``fixed``: the naive loop many applications have - retry every ``--interval`` seconds until
  the same deadline as pgleak's (``retry_deadline``);
* ``pgleak, budget spent``: pgleak after a long outage has emptied the retry budget: every
  refused request fails at once (one attempt), which is the point - no added load.

Rounds alternate the strategies, each on a freshly filled server; the table shows totals.
"""

from __future__ import annotations

import argparse
import logging
import statistics
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import psycopg

import pgleak
from pgleak import _retry
from pgleak._retry import classify
from pgleak.embedded import EmbeddedPostgres

MAX_CONNECTIONS = 5


@dataclass
class Result:
    attempts: int = 0
    failures: int = 0
    latencies: list[float] = field(default_factory=list)
    failure_latencies: list[float] = field(default_factory=list)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def merge(self, other: Result) -> None:
        self.attempts += other.attempts
        self.failures += other.failures
        self.latencies += other.latencies
        self.failure_latencies += other.failure_latencies


def fixed_interval(connect: Callable[[], Any], interval: float, deadline: float) -> Any:
    """The naive loop: retry every ``interval`` seconds while the server says it is full."""
    start = time.monotonic()
    while True:
        try:
            return connect()
        except psycopg.OperationalError as exc:
            if classify(exc) is None or time.monotonic() - start + interval > deadline:
                raise
            time.sleep(interval)


def storm(
    srv: EmbeddedPostgres,
    strategy: str,
    clients: int,
    release_every: float,
    work: float,
    interval: float,
) -> Result:
    dsn = srv.dsn()
    result = Result()
    deadline = pgleak.settings().retry_deadline

    def connect() -> Any:
        with result.lock:
            result.attempts += 1
        return psycopg.connect(dsn)

    with pgleak.suppress():
        holders = [psycopg.connect(dsn) for _ in range(MAX_CONNECTIONS)]

    def release() -> None:
        for conn in holders:
            time.sleep(release_every)
            conn.close()

    start = threading.Barrier(clients + 1)

    def client() -> None:
        start.wait()
        t0 = time.monotonic()
        try:
            if strategy == "fixed":
                conn = fixed_interval(connect, interval, deadline)
            else:
                conn = _retry.retry_connect(connect, pool="bench")
        except psycopg.OperationalError:
            with result.lock:
                result.failures += 1
                result.failure_latencies.append(time.monotonic() - t0)
            return
        try:
            conn.execute("select 1")
            time.sleep(work)
        finally:
            conn.close()
        with result.lock:
            result.latencies.append(time.monotonic() - t0)

    threads = [threading.Thread(target=client) for _ in range(clients)]
    for thread in threads:
        thread.start()
    releaser = threading.Thread(target=release)
    start.wait()
    releaser.start()
    for thread in threads:
        thread.join()
    releaser.join()
    return result


def _fmt(values: list[float], q: float) -> str:
    if not values:
        return "-"
    if q == 0.5:
        return f"{statistics.median(values):.2f}"
    ordered = sorted(values)
    return f"{ordered[min(len(ordered) - 1, int(q * len(ordered)))]:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="one round (smoke run)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--clients", type=int, default=30)
    parser.add_argument("--release-every", type=float, default=0.3)
    parser.add_argument("--work", type=float, default=0.05)
    parser.add_argument("--interval", type=float, default=0.05)
    args = parser.parse_args()
    rounds = args.rounds or (1 if args.quick else 4)
    logging.getLogger("pgleak").setLevel(logging.CRITICAL)  # the table is the output

    totals = {name: Result() for name in ("fixed", "pgleak", "spent")}
    with EmbeddedPostgres(max_connections=MAX_CONNECTIONS) as srv:
        pgleak.install(integrations=())
        try:
            for _ in range(rounds):
                for name in ("fixed", "pgleak"):
                    _retry.BUDGET.reset()
                    totals[name].merge(
                        storm(srv, name, args.clients, args.release_every, args.work, args.interval)
                    )
                # The budget after a long outage: empty.
                max_tokens = pgleak.settings().retry_budget
                for _ in range(int(max_tokens) + 1):
                    _retry.BUDGET.failed(max_tokens)
                totals["spent"].merge(
                    storm(srv, "spent", args.clients, args.release_every, args.work, args.interval)
                )
        finally:
            settings = pgleak.settings()
            pgleak.uninstall()

    requests = rounds * args.clients
    print(
        f"\n{args.clients} clients x {rounds} round(s) against max_connections="
        f"{MAX_CONNECTIONS}, 5 holders releasing one every {args.release_every}s, "
        f"{args.work}s of work per request; pgleak defaults (deadline "
        f"{settings.retry_deadline}s, {settings.retry_max_attempts} attempts, base "
        f"{settings.retry_base_delay}s, cap {settings.retry_max_delay}s, budget "
        f"{settings.retry_budget:g}/{settings.retry_budget_ratio:g}); fixed interval "
        f"{args.interval}s, same deadline\n"
    )
    print(
        "| strategy | requests | connection attempts | attempts / request | failures "
        "| latency p50 (s) | latency p95 (s) | time to fail p50 (s) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    labels = {
        "fixed": f"fixed interval {args.interval}s",
        "pgleak": "pgleak (full jitter, budget)",
        "spent": "pgleak, budget spent",
    }
    for name, label in labels.items():
        r = totals[name]
        print(
            f"| {label} | {requests} | {r.attempts} | {r.attempts / requests:.1f} | "
            f"{r.failures} | {_fmt(r.latencies, 0.5)} | {_fmt(r.latencies, 0.95)} | "
            f"{_fmt(r.failure_latencies, 0.5)} |"
        )
    ratio = totals["pgleak"].attempts / max(1, totals["fixed"].attempts)
    print(
        f"\npgleak made {ratio:.2f}x the fixed-interval loop's attempts (target <= 0.33) with "
        f"{totals['pgleak'].failures} failure(s) (target 0)."
    )


if __name__ == "__main__":
    main()
