"""``--terminate``: the emergency drain, only of backends the caller named.

Targets are chosen from the snapshot by explicit filters, never by default; the doctor's own
backend and (unless asked) other databases are never among them. The server is then asked to
end exactly those, by pid *and* backend start time as bound parameters, so a pid the server has
since given to a new connection is left alone.
"""

from __future__ import annotations

import dataclasses
import fnmatch
from typing import Any

from pgleak.doctor.queries import Backend, Snapshot

__all__ = ["Filters", "select", "terminate"]

_TERMINATE_SQL = """
SELECT t.pid, pg_catalog.pg_terminate_backend(t.pid)
FROM unnest(%s::int[], %s::timestamptz[]) AS t(pid, started)
JOIN pg_catalog.pg_stat_activity a ON a.pid = t.pid AND a.backend_start = t.started
WHERE t.pid <> pg_catalog.pg_backend_pid() AND a.backend_type = 'client backend'
"""


@dataclasses.dataclass(frozen=True)
class Filters:
    """What to end; every given filter must match (they combine with AND)."""

    states: tuple[str, ...] = ()
    older_than: float | None = None
    applications: tuple[str, ...] = ()
    services: tuple[str, ...] = ()
    pids: tuple[int, ...] = ()
    roles: tuple[str, ...] = ()
    all_databases: bool = False

    @property
    def empty(self) -> bool:
        return not (
            self.states
            or self.older_than is not None
            or self.applications
            or self.services
            or self.pids
            or self.roles
        )

    def matches(self, b: Backend, database: str) -> bool:
        """Whether ``b`` is to go: every filter given matches, and it is not the doctor's."""
        if b.is_self or (not self.all_databases and b.database != database):
            return False
        age = b.state_age
        return (
            (not self.states or b.state in self.states)
            and (self.older_than is None or (age is not None and age >= self.older_than))
            and (
                not self.applications
                or any(fnmatch.fnmatchcase(b.application_name, p) for p in self.applications)
            )
            and (not self.services or (b.tag is not None and b.tag.service in self.services))
            and (not self.pids or b.pid in self.pids)
            and (not self.roles or b.role in self.roles)
        )


def select(snap: Snapshot, filters: Filters) -> list[Backend]:
    """The backends ``filters`` name, oldest state first."""
    chosen = [b for b in snap.backends if filters.matches(b, snap.server.database)]
    chosen.sort(key=lambda b: -(b.state_age or 0.0))
    return chosen


def terminate(conn: Any, targets: list[Backend]) -> tuple[list[int], list[int]]:
    """End ``targets``; returns (ended pids, pids the server did not end)."""
    if not targets:
        return [], []
    pids = [b.pid for b in targets]
    starts = [b.backend_start for b in targets]
    rows = conn.execute(_TERMINATE_SQL, (pids, starts)).fetchall()
    ended = sorted(pid for pid, ok in rows if ok)
    return ended, sorted(set(pids) - set(ended))
