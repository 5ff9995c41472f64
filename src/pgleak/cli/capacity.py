"""Check at deploy time that every pool fits into the server.

    demand = (pool_size + max_overflow) x processes_per_instance x instances
    budget = headroom x (max_connections - reserved)

Exit codes: 0 it fits, 1 it does not, 2 bad arguments (or no connection for --dsn). It also
suggests the largest per-process pool that fits. Behind PgBouncer in transaction mode the
server sees PgBouncer's pool, not the applications': pass --pgbouncer-pool-size.
"""

from __future__ import annotations

import argparse
import math
import sys
from typing import Any

NAME = "capacity"
HELP = "check that pool_size x processes x instances fits max_connections (a deploy gate)"

#: PostgreSQL's default superuser_reserved_connections.
_DEFAULT_RESERVED = 3


def configure(parser: argparse.ArgumentParser) -> None:
    from pgleak.cli import _types

    parser.add_argument(
        "--pool-size", type=_types.non_negative_int, required=True, help="per process"
    )
    parser.add_argument(
        "--max-overflow",
        type=_types.non_negative_int,
        default=0,
        help="per process, on top of --pool-size (SQLAlchemy's; default 0)",
    )
    parser.add_argument(
        "--processes-per-instance",
        type=_types.count,
        default=1,
        metavar="N",
        help="worker processes per instance (gunicorn workers, ...; default 1)",
    )
    parser.add_argument(
        "--instances", type=_types.count, default=1, metavar="N", help="instances (default 1)"
    )
    parser.add_argument(
        "--max-connections",
        type=_types.count,
        metavar="N",
        help="the server's max_connections (or read it with --dsn)",
    )
    parser.add_argument(
        "--reserved",
        type=_types.non_negative_int,
        metavar="N",
        help="slots ordinary roles cannot take (default: read with --dsn, else 3)",
    )
    parser.add_argument(
        "--headroom",
        type=_types.fraction,
        default=0.8,
        help="the share of the usable slots the pools may plan for (default 0.8)",
    )
    parser.add_argument("--dsn", help="read max_connections and the reserved slots from here")
    parser.add_argument(
        "--pgbouncer-pool-size",
        type=_types.count,
        metavar="N",
        help="PgBouncer (transaction mode) in front: its server connections per database/user",
    )
    parser.add_argument(
        "--pgbouncer-instances",
        type=_types.count,
        default=1,
        metavar="N",
        help="PgBouncer processes in front (default 1)",
    )


def _fail(message: str) -> int:
    print(f"pgleak capacity: {message}", file=sys.stderr)
    return 2


def _read_server(dsn: str) -> tuple[int, int]:
    from pgleak.doctor.connect import connect, resolve_dsn

    with connect(resolve_dsn(dsn)) as conn:
        row: Any = conn.execute(
            "SELECT current_setting('max_connections')::int,"
            " current_setting('superuser_reserved_connections')::int"
            " + coalesce(current_setting('reserved_connections', true), '0')::int"
        ).fetchone()
    return int(row[0]), int(row[1])


def run(args: argparse.Namespace) -> int:
    from pgleak.doctor.connect import DoctorError

    max_connections, reserved = args.max_connections, args.reserved
    if args.dsn is not None:
        try:
            read_max, read_reserved = _read_server(args.dsn)
        except DoctorError as exc:
            return _fail(str(exc))
        max_connections = max_connections or read_max
        reserved = read_reserved if reserved is None else reserved
    if max_connections is None:
        return _fail("give --max-connections N, or --dsn to read it from the server")
    if reserved is None:
        reserved = _DEFAULT_RESERVED
    if reserved >= max_connections:
        return _fail(f"--reserved {reserved} leaves nothing of max_connections {max_connections}")

    per_process = args.pool_size + args.max_overflow
    processes = args.processes_per_instance * args.instances
    demand = per_process * processes
    usable = max_connections - reserved
    budget = math.floor(args.headroom * usable)
    out = [
        f"per process:  pool_size {args.pool_size} + max_overflow {args.max_overflow} "
        f"= {per_process}",
        f"demand:       {per_process} x {args.processes_per_instance} processes per instance "
        f"x {args.instances} instances = {demand} connections",
        f"budget:       {args.headroom:g} x (max_connections {max_connections} - reserved "
        f"{reserved}) = {budget} connections",
    ]
    server_side = demand
    if args.pgbouncer_pool_size is not None:
        server_side = args.pgbouncer_pool_size * args.pgbouncer_instances
        out.append(
            f"pgbouncer:    the server sees {args.pgbouncer_pool_size} x "
            f"{args.pgbouncer_instances} PgBouncer = {server_side} connections per "
            f"database/user pair; the apps' {demand} are PgBouncer clients "
            f"(max_client_conn >= {demand})"
        )
    fits = server_side <= budget
    verdict = "fits" if fits else f"DOES NOT FIT (over by {server_side - budget})"
    out.append(
        f"total:        {server_side} <= {budget}: {verdict}"
        if fits
        else f"total:        {server_side} > {budget}: {verdict}"
    )
    most = budget // processes
    if most >= 1:
        # The same split between pool and overflow as asked for, the pool at least 1.
        overflow = min(most - 1, math.floor(most * args.max_overflow / max(1, per_process)))
        out.append(
            f"suggested:    at most {most} per process (pool_size {most - overflow}, "
            f"max_overflow {overflow}): {most} x {processes} = {most * processes} <= {budget}"
        )
    else:
        out.append(
            f"suggested:    not even 1 connection per process fits {processes} processes "
            "in the budget: put PgBouncer in transaction mode in front"
        )
    if args.pgbouncer_pool_size is None and not fits:
        out.append(
            "note:         with PgBouncer in transaction mode in front, the server sees only "
            "PgBouncer's default_pool_size per database/user pair, not these pools: re-run "
            "with --pgbouncer-pool-size N (a transaction holds a server connection only while "
            "it runs, so session state and prepared statements need care)"
        )
    print("\n".join(out))
    return 0 if fits else 1
