"""Switching the plugin on: off by default, `--pgleak`, the ini key, the threshold; and xdist."""

from __future__ import annotations

import json

import pytest

from tests.pytest_plugin.conftest import QUIET, site

SUITE = """import os
import time

import pytest
import sqlalchemy as sa

URL = os.environ["PGLEAK_INNER_URL"].replace("postgresql://", "postgresql+psycopg://")
KEPT = []


@pytest.fixture(scope="module")
def engine():
    engine = sa.create_engine(URL)
    yield engine
    engine.dispose()


def test_leaks(engine):
    KEPT.append(engine.connect())  # LEAK


def test_holds_long(engine):
    with engine.connect() as conn:  # SLOW
        time.sleep(0.6)  # the behaviour under test: a hold past --pgleak-threshold
        conn.execute(sa.text("select 1"))


def test_clean(engine):
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))


@pytest.mark.pgleak_allow
def test_events_fixture(pgleak_events):
    engine = sa.create_engine(URL)
    conn = engine.connect()  # DROPPED
    del conn
    (event,) = pgleak_events.wait_for("leak.collected")
    assert event.checkout.site.endswith("DROPPED_SITE")
    engine.dispose()
"""


# The line and function, whatever the file is called.
SUITE = SUITE.replace("DROPPED_SITE", site(SUITE, "DROPPED", "").lstrip())


def test_off_by_default_on_with_the_ini_key_and_the_threshold(inner: pytest.Pytester) -> None:
    """Off, ``pgleak_events`` still works: pgleak is installed for that one test."""
    inner.makepyfile(test_suite=SUITE)
    leak = site(SUITE, "LEAK", "test_suite.py")
    slow = site(SUITE, "SLOW", "test_suite.py")

    off = inner.runpytest_subprocess(*QUIET)
    off.assert_outcomes(passed=4)
    assert "pgleak:" not in off.stdout.str()

    inner.makeini("[pytest]\npgleak = true\n")
    on = inner.runpytest_subprocess(*QUIET)
    on.assert_outcomes(passed=4, errors=1)
    on.stdout.fnmatch_lines(
        [
            "*pgleak: 1 test(s) leaked connections*",
            f"test_suite.py::test_leaks: leak.at_exit at *{leak}",
            "ERROR test_suite.py::test_leaks - Failed: pgleak: *",
        ]
    )

    timed = inner.runpytest_subprocess("--pgleak-threshold=0.2", *QUIET)
    timed.assert_outcomes(passed=4, errors=2)
    timed.stdout.fnmatch_lines(
        [
            f"test_suite.py::test_holds_long: leak.suspected at *{slow}",
            "ERROR test_suite.py::test_holds_long - Failed: pgleak: *",
        ]
    )
    timed.stdout.fnmatch_lines([f"leak.suspected: connection held *checked out at *{slow} *"])


def test_xdist_workers_report_to_the_controller(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_one=SUITE.replace("time.sleep(0.6)", "pass"), test_two=SUITE)
    result = inner.runpytest_subprocess("-n", "2", "--pgleak", "--pgleak-report=leaks.json", *QUIET)
    result.assert_outcomes(passed=8, errors=2)
    result.stdout.fnmatch_lines_random(
        [
            "*pgleak: 2 test(s) leaked connections*",
            "test_one.py::test_leaks: leak.at_exit at *test_one.py:*",
            "test_two.py::test_leaks: leak.at_exit at *test_two.py:*",
        ]
    )
    report = json.loads((inner.path / "leaks.json").read_text())
    assert sorted(test["nodeid"] for test in report["tests"]) == [
        "test_one.py::test_leaks",
        "test_two.py::test_leaks",
    ]
    assert report["leaks"] == 2


def test_bad_settings_are_usage_errors(
    inner: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    inner.makepyfile(test_nothing="def test_nothing():\n    pass\n")
    zero = inner.runpytest_subprocess("--pgleak-threshold=0", *QUIET)
    assert zero.ret == pytest.ExitCode.USAGE_ERROR
    zero.stderr.fnmatch_lines(["*--pgleak-threshold: expected seconds > 0, got 0.0*"])
    monkeypatch.setenv("PGLEAK_LEAK_THRESHOLD", "soon")
    env = inner.runpytest_subprocess("--pgleak", *QUIET)
    assert env.ret == pytest.ExitCode.USAGE_ERROR
    env.stderr.fnmatch_lines(["*pgleak: *PGLEAK_LEAK_THRESHOLD*"])
