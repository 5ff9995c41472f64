"""``pgleak doctor``: a full server diagnosed from ``pg_stat_activity``, joined with pgleak's tags.

Three layers, each usable without the CLI: :mod:`~pgleak.doctor.queries` (read-only SQL, one
snapshot), :mod:`~pgleak.doctor.rules` (findings with a fix each) and
:mod:`~pgleak.doctor.render` (JSON and tables). :func:`diagnose` runs all three.
"""

from __future__ import annotations

from typing import Any

from pgleak.doctor.connect import DoctorError, connect, resolve_dsn
from pgleak.doctor.queries import Snapshot, take_snapshot
from pgleak.doctor.render import report, to_human, to_json
from pgleak.doctor.rules import Finding, Thresholds, evaluate

__all__ = [
    "DoctorError",
    "Finding",
    "Snapshot",
    "Thresholds",
    "connect",
    "diagnose",
    "evaluate",
    "report",
    "resolve_dsn",
    "take_snapshot",
    "to_human",
    "to_json",
]


def diagnose(conn: Any, thresholds: Thresholds | None = None) -> dict[str, Any]:
    """The doctor's report (as :func:`~pgleak.doctor.render.report`) for an open connection."""
    snap = take_snapshot(conn)
    return report(snap, evaluate(snap, thresholds))
