"""Findings: what is wrong with the server's connections, and the fix for each.

Each rule reads a :class:`~pgleak.doctor.queries.Snapshot` and returns findings with a stable
``kind``, a severity, the backend pids involved, a one-line message and a concrete fix (the SQL,
the setting or the command to run). Severities drive the exit code: ``warning`` and
``critical`` make ``pgleak doctor`` exit 1, ``info`` does not, so a cron job alerts on what
needs a person and not on every idle pool connection.
"""

from __future__ import annotations

import collections
import dataclasses
import statistics
from collections.abc import Callable

from pgleak.doctor.queries import TIMEOUT_SETTINGS, Backend, Snapshot, looks_like_pooler

__all__ = ["SEVERITIES", "Finding", "Thresholds", "evaluate", "fmt_age", "process_key"]

#: Worst first.
SEVERITIES = ("critical", "warning", "info")

_SUGGESTED_TIMEOUT = {
    "idle_in_transaction_session_timeout": "'60s'",
    "statement_timeout": "'30s'",
    "idle_session_timeout": "'1h'",
}


@dataclasses.dataclass(frozen=True)
class Thresholds:
    """Seconds and percentages the rules compare against (the CLI's flags)."""

    idle_in_transaction: float = 60.0
    idle: float = 600.0
    warn_percent: float = 80.0
    critical_percent: float = 95.0
    #: A client process holding this many times its peers' median (and at least
    #: ``hog_min``) looks like a leak.
    hog_factor: float = 3.0
    hog_min: int = 5


@dataclasses.dataclass(frozen=True)
class Finding:
    kind: str
    severity: str
    pids: list[int]
    message: str
    fix: str

    def as_dict(self) -> dict[str, object]:
        return dataclasses.asdict(self)


def fmt_age(seconds: float | None) -> str:
    """``42s``, ``3m05s``, ``2h10m``, ``4d3h``: short, for tables and messages."""
    if seconds is None:
        return "?"
    s = max(0, int(seconds))
    if s < 60:
        return f"{s}s"
    if s < 3600:
        return f"{s // 60}m{s % 60:02d}s"
    if s < 86400:
        return f"{s // 3600}h{s % 3600 // 60:02d}m"
    return f"{s // 86400}d{s % 86400 // 3600}h"


def process_key(backend: Backend) -> tuple[str, str, int] | None:
    """The client process a tagged backend belongs to: (service, host, pid)."""
    tag = backend.tag
    if tag is None or tag.pid is None:
        return None
    return (tag.service or "", tag.host or "", tag.pid)


def _who(backend: Backend) -> str:
    tag = backend.tag
    if tag is None:
        return repr(backend.application_name) if backend.application_name else "untagged"
    if tag.call_site:
        return f"{tag.service or '?'} at {tag.call_site}"
    return backend.application_name


def _short_query(query: str | None, limit: int = 60) -> str:
    text = " ".join((query or "").split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _near_limit(snap: Snapshot, t: Thresholds) -> list[Finding]:
    server = snap.server
    usable = server.usable
    if usable <= 0:
        return []
    percent = 100.0 * snap.used / usable
    if percent < t.warn_percent:
        return []
    severity = "critical" if percent >= t.critical_percent else "warning"
    in_reserved = max(0, snap.used - usable)
    extra = f", {in_reserved} of them in the reserved superuser slots" if in_reserved else ""
    message = (
        f"{snap.used} of {usable} usable connections in use ({percent:.0f}%; "
        f"max_connections={server.max_connections}, {server.reserved} reserved){extra}"
    )
    fix = (
        "find the holder in 'by application' below and fix its pool or leak; emergency drain: "
        "pgleak doctor --terminate --state idle --older-than 10m --dry-run; lasting: a pooler "
        "(PgBouncer, transaction mode) or smaller pools (pgleak capacity)"
    )
    return [Finding("near_limit", severity, [b.pid for b in snap.others], message, fix)]


def _own_limits(snap: Snapshot, t: Thresholds) -> list[Finding]:
    """The doctor's role or database near its own CONNECTION LIMIT (53300 before the server's)."""
    server = snap.server
    findings = []
    for kind, what, limit, members, sql in (
        (
            "near_role_limit",
            f"role {server.role}",
            server.role_limit,
            [b for b in snap.backends if b.role == server.role],
            f'ALTER ROLE "{server.role}" CONNECTION LIMIT',
        ),
        (
            "near_database_limit",
            f"database {server.database}",
            server.database_limit,
            [b for b in snap.backends if b.database == server.database],
            f'ALTER DATABASE "{server.database}" CONNECTION LIMIT',
        ),
    ):
        if not limit or 100.0 * len(members) / limit < t.warn_percent:
            continue
        severity = "critical" if len(members) >= limit else "warning"
        message = f"{what} holds {len(members)} connections of its limit {limit}"
        fix = f"find the holder below; or raise it: {sql} {max(limit * 2, limit + 10)};"
        pids = [b.pid for b in members if not b.is_self]
        findings.append(Finding(kind, severity, pids, message, fix))
    return findings


def _idle_in_transaction(snap: Snapshot, t: Thresholds) -> list[Finding]:
    found = [
        b
        for b in snap.others
        if b.state in ("idle in transaction", "idle in transaction (aborted)")
        and (b.state_age or 0.0) >= t.idle_in_transaction
    ]
    if not found:
        return []
    found.sort(key=lambda b: -(b.xact_age or 0.0))
    oldest = found[0]
    message = (
        f"{len(found)} backend(s) idle in transaction for more than "
        f"{fmt_age(t.idle_in_transaction)}; oldest pid {oldest.pid} ({_who(oldest)}) open "
        f"{fmt_age(oldest.xact_age)}, last query: {_short_query(oldest.query)!r}"
    )
    fix = (
        "commit or roll back in the code that opened it (the call site above); server-side "
        "guard: ALTER SYSTEM SET idle_in_transaction_session_timeout = '60s'; "
        "SELECT pg_reload_conf();"
    )
    return [Finding("idle_in_transaction", "warning", [b.pid for b in found], message, fix)]


def _long_idle(snap: Snapshot, t: Thresholds) -> list[Finding]:
    found = [b for b in snap.others if b.state == "idle" and (b.state_age or 0.0) >= t.idle]
    if not found:
        return []
    usable = snap.server.usable
    crowded = usable > 0 and 100.0 * snap.used / usable >= t.warn_percent
    owners = collections.Counter(_who(b) for b in found)
    top = ", ".join(f"{who} x{n}" for who, n in owners.most_common(3))
    oldest = max(b.state_age or 0.0 for b in found)
    message = (
        f"{len(found)} backend(s) idle for more than {fmt_age(t.idle)} (up to "
        f"{fmt_age(oldest)}): {top}"
    )
    fix = (
        "let pools close idle connections (SQLAlchemy pool_recycle / a smaller pool_size, "
        "psycopg_pool max_idle); server-side: ALTER SYSTEM SET idle_session_timeout = '1h' "
        "(PostgreSQL 14+); now: pgleak doctor --terminate --state idle "
        f"--older-than {int(t.idle)}s"
    )
    severity = "warning" if crowded else "info"
    return [Finding("long_idle", severity, [b.pid for b in found], message, fix)]


def _leak_signature(snap: Snapshot, t: Thresholds) -> list[Finding]:
    by_process: dict[tuple[str, str, int], list[Backend]] = collections.defaultdict(list)
    for b in snap.others:
        key = process_key(b)
        if key is not None:
            by_process[key].append(b)
    findings = []
    usable = max(1, snap.server.usable)
    for key, backends in by_process.items():
        count = len(backends)
        if count < t.hog_min:
            continue
        peers = [len(v) for k, v in by_process.items() if k != key]
        if peers:
            median = statistics.median(peers)
            if count < t.hog_factor * max(1.0, median):
                continue
            why = f"its {len(peers)} peer process(es) hold a median of {median:g}"
        elif count * 2 >= usable:
            why = f"that is {100 * count // usable}% of the usable connections"
        else:
            continue
        service, host, pid = key
        message = (
            f"one process, {service} pid {pid} on {host}, holds {count} backends; {why}: "
            "a leak signature"
        )
        fix = (
            f"read that process's pgleak leak.suspected reports; set PGLEAK_APP_NAME_CALL_SITE=1 "
            "so pg_stat_activity names the line; drain: pgleak doctor --terminate "
            f"--service {service} --state idle --dry-run"
        )
        findings.append(
            Finding("leak_signature", "warning", [b.pid for b in backends], message, fix)
        )
    return findings


def _no_timeouts(snap: Snapshot, t: Thresholds) -> list[Finding]:
    server = snap.server
    roles = {b.role for b in snap.others if b.role}
    missing = []
    for name in TIMEOUT_SETTINGS:
        value = server.timeouts.get(name)
        if value is None or value.strip() not in ("0", ""):
            continue  # unknown to this version, or set
        overrides = server.overrides.get(name, {})
        covered = {k.removeprefix("role ") for k, v in overrides.items() if v not in ("0", "")}
        if roles and roles <= covered:
            continue
        missing.append(name)
    if not missing:
        return []
    message = (
        f"no {', '.join(missing)} set: a forgotten transaction or session holds its slot forever"
    )
    fix = (
        "; ".join(f"ALTER SYSTEM SET {name} = {_SUGGESTED_TIMEOUT[name]}" for name in missing)
        + "; SELECT pg_reload_conf();  (or ALTER ROLE app SET ... for one application)"
    )
    return [Finding("no_timeouts", "info", [], message, fix)]


def _untagged(snap: Snapshot, t: Thresholds) -> list[Finding]:
    found = [b for b in snap.others if not b.application_name]
    if not found:
        return []
    clients = collections.Counter(b.client for b in found)
    where = ", ".join(f"{c} x{n}" for c, n in clients.most_common(3))
    message = f"{len(found)} backend(s) with no application_name, from {where}"
    fix = (
        "install pgleak in those services (pgleak.install(), which tags every connection), or "
        "set application_name in their DSN"
    )
    return [Finding("untagged_clients", "info", [b.pid for b in found], message, fix)]


def detect_pooler(snap: Snapshot) -> tuple[str, list[Backend]] | None:
    """A pooler in front of the server, as ``(what, its backends)``, or ``None``."""
    appended = [b for b in snap.others if b.pooled_client is not None]
    if appended:
        addrs = sorted({b.client for b in appended})
        return (f"a pooler at {', '.join(addrs)} (application_name_add_host)", appended)
    named = [b for b in snap.others if looks_like_pooler(b.application_name)]
    if named:
        names = sorted({b.application_name for b in named})
        return (f"a pooler named {', '.join(names)}", named)
    # One address carrying pgleak tags of several hosts: they come through one middleman.
    hosts: dict[str, set[str]] = collections.defaultdict(set)
    at: dict[str, list[Backend]] = collections.defaultdict(list)
    for b in snap.others:
        if b.client_addr and b.tag is not None and b.tag.host:
            hosts[b.client_addr].add(b.tag.host)
            at[b.client_addr].append(b)
    for addr, seen in hosts.items():
        if len(seen) >= 2:
            return (f"a pooler (or NAT) at {addr}: tags of {len(seen)} hosts", at[addr])
    return None


def _pooler(snap: Snapshot, t: Thresholds) -> list[Finding]:
    found = detect_pooler(snap)
    if found is None:
        return []
    what, backends = found
    message = (
        f"{what} holds {len(backends)} backend(s); their application_name is the last client's"
    )
    fix = (
        "for per-client detail ask the pooler (PgBouncer: SHOW CLIENTS on its admin console); "
        "size its pool, not the apps', against max_connections (pgleak capacity "
        "--pgbouncer-pool-size)"
    )
    return [Finding("pooler_in_front", "info", [b.pid for b in backends], message, fix)]


def _privilege(snap: Snapshot, t: Thresholds) -> list[Finding]:
    hidden = [b for b in snap.others if b.state is None]
    if not hidden or snap.server.sees_all:
        return []
    message = (
        f"the state and query of {len(hidden)} backend(s) of other roles are hidden from "
        f"role {snap.server.role}"
    )
    fix = f"run as a superuser, or GRANT pg_read_all_stats TO {snap.server.role};"
    return [Finding("insufficient_privilege", "info", [b.pid for b in hidden], message, fix)]


#: In the order findings of one severity are shown: what hurts most first.
_RULES: tuple[Callable[[Snapshot, Thresholds], list[Finding]], ...] = (
    _near_limit,
    _own_limits,
    _idle_in_transaction,
    _leak_signature,
    _long_idle,
    _no_timeouts,
    _untagged,
    _pooler,
    _privilege,
)


def evaluate(snap: Snapshot, thresholds: Thresholds | None = None) -> list[Finding]:
    """Every finding, worst first (by severity, then in the order of :data:`_RULES`)."""
    t = thresholds or Thresholds()
    findings = [f for rule in _RULES for f in rule(snap, t)]
    findings.sort(key=lambda f: SEVERITIES.index(f.severity))
    return findings
