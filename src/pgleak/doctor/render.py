"""The doctor's two outputs: one JSON object for machines, aligned tables for people.

Both come from :func:`report`, so they cannot disagree. Tables are sorted worst first (states
by how much they hurt, then counts); colour only on a terminal, and never with ``NO_COLOR``.
"""

from __future__ import annotations

import collections
import json
import os
from collections.abc import Sequence
from typing import Any, TextIO

from pgleak.doctor.queries import Backend, Snapshot
from pgleak.doctor.rules import SEVERITIES, Finding, detect_pooler, fmt_age

__all__ = ["report", "to_human", "to_json", "use_colour"]

# Worst first: a transaction left open blocks vacuum and holds locks; idle merely holds a slot.
_STATE_ORDER = (
    "idle in transaction (aborted)",
    "idle in transaction",
    "active",
    "fastpath function call",
    "disabled",
    "idle",
)
_HIDDEN_STATE = "(hidden)"
_COLOURS = {"critical": "\x1b[1;31m", "warning": "\x1b[33m", "info": "\x1b[2m"}
_RESET = "\x1b[0m"


def use_colour(stream: TextIO) -> bool:
    """Colour on a terminal unless ``NO_COLOR`` is set (https://no-color.org)."""
    if os.environ.get("NO_COLOR"):
        return False
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _state(b: Backend) -> str:
    return b.state or _HIDDEN_STATE


def _state_rank(state: str) -> int:
    return _STATE_ORDER.index(state) if state in _STATE_ORDER else len(_STATE_ORDER)


def _counts(backends: Sequence[Backend], key: Any) -> dict[str, int]:
    counter = collections.Counter(key(b) for b in backends)
    return dict(sorted(counter.items(), key=lambda kv: (-kv[1], kv[0])))


def _by_application(backends: Sequence[Backend]) -> list[dict[str, Any]]:
    groups: dict[str, list[Backend]] = collections.defaultdict(list)
    for b in backends:
        groups[b.application_name].append(b)
    rows = []
    for name, members in groups.items():
        tag = members[0].tag
        states = collections.Counter(_state(b) for b in members)
        rows.append(
            {
                "application_name": name,
                "service": tag.service if tag else None,
                "host": tag.host if tag else None,
                "pid": tag.pid if tag else None,
                "call_site": tag.call_site if tag else None,
                "count": len(members),
                "states": dict(sorted(states.items(), key=lambda kv: _state_rank(kv[0]))),
                "clients": sorted({b.client for b in members}),
                "backend_pids": sorted(b.pid for b in members),
                "oldest_state_s": max((b.state_age or 0.0) for b in members),
            }
        )

    def badness(row: dict[str, Any]) -> tuple[int, int, str]:
        worst = min((_state_rank(s) for s in row["states"]), default=len(_STATE_ORDER))
        stuck = worst <= 1  # holds a transaction open: shown first whatever its count
        return (0 if stuck else 1, -row["count"], row["application_name"])

    rows.sort(key=badness)
    return rows


def report(snap: Snapshot, findings: list[Finding]) -> dict[str, Any]:
    """The JSON-ready report: server facts, breakdowns, findings."""
    server = snap.server
    usable = server.usable
    pooler = detect_pooler(snap)
    return {
        "server": {
            "version": server.version,
            "version_num": server.version_num,
            "max_connections": server.max_connections,
            "reserved": server.reserved,
            "superuser_reserved_connections": server.superuser_reserved,
            "reserved_connections": server.reserved_connections,
            "used": snap.used,
            "available": max(0, usable - snap.used),
            "percent_used": round(100.0 * snap.used / usable, 1) if usable else 100.0,
            "role": server.role,
            "superuser": server.superuser,
            "role_limit": server.role_limit,
            "role_used": sum(1 for b in snap.backends if b.role == server.role),
            "database": server.database,
            "database_limit": server.database_limit,
            "database_used": sum(1 for b in snap.backends if b.database == server.database),
            "doctor_pid": server.self_pid,
            "timeouts": server.timeouts,
            "pooler": pooler[0] if pooler else None,
        },
        "by_state": dict(
            sorted(
                collections.Counter(_state(b) for b in snap.backends).items(),
                key=lambda kv: (_state_rank(kv[0]), -kv[1]),
            )
        ),
        "by_role": _counts(snap.backends, lambda b: b.role or _HIDDEN_STATE),
        "by_database": _counts(snap.backends, lambda b: b.database or _HIDDEN_STATE),
        "by_client_addr": _counts(snap.backends, lambda b: b.client),
        "by_application": _by_application(snap.backends),
        "findings": [f.as_dict() for f in findings],
    }


def to_json(data: dict[str, Any], *, compact: bool = False) -> str:
    """The report as JSON: indented, or on one line (``--watch``: one object per line)."""
    return json.dumps(data, indent=None if compact else 2, default=str)


def _table(headers: Sequence[str], rows: Sequence[Sequence[object]], indent: str = "  ") -> str:
    cells = [[str(c) for c in headers], *[["" if c is None else str(c) for c in r] for r in rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = [
        indent + "  ".join(cell.ljust(widths[i]) for i, cell in enumerate(row)).rstrip()
        for row in cells
    ]
    return "\n".join(lines)


def _pids(pids: Sequence[int], limit: int = 8) -> str:
    shown = ", ".join(str(p) for p in pids[:limit])
    return shown + (f" (+{len(pids) - limit} more)" if len(pids) > limit else "")


def to_human(data: dict[str, Any], *, colour: bool = False, target: str = "") -> str:
    """The report as a terminal page: facts, findings worst first, then the breakdowns."""
    s = data["server"]

    def paint(severity: str, text: str) -> str:
        return f"{_COLOURS[severity]}{text}{_RESET}" if colour else text

    out = [
        f"pgleak doctor: PostgreSQL {s['version']}"
        + (f" at {target}" if target else "")
        + f" as {s['role']}{' (superuser)' if s['superuser'] else ''}",
        f"connections: {s['used']} used of max_connections={s['max_connections']} "
        f"({s['reserved']} reserved for superusers): {s['available']} available to "
        f"ordinary roles, {s['percent_used']:g}% of the usable "
        f"{s['max_connections'] - s['reserved']}",
    ]
    limits = []
    if s["role_limit"] is not None:
        limits.append(f"role {s['role']}: {s['role_used']} of its limit {s['role_limit']}")
    if s["database_limit"] is not None:
        limits.append(
            f"database {s['database']}: {s['database_used']} of its limit {s['database_limit']}"
        )
    if limits:
        out.append("limits: " + "; ".join(limits))
    out.append(f"pooler in front: {s['pooler'] or 'none seen'}")
    findings = data["findings"]
    out.append("")
    if findings:
        out.append(f"FINDINGS ({len(findings)}, worst first)")
        for f in findings:
            label = paint(f["severity"], f["severity"].upper().ljust(8))
            out.append(f"  {label} {f['kind']}: {f['message']}")
            if f["pids"]:
                out.append(f"           pids: {_pids(f['pids'])}")
            out.append(f"           fix: {f['fix']}")
    else:
        out.append("FINDINGS: none, the server looks healthy")
    out.append("")
    out.append("BY APPLICATION (pgleak tags parsed back: service / host / pid / call site)")
    rows = [
        (
            r["count"],
            r["service"] or "-",
            r["host"] or "-",
            r["pid"] or "-",
            r["call_site"] or "-",
            ", ".join(f"{n} {st}" for st, n in r["states"].items()),
            fmt_age(r["oldest_state_s"]),
            r["application_name"] or "(none)",
        )
        for r in data["by_application"]
    ]
    out.append(
        _table(
            (
                "count",
                "service",
                "host",
                "pid",
                "call site",
                "states",
                "oldest",
                "application_name",
            ),
            rows,
        )
    )
    for title, key in (
        ("BY STATE", "by_state"),
        ("BY ROLE", "by_role"),
        ("BY DATABASE", "by_database"),
        ("BY CLIENT ADDRESS", "by_client_addr"),
    ):
        out.append("")
        out.append(title)
        out.append(
            _table(("count", key.removeprefix("by_")), [(n, k) for k, n in data[key].items()])
        )
    return "\n".join(out)


def worst(findings: Sequence[Finding]) -> str | None:
    """The worst severity among ``findings``."""
    ranks = [SEVERITIES.index(f.severity) for f in findings]
    return SEVERITIES[min(ranks)] if ranks else None
