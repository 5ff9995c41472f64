"""Diagnose a PostgreSQL server's connections from pg_stat_activity (read-only).

Shows the server's limits and use, who holds the backends (pgleak's application_name tags
parsed back into service / host / pid / call site), and findings worst first, each with a fix.

DSN: the argument (a postgresql:// URL, SQLAlchemy's postgresql+driver:// too, or libpq
key=value), else $DATABASE_URL, else libpq's environment (PGHOST, PGPORT, PGUSER, ...).

Exit codes: 0 healthy (info findings at most), 1 a warning or worse, 2 cannot connect or bad
arguments. On a full server, connect as a superuser: the reserved slots let it in.

--terminate ends only the backends its filters match (all filters must match), never the
doctor's own and never other databases unless --all-databases; --dry-run shows them first.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import Any

NAME = "doctor"
HELP = "diagnose a server's connections from pg_stat_activity; --terminate to drain"

_STATES = (
    "active",
    "idle",
    "idle in transaction",
    "idle in transaction (aborted)",
    "fastpath function call",
    "disabled",
)


def _state(text: str) -> str:
    value = text.strip().lower().replace("-", " ").replace("_", " ")
    value = value.replace("(aborted)", "").strip()
    if value == "idle in transaction aborted":
        value = "idle in transaction (aborted)"
    elif text.strip().lower().endswith("(aborted)"):
        value += " (aborted)"
    if value not in _STATES:
        raise argparse.ArgumentTypeError(f"{text!r} is not one of: {', '.join(_STATES)}")
    return value


def configure(parser: argparse.ArgumentParser) -> None:
    from pgleak.cli import _types

    parser.add_argument("dsn", nargs="?", help="the server (default: $DATABASE_URL, libpq env)")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument(
        "--idle-in-transaction-older-than",
        type=_types.duration,
        default=60.0,
        metavar="DURATION",
        help="report transactions left open longer than this (default 1m)",
    )
    parser.add_argument(
        "--idle-older-than",
        type=_types.duration,
        default=600.0,
        metavar="DURATION",
        help="report connections idle longer than this (default 10m)",
    )
    parser.add_argument(
        "--warn-percent",
        type=_types.percent,
        default=80.0,
        metavar="PERCENT",
        help="warn when this share of the usable connections is in use (default 80)",
    )
    parser.add_argument(
        "--connect-timeout",
        type=_types.positive_float,
        default=5.0,
        metavar="SECONDS",
        help="give up connecting after this long (default 5)",
    )
    parser.add_argument(
        "--app-name-template",
        default=os.environ.get("PGLEAK_APP_NAME_TEMPLATE") or None,
        metavar="TEMPLATE",
        help="your services' app_name_template, to parse their tags "
        "(default: $PGLEAK_APP_NAME_TEMPLATE or {service}@{host}:{pid})",
    )
    parser.add_argument(
        "--app-name-site-template",
        default=os.environ.get("PGLEAK_APP_NAME_SITE_TEMPLATE") or None,
        metavar="TEMPLATE",
        help="their app_name_site_template (default: {service}:{site})",
    )
    watch = parser.add_argument_group("watching")
    watch.add_argument(
        "--watch",
        type=_types.positive_float,
        metavar="SECONDS",
        help="refresh every SECONDS until Ctrl-C (a small top)",
    )
    watch.add_argument(
        "--count", type=_types.count, metavar="N", help="with --watch: stop after N refreshes"
    )
    drain = parser.add_argument_group("terminating (the emergency drain)")
    drain.add_argument(
        "--terminate", action="store_true", help="end the backends the filters below match"
    )
    drain.add_argument("--dry-run", action="store_true", help="show what would end; end nothing")
    drain.add_argument(
        "--state",
        type=_state,
        action="append",
        default=[],
        help="backends in this state (repeatable): idle, 'idle in transaction', active, ...",
    )
    drain.add_argument(
        "--older-than",
        type=_types.duration,
        metavar="DURATION",
        help="in their current state for longer than this",
    )
    drain.add_argument(
        "--application",
        action="append",
        default=[],
        metavar="GLOB",
        help="application_name matching this glob (repeatable)",
    )
    drain.add_argument(
        "--service", action="append", default=[], help="pgleak-tagged with this service"
    )
    drain.add_argument(
        "--pid", type=_types.count, action="append", default=[], help="this backend pid"
    )
    drain.add_argument("--role", action="append", default=[], help="connected as this role")
    drain.add_argument(
        "--all-databases",
        action="store_true",
        help="also other databases than the one connected to",
    )


def _filters(args: argparse.Namespace) -> Any:
    from pgleak.doctor.terminate import Filters

    return Filters(
        states=tuple(args.state),
        older_than=args.older_than,
        applications=tuple(args.application),
        services=tuple(args.service),
        pids=tuple(args.pid),
        roles=tuple(args.role),
        all_databases=args.all_databases,
    )


def _misused(args: argparse.Namespace, filters: Any) -> str | None:
    """What is wrong with a combination of options argparse alone accepts."""
    if not args.terminate and (not filters.empty or args.dry_run or args.all_databases):
        return "--dry-run and the filters (--state, --pid, ...) go with --terminate"
    if args.terminate and filters.empty:
        return (
            "--terminate needs at least one filter (--state, --older-than, --application, "
            "--service, --pid, --role): it never ends everything"
        )
    if args.count is not None and args.watch is None:
        return "--count goes with --watch"
    return None


def _fail(message: str) -> int:
    print(f"pgleak doctor: {message}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    from pgleak.doctor import DoctorError, connect, resolve_dsn
    from pgleak.doctor.connect import describe_target

    filters = _filters(args)
    wrong = _misused(args, filters)
    if wrong:
        return _fail(wrong)
    try:
        dsn = resolve_dsn(args.dsn)
        target = describe_target(dsn)
        conn = connect(dsn, timeout=args.connect_timeout)
    except DoctorError as exc:
        return _fail(str(exc))
    try:
        with conn:
            return _drain(conn, args, filters) if args.terminate else _show(conn, args, target)
    except KeyboardInterrupt:
        return 0
    except Exception as exc:  # a query failed: the server went away, a timeout, ...
        from pgleak._redact import redact_dsn

        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return _fail(f"query failed on {target}: {redact_dsn(first)}")


def _thresholds(args: argparse.Namespace) -> Any:
    from pgleak.doctor import Thresholds

    return Thresholds(
        idle_in_transaction=args.idle_in_transaction_older_than,
        idle=args.idle_older_than,
        warn_percent=args.warn_percent,
        critical_percent=max(args.warn_percent, 95.0),
    )


def _snapshot(conn: Any, args: argparse.Namespace) -> Any:
    from pgleak.doctor import take_snapshot

    return take_snapshot(
        conn, template=args.app_name_template, site_template=args.app_name_site_template
    )


def _show(conn: Any, args: argparse.Namespace, target: str) -> int:
    from pgleak.doctor import evaluate, report, to_human, to_json
    from pgleak.doctor.render import use_colour

    code = 0
    refreshes = 0
    thresholds = _thresholds(args)
    colour = use_colour(sys.stdout)
    while True:
        snap = _snapshot(conn, args)
        findings = evaluate(snap, thresholds)
        data = report(snap, findings)
        code = 1 if any(f.severity in ("critical", "warning") for f in findings) else 0
        if args.json:
            text = to_json(data, compact=args.watch is not None)
        else:
            text = to_human(data, colour=colour, target=target)
            if args.watch is not None:
                stamp = time.strftime("%H:%M:%S")
                text = f"{stamp}  every {args.watch:g}s (Ctrl-C to stop)\n{text}"
                if colour:
                    text = "\x1b[H\x1b[2J" + text  # top-like: redraw in place
        print(text, flush=True)
        refreshes += 1
        if args.watch is None or (args.count is not None and refreshes >= args.count):
            return code
        if not colour and not args.json:
            print(flush=True)
        time.sleep(args.watch)


def _drain(conn: Any, args: argparse.Namespace, filters: Any) -> int:
    import json

    from pgleak.doctor.rules import fmt_age
    from pgleak.doctor.terminate import select, terminate

    snap = _snapshot(conn, args)
    targets = select(snap, filters)
    ended: list[int] = []
    failed: list[int] = []
    if not args.dry_run:
        ended, failed = terminate(conn, targets)
    if args.json:
        print(
            json.dumps(
                {
                    "dry_run": args.dry_run,
                    "matched": [
                        {
                            "pid": b.pid,
                            "state": b.state,
                            "application_name": b.application_name,
                            "database": b.database,
                            "role": b.role,
                            "state_age_s": b.state_age,
                        }
                        for b in targets
                    ],
                    "terminated": ended,
                    "failed": failed,
                },
                indent=2,
            )
        )
    else:
        verb = "would terminate" if args.dry_run else "terminated"
        if not targets:
            print("pgleak doctor: no backend matches those filters; nothing ended")
        for b in targets:
            if not args.dry_run and b.pid not in ended:
                continue
            print(
                f"{verb} pid {b.pid}: {b.state or '(hidden)'} for {fmt_age(b.state_age)}, "
                f"{b.application_name or '(no application_name)'}, {b.role}@{b.database}, "
                f"from {b.client}"
            )
        if failed:
            print(f"not ended (gone already, or not permitted): {', '.join(map(str, failed))}")
        if args.dry_run and targets:
            print(f"{len(targets)} backend(s) match; run again without --dry-run to end them")
    return 1 if failed else 0
