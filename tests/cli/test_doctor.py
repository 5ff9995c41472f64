"""``pgleak doctor`` against the suite's real server, with real clients in every state.

One scene for the module: two pgleak-tagged processes (``orders`` with 2 backends, one of them
idle in a transaction, and ``orders`` again with 9: the leak signature), a backend in
``pg_sleep``, an untagged client, a transaction aborted by an error. Thresholds of 0 stand in
for minutes of waiting.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from pgleak.cli import main
from tests.cli.clients import ROOT, Holder, doctor, holders, sleeper, wait_gone
from tests.conftest import Server

NOW = ("--idle-in-transaction-older-than", "0", "--idle-older-than", "0")


class Scene:
    def __init__(
        self, small: Holder, big: Holder, sleeping: int, untagged: Any, aborted: Any
    ) -> None:
        self.small = small
        self.big = big
        self.sleeping = sleeping
        self.untagged = untagged
        self.aborted = aborted


@pytest.fixture(scope="module")
def scene(pg: Server) -> Iterator[Scene]:
    with (
        holders(pg.dsn, ("orders", 2, True), ("orders", 9, False)) as (small, big),
        sleeper(pg.dsn) as sleeping,
        psycopg.connect(pg.dsn, autocommit=True) as untagged,
        psycopg.connect(pg.dsn, application_name="failed-import") as aborted,
    ):
        with pytest.raises(psycopg.errors.DivisionByZero):
            aborted.execute("select 1/0")  # the transaction stays open, aborted
        yield Scene(small, big, sleeping, untagged, aborted)


def _json(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any]]:
    code = main(["doctor", *args, "--json"])
    return code, json.loads(capsys.readouterr().out)


def _row(data: dict[str, Any], holder: Holder) -> dict[str, Any]:
    [row] = [r for r in data["by_application"] if r["pid"] == holder.proc.pid]
    return dict(row)


def _finding(data: dict[str, Any], kind: str) -> dict[str, Any]:
    [found] = [f for f in data["findings"] if f["kind"] == kind]
    return dict(found)


def test_json_attributes_every_backend_and_finds_each_problem(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = _json(capsys, pg.dsn, *NOW)
    assert code == 1
    server = data["server"]
    assert {"version", "max_connections", "reserved", "used", "available"} <= set(server)
    assert server["max_connections"] == pg.max_connections
    assert server["used"] >= 2 + 9 + 1 + 1 + 1 + 1  # the scene, and the doctor itself
    assert server["used"] == sum(data["by_state"].values())
    assert server["available"] == server["max_connections"] - server["reserved"] - server["used"]
    assert data["by_state"]["idle in transaction"] >= 1
    assert next(iter(data["by_state"])) == "idle in transaction (aborted)"  # worst first
    assert data["by_state"]["active"] >= 2  # pg_sleep and the doctor's own query
    host = socket.gethostname().split(".")[0]
    small, big = _row(data, scene.small), _row(data, scene.big)
    assert (small["service"], small["host"], small["count"]) == ("orders", host[:63], 2)
    assert small["states"] == {"idle in transaction": 1, "idle": 1}
    assert small["call_site"] is None
    assert (big["count"], big["states"], sorted(big["backend_pids"])) == (
        9,
        {"idle": 9},
        sorted(scene.big.backend_pids),
    )
    untagged = [r for r in data["by_application"] if r["application_name"] == ""]
    assert untagged
    assert untagged[0]["service"] is None
    assert untagged[0]["pid"] is None
    sleeping = [r for r in data["by_application"] if r["application_name"] == "report-runner"]
    assert sleeping[0]["states"] == {"active": 1}
    assert sleeping[0]["service"] is None

    in_txn = _finding(data, "idle_in_transaction")
    assert in_txn["severity"] == "warning"
    assert scene.small.backend_pids[0] in in_txn["pids"]
    assert scene.aborted.info.backend_pid in in_txn["pids"]
    assert "select pg_backend_pid()" in in_txn["message"]
    assert "idle_in_transaction_session_timeout" in in_txn["fix"]
    leak = _finding(data, "leak_signature")
    assert sorted(leak["pids"]) == sorted(scene.big.backend_pids)
    assert f"pid {scene.big.proc.pid}" in leak["message"]
    assert "--service orders" in leak["fix"]
    idle = _finding(data, "long_idle")
    assert set(scene.big.backend_pids) <= set(idle["pids"])
    assert scene.untagged.info.backend_pid in _finding(data, "untagged_clients")["pids"]
    assert "idle_in_transaction_session_timeout" in _finding(data, "no_timeouts")["message"]
    for finding in data["findings"]:
        assert set(finding) == {"kind", "severity", "pids", "message", "fix"}
        assert server["doctor_pid"] not in finding["pids"]
    severities = [f["severity"] for f in data["findings"]]
    assert severities == sorted(severities, key=["critical", "warning", "info"].index)


def test_default_thresholds_do_not_flag_young_idle_connections(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    code, data = _json(capsys, pg.dsn)
    kinds = {f["kind"] for f in data["findings"]}
    assert "idle_in_transaction" not in kinds
    assert "long_idle" not in kinds
    assert code == 1  # the leak signature is a warning whatever the age


def test_human_output_is_tables_worst_first_without_colour_off_a_terminal(
    pg: Server, scene: Scene
) -> None:
    result = doctor("doctor", pg.dsn, *NOW)
    assert result.code == 1, result.err
    out = result.out
    assert "\x1b[" not in out
    assert out.startswith("pgleak doctor: PostgreSQL ")
    assert f"max_connections={pg.max_connections}" in out
    warnings = out.index("WARNING  idle_in_transaction")
    assert warnings < out.index("WARNING  leak_signature") < out.index("INFO ")
    table = out[out.index("BY APPLICATION") :]
    lines = table.splitlines()
    big = [line for line in lines if f" {scene.big.proc.pid} " in line]
    assert big
    assert big[0].split()[:2] == ["9", "orders"]
    # A transaction left open is listed before the larger idle group.
    small = next(n for n, line in enumerate(lines) if f" {scene.small.proc.pid} " in line)
    assert small < lines.index(big[0])
    for section in ("BY STATE", "BY ROLE", "BY DATABASE", "BY CLIENT ADDRESS"):
        assert section in out


def test_colour_on_a_terminal_unless_no_color(pg: Server, scene: Scene) -> None:
    def on_a_tty(extra_env: dict[str, str]) -> str:
        primary, secondary = os.openpty()
        env = {k: v for k, v in os.environ.items() if k != "NO_COLOR"} | extra_env
        proc = subprocess.Popen(
            [sys.executable, "-m", "pgleak", "doctor", pg.dsn],
            stdout=secondary,
            stderr=subprocess.DEVNULL,
            cwd=ROOT,
            env=env,
        )
        os.close(secondary)
        chunks = []
        while True:
            try:
                chunk = os.read(primary, 65536)
            except OSError:  # EIO: the child closed the terminal
                break
            if not chunk:
                break
            chunks.append(chunk)
        proc.wait(30)
        os.close(primary)
        return b"".join(chunks).decode()

    assert "\x1b[33mWARNING" in on_a_tty({})
    assert "\x1b[" not in on_a_tty({"NO_COLOR": "1"})


def test_watch_refreshes_count_times(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["doctor", pg.dsn, "--json", "--watch", "0.01", "--count", "2"])
    lines = capsys.readouterr().out.strip().splitlines()
    assert code == 1
    assert len(lines) == 2
    assert all(json.loads(line)["server"]["used"] > 0 for line in lines)


def test_terminate_dry_run_lists_the_matches_and_ends_nothing(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(
        ["doctor", pg.dsn, "--terminate", "--dry-run", "--service", "orders", "--state", "idle"]
    )
    out = capsys.readouterr().out
    assert code == 0
    expected = set(scene.big.backend_pids) | {scene.small.backend_pids[1]}
    assert {int(line.split()[3].rstrip(":")) for line in out.splitlines()[:-1]} == expected
    assert "10 backend(s) match" in out
    with psycopg.connect(pg.dsn, autocommit=True) as conn:
        rows = conn.execute(
            "select count(*) from pg_stat_activity where pid = any(%s)", (list(expected),)
        ).fetchone()
    assert rows == (10,)
    filters = ["--terminate", "--dry-run", "--service", "orders", "--state", "idle"]
    code, young = _json(capsys, pg.dsn, *filters, "--older-than", "1h")
    assert code == 0
    assert young["matched"] == []
    assert young["terminated"] == []


def test_terminate_needs_a_filter_and_never_ends_the_doctor(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", pg.dsn, "--terminate"]) == 2
    assert "needs at least one filter" in capsys.readouterr().err
    code, data = _json(capsys, pg.dsn, "--terminate", "--dry-run", "--application", "pgleak-doctor")
    assert code == 0
    assert data["matched"] == []


def test_terminate_ends_exactly_the_matching_backends(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    victims = [psycopg.connect(pg.dsn, application_name="batch-import") for _ in range(2)]
    spared = psycopg.connect(pg.dsn, application_name="batch-import", autocommit=True)
    victims[0].execute("select 1")  # left idle in a transaction
    victims[1].execute("select 1")
    victims[1].commit()  # idle
    try:
        result = doctor(
            "doctor", pg.dsn, "--terminate", "--application", "batch-*",
            "--pid", str(victims[0].info.backend_pid), "--pid", str(victims[1].info.backend_pid),
        )  # fmt: skip
        assert result.code == 0, result.err
        for victim in victims:
            assert f"terminated pid {victim.info.backend_pid}:" in result.out
            assert wait_gone(pg.dsn, victim.info.backend_pid)
        assert "idle in transaction" in result.out
        assert str(spared.info.backend_pid) not in result.out
        spared.execute("select 1")  # still alive
    finally:
        for conn in [*victims, spared]:
            conn.close()


def test_terminate_keeps_to_its_database_unless_asked(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(pg.dsn, autocommit=True) as admin:
        exists = admin.execute("select 1 from pg_database where datname = 'doctor_other'")
        if exists.fetchone() is None:
            admin.execute("create database doctor_other")
    other_dsn = pg.dsn.replace(f"dbname={pg.dbname}", "dbname=doctor_other")
    with psycopg.connect(other_dsn, application_name="elsewhere", autocommit=True) as other:
        pid = other.info.backend_pid
        _, here = _json(capsys, pg.dsn, "--terminate", "--application", "elsewhere")
        assert here["matched"] == []
        assert here["terminated"] == []
        args = ("--terminate", "--dry-run", "--application", "elsewhere", "--all-databases")
        _, everywhere = _json(capsys, pg.dsn, *args)
        assert [m["pid"] for m in everywhere["matched"]] == [pid]
        assert everywhere["matched"][0]["database"] == "doctor_other"
        other.execute("select 1")  # the dry run ended nothing


def test_watch_redraws_the_tables(
    pg: Server, scene: Scene, capsys: pytest.CaptureFixture[str]
) -> None:
    code = main(["doctor", pg.dsn, "--watch", "0.01", "--count", "2"])
    out = capsys.readouterr().out
    assert code == 1
    assert out.count("pgleak doctor: PostgreSQL") == 2
    assert out.count("every 0.01s (Ctrl-C to stop)") == 2
