"""``pgleak demo`` runs end to end and its reports name the demo app's leaking line."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pgleak_demo.shop


def _leaking_line() -> str:
    path = Path(pgleak_demo.shop.__file__)
    lines = path.read_text().splitlines()
    [number] = [n for n, text in enumerate(lines, 1) if text.endswith("# <- the leaking line")]
    return f"{path}:{number} in order_history"


def test_demo_exits_zero_within_a_minute_and_names_the_leaking_line() -> None:
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, "-m", "pgleak", "demo"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    elapsed = time.monotonic() - started
    assert result.returncode == 0, result.stdout + result.stderr
    out = result.stdout
    site = _leaking_line()
    for event in (
        "leak.suspected",
        "leak.returned",
        "leak.collected",
        "pool.exhausted",
        "leak.at_exit",
        "report.suppressed",
    ):
        assert event in out, f"{event} missing from the demo's output"
    exhausted = out[out.index("pool.exhausted") : out.index("the request failed")]
    assert exhausted.count(f"checked out at {site}") == 5
    doctor = out[out.index("pgleak doctor: PostgreSQL") : out.index("=== Shutting down")]
    before = out[: out.index("=== The DBA's view")].rstrip().splitlines()
    assert before[-2].endswith(site)
    # The demo process holds its pool's backends: one line, its pgleak tag parsed back.
    table = doctor[doctor.index("BY APPLICATION") : doctor.index("BY STATE")]
    [row] = [line.split() for line in table.splitlines() if line.split()[1:2] == ["pgleak"]]
    assert int(row[0]) >= 1
    assert row[3].isdigit()
    assert row[-1] == f"pgleak@{row[2]}:{row[3]}"
    assert "max_connections=8" in doctor
    # What the demo announces matches what is printed when: the count of the repeated
    # reports is promised for shutdown, and only appears after the shutdown header.
    [announce] = [line for line in out.splitlines() if line.startswith("(the same line leaked")]
    assert "report.suppressed" in announce
    assert announce.endswith("here at shutdown)")
    shutdown = out.index("=== Shutting down")
    assert "report.suppressed" in out[shutdown : out.index("\n", shutdown)]
    assert "report.suppressed: " not in out[:shutdown]
    assert "report.suppressed: " in out[shutdown:]
    assert elapsed < 60
