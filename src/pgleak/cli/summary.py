"""Print the leaks by call site, worst first, from a JSON log: what to fix first.

    pgleak summary app.log            # the newest leak.summary record in the log
    kubectl logs web-7 | pgleak summary -
    pgleak summary --json app.log

The log is JSON lines, as a JSON log formatter writes them: pgleak.logging.JSONFormatter, or
any that puts a record's `pgleak` fields at the top level or under "pgleak". A
running process logs a `leak.summary` record every summary_interval (15 min) when something
leaked, and one at exit; the newest is printed. A log with no summary record yet (a process
still in its first interval) is summarised from the leak reports it holds. Lines that are not
JSON are skipped. Exit code: 0 nothing leaked, 1 leaks found, 2 no such file.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Iterator
from typing import Any, TextIO

NAME = "summary"
HELP = "print the leaks by call site, worst first, from a JSON log"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("log", metavar="LOG", help="a JSON-lines log file, or - for stdin")
    parser.add_argument("--json", action="store_true", help="print the sites as one JSON array")
    parser.add_argument(
        "--top", type=int, default=20, metavar="N", help="sites to print (default 20)"
    )


def _records(lines: Iterable[str]) -> Iterator[dict[str, Any]]:
    for line in lines:
        start = line.find("{")
        if start < 0:
            continue
        try:
            obj = json.loads(line[start:])
        except ValueError:
            continue
        if not isinstance(obj, dict):
            continue
        nested = obj.get("pgleak")
        fields = nested if isinstance(nested, dict) else obj
        if isinstance(fields.get("event"), str):
            yield fields


def sites_from(lines: Iterable[str]) -> list[dict[str, Any]]:
    """The newest ``leak.summary``'s sites, else a summary built from the reports seen."""
    from pgleak._events import Checkout, LeakEvent
    from pgleak._summary import SiteSummary

    built = SiteSummary(interval=lambda: float("inf"))
    newest: list[dict[str, Any]] | None = None
    for fields in _records(lines):
        kind = fields["event"]
        if kind == "leak.summary" and isinstance(fields.get("sites"), list):
            newest = fields["sites"]
            continue
        if kind == "report.suppressed":  # repeats the log counted instead of writing out
            count = fields.get("count")
            site = fields.get("site")
            built.add_repeats(
                str(fields.get("of")),
                site if isinstance(site, str) else None,
                str(fields.get("pool")),
                count if isinstance(count, int) else 0,
            )
            continue
        stack = fields.get("stack") or []
        checkout = Checkout(
            checkout_id=int(fields.get("checkout_id") or 0),
            pool=str(fields.get("pool")),
            held_s=float(fields.get("held_s") or 0.0),
            holder=str(fields.get("holder")),
            stack=[str(entry) for entry in stack],
        )
        holders = tuple(
            Checkout(0, str(fields.get("pool")), 0.0, "", [str(h.get("stack", ["?"])[-1])])
            for h in fields.get("holders") or []
            if isinstance(h, dict)
        )
        built(LeakEvent(kind, str(fields.get("pool")), checkout=checkout, holders=holders))
    return newest if newest is not None else built.sites()


def _table(sites: list[dict[str, Any]], top: int, out: TextIO) -> None:
    if not sites:
        print("no leaks reported in this log", file=out)
        return
    print(f"{'leaks':>5}  {'held, in all':>12}  {'longest':>8}  site (pool): counts", file=out)
    for site in sites[:top]:
        counts = ", ".join(f"{n} {kind}" for kind, n in site.get("counts", {}).items())
        where = f"{site.get('site')} ({site.get('pool')})"
        print(
            f"{site.get('leaks', 0):>5}  {site.get('held_total_s', 0):>11.1f}s  "
            f"{site.get('held_max_s', 0):>7.1f}s  {where}: {counts}",
            file=out,
        )
    if len(sites) > top:
        print(f"... and {len(sites) - top} more call site(s)", file=out)


def run(args: argparse.Namespace) -> int:
    try:
        if args.log == "-":
            sites = sites_from(sys.stdin)
        else:
            with open(args.log, encoding="utf-8", errors="replace") as log:
                sites = sites_from(log)
    except OSError as exc:
        print(f"pgleak summary: {exc.strerror or exc}: {args.log}", file=sys.stderr)
        return 2
    if args.json:
        json.dump(sites, sys.stdout, indent=2)
        print()
    else:
        _table(sites, max(1, args.top), sys.stdout)
    return 1 if any(site.get("leaks") for site in sites) else 0
