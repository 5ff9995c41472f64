"""``pgleak capacity``: the pool arithmetic as a deploy gate (0 fits, 1 does not, 2 bad input)."""

from __future__ import annotations

import pytest

from pgleak.cli import main
from tests.cli.clients import doctor
from tests.conftest import Server


def _run(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(["capacity", *args])
    return code, capsys.readouterr().out


def test_pools_that_fit_exit_0_and_show_the_arithmetic(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(
        capsys, "--pool-size", "5", "--max-overflow", "2", "--processes-per-instance", "4",
        "--instances", "2", "--max-connections", "100",
    )  # fmt: skip
    assert code == 0
    assert "pool_size 5 + max_overflow 2 = 7" in out
    assert "7 x 4 processes per instance x 2 instances = 56 connections" in out
    assert "0.8 x (max_connections 100 - reserved 3) = 77 connections" in out
    assert "56 <= 77: fits" in out
    assert "at most 9 per process" in out  # 77 // 8
    assert "note:" not in out


def test_pools_that_do_not_fit_exit_1_with_a_suggestion_and_the_pgbouncer_note(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(
        capsys, "--pool-size", "10", "--max-overflow", "5", "--processes-per-instance", "4",
        "--instances", "6", "--max-connections", "100",
    )  # fmt: skip
    assert code == 1
    assert "360 > 77: DOES NOT FIT (over by 283)" in out
    assert "at most 3 per process (pool_size 2, max_overflow 1): 3 x 24 = 72 <= 77" in out
    assert "--pgbouncer-pool-size" in out


def test_behind_pgbouncer_the_server_sees_only_its_pool(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, out = _run(
        capsys, "--pool-size", "10", "--max-overflow", "5", "--processes-per-instance", "4",
        "--instances", "6", "--max-connections", "100", "--pgbouncer-pool-size", "20",
        "--pgbouncer-instances", "2",
    )  # fmt: skip
    assert code == 0
    assert "20 x 2 PgBouncer = 40" in out
    assert "max_client_conn >= 360" in out
    assert "40 <= 77: fits" in out


def test_not_one_connection_per_process_fits(capsys: pytest.CaptureFixture[str]) -> None:
    code, out = _run(
        capsys, "--pool-size", "1", "--instances", "50", "--max-connections", "20",
        "--reserved", "0", "--headroom", "1",
    )  # fmt: skip
    assert code == 1
    assert "not even 1 connection per process" in out


def test_reads_max_connections_from_the_server(pg: Server) -> None:
    result = doctor("capacity", "--pool-size", "5", "--instances", "2", "--dsn", pg.dsn)
    assert result.code == 0, result.err
    assert f"(max_connections {pg.max_connections} - reserved 0)" in result.out
    refused = doctor("capacity", "--pool-size", "5", "--dsn", "host=127.0.0.1 port=1")
    assert refused.code == 2
    assert "cannot connect" in refused.err
