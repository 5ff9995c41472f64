"""``pgleak summary LOG``: the leaks by call site from a real process's JSON log, worst first."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from pgleak.cli import main
from tests.conftest import Server

#: A JSON formatter as applications configure one: the record's pgleak fields under "pgleak".
APP = """\
    import json, logging, sys

    class JSON(logging.Formatter):
        def format(self, record):
            return json.dumps({{"level": record.levelname, "message": record.getMessage(),
                                "pgleak": getattr(record, "pgleak", None)}})

    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(JSON())
    logging.getLogger().addHandler(handler)
    logging.getLogger().setLevel(logging.INFO)
    print("not json: the app's own output")

    import gc, pgleak
    pgleak.install(leak_threshold=60, summary_interval={interval})
    from psycopg_pool import ConnectionPool

    pool = ConnectionPool({dsn!r}, min_size=0, max_size=4)
    for _ in range(2):
        pool.getconn()  # TWICE
    gc.collect()
    kept = pool.getconn()  # ONCE
"""


def _log(pg: Server, tmp_path: Path, interval: float = 900) -> tuple[Path, Path]:
    app = tmp_path / "app.py"
    app.write_text(textwrap.dedent(APP.format(dsn=pg.dsn, interval=interval)))
    log = tmp_path / "app.log"
    with log.open("w") as out:
        subprocess.run([sys.executable, str(app)], stdout=out, timeout=60, check=True)
    return app, log


def _line(app: Path, marker: str) -> str:
    [n] = [i for i, t in enumerate(app.read_text().splitlines(), 1) if t.endswith(f"# {marker}")]
    return f"{app}:{n} in <module>"


def test_the_newest_summary_worst_first(
    pg: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app, log = _log(pg, tmp_path)
    assert main(["summary", str(log)]) == 1  # leaks found
    out = capsys.readouterr().out.splitlines()
    assert out[0].split() == ["leaks", "held,", "in", "all", "longest", "site", "(pool):", "counts"]
    assert _line(app, "TWICE") in out[1]
    assert "2 leak.collected" in out[1]
    assert _line(app, "ONCE") in out[2]
    assert "1 leak.at_exit" in out[2]
    assert main(["summary", "--json", str(log)]) == 1
    sites = json.loads(capsys.readouterr().out)
    assert [site["leaks"] for site in sites] == [2, 1]


def test_a_log_without_a_summary_record_is_summarised_from_its_reports(
    pg: Server, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app, log = _log(pg, tmp_path)
    lines = [line for line in log.read_text().splitlines() if '"leak.summary"' not in line]
    stripped = tmp_path / "reports-only.log"
    stripped.write_text("\n".join(lines) + "\n")
    assert main(["summary", "--json", str(stripped)]) == 1
    sites = json.loads(capsys.readouterr().out)
    assert sites[0]["site"] == _line(app, "TWICE")
    assert sites[0]["counts"] == {"leak.collected": 2}
    assert sites[1]["counts"] == {"leak.at_exit": 1}


def test_stdin_a_clean_log_and_a_missing_file(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO('{"message": "hello"}\nplain text\n'))
    assert main(["summary", "-"]) == 0
    assert "no leaks reported in this log" in capsys.readouterr().out
    assert main(["summary", str(tmp_path / "missing.log")]) == 2
    err = capsys.readouterr().err
    assert err.strip() == f"pgleak summary: No such file or directory: {tmp_path / 'missing.log'}"
