"""A connection leaked inside a test, from any supported library, fails it and names the line."""

from __future__ import annotations

import json

import pytest

from tests.pytest_plugin.conftest import QUIET, site

LIBRARIES = """import asyncio
import os
import threading

import pytest
import sqlalchemy as sa

URL = os.environ["PGLEAK_INNER_URL"]
DSN = os.environ["PGLEAK_INNER_DSN"]
KEPT = []


@pytest.fixture(scope="session")
def engine():
    engine = sa.create_engine(URL.replace("postgresql://", "postgresql+psycopg://"))
    yield engine
    engine.dispose()


@pytest.fixture(scope="session")
def held(engine):
    with engine.connect() as conn:  # a session's connection, set up inside a test's set-up
        yield conn


@pytest.fixture(scope="module")
def ppool():
    from psycopg_pool import ConnectionPool

    with ConnectionPool(DSN, min_size=1, max_size=2) as pool:
        yield pool


@pytest.fixture
def tidy(engine):
    with engine.connect() as conn:
        yield conn


@pytest.fixture
def sloppy(engine):
    yield engine.connect()  # LEAK-FIXTURE


def test_clean(engine, tidy):
    tidy.execute(sa.text("select 1"))
    with engine.connect() as conn:
        conn.execute(sa.text("select 1"))


def test_session_fixture_holds(held):
    held.execute(sa.text("select 1"))


def test_sqlalchemy_dropped(engine):
    conn = engine.connect()  # LEAK-SA
    conn.execute(sa.text("select 1"))


def test_sqlalchemy_kept(engine):
    KEPT.append(engine.connect())  # LEAK-SA-KEPT


def test_loop(engine):
    for _ in range(6):
        KEPT.append(engine.connect())  # LEAK-LOOP


def test_leaky_fixture(sloppy):
    sloppy.execute(sa.text("select 1"))


def test_thread(engine):
    worker = threading.Thread(target=lambda: KEPT.append(engine.connect()))  # LEAK-THREAD
    worker.start()
    worker.join()


def test_sqlalchemy_async():
    from sqlalchemy.ext.asyncio import create_async_engine

    async def main():
        engine = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"))
        conn = await engine.connect()  # LEAK-SA-ASYNC
        await conn.execute(sa.text("select 1"))
        await engine.dispose()

    asyncio.run(main())


def test_psycopg_pool_dropped(ppool):
    ppool.getconn()  # LEAK-PP


def test_psycopg_pool_async():
    from psycopg_pool import AsyncConnectionPool

    async def main():
        pool = AsyncConnectionPool(DSN, min_size=1, max_size=2, open=False)
        await pool.open()
        await pool.getconn()  # LEAK-PP-ASYNC
        await pool.close(timeout=0)

    asyncio.run(main())


def test_psycopg2():
    from psycopg2.pool import SimpleConnectionPool

    pool = SimpleConnectionPool(1, 2, DSN)
    KEPT.append(pool)
    pool.getconn()  # LEAK-P2


def test_asyncpg():
    import asyncpg

    async def main():
        pool = await asyncpg.create_pool(URL, min_size=1, max_size=2)
        await pool.acquire()  # LEAK-ASYNCPG
        pool.terminate()

    asyncio.run(main())


@pytest.mark.pgleak_allow(reason="kept on purpose")
def test_allowed(engine, pgleak_events):
    conn = engine.connect()  # ALLOWED
    del conn
    (event,) = pgleak_events.wait_for("leak.collected")
    assert event.checkout.site.endswith("ALLOWED_SITE")
"""

#: (inner test, its tagged checkout line, the event it fails with).
LEAKS = [
    ("test_sqlalchemy_dropped", "LEAK-SA", "leak.collected"),
    ("test_sqlalchemy_kept", "LEAK-SA-KEPT", "leak.at_exit"),
    ("test_loop", "LEAK-LOOP", "leak.at_exit"),
    ("test_leaky_fixture", "LEAK-FIXTURE", "leak.at_exit"),
    ("test_thread", "LEAK-THREAD", "leak.at_exit"),
    ("test_sqlalchemy_async", "LEAK-SA-ASYNC", "leak.at_exit"),
    ("test_psycopg_pool_dropped", "LEAK-PP", "leak.collected"),
    ("test_psycopg_pool_async", "LEAK-PP-ASYNC", "leak.collected"),
    ("test_psycopg2", "LEAK-P2", "leak.at_exit"),
    ("test_asyncpg", "LEAK-ASYNCPG", "leak.at_exit"),
]


def test_each_library_leaking_fails_its_test_at_teardown(inner: pytest.Pytester) -> None:
    source = LIBRARIES.replace("ALLOWED_SITE", site(LIBRARIES, "ALLOWED", "test_libs.py"))
    inner.makepyfile(test_libs=source)
    result = inner.runpytest_subprocess("--pgleak", "--pgleak-report=out/leaks.json", *QUIET)
    result.assert_outcomes(passed=13, errors=len(LEAKS))
    out = result.stdout.str()
    for test, tag, event in LEAKS:
        where = site(source, tag, "test_libs.py", "<lambda>" if tag == "LEAK-THREAD" else None)
        result.stdout.fnmatch_lines([f"ERROR test_libs.py::{test} - Failed: pgleak: *"])
        result.stdout.fnmatch_lines([f"{event}: *checked out at *{where} *"])
        result.stdout.fnmatch_lines([f"test_libs.py::{test}: {event} at *{where}*"])
    result.stdout.fnmatch_lines(
        ["test_libs.py::test_allowed: 1 leak(s) allowed by pgleak_allow: kept on purpose"]
    )
    result.stdout.fnmatch_lines(["pgleak: test_libs.py::test_loop leaked 6 connection(s):"])
    result.stdout.fnmatch_lines(["... and 1 more (--pgleak-report has them all)"])
    result.stdout.fnmatch_lines(["test_libs.py::test_loop: leak.at_exit at *(6 times)"])
    for clean in ("test_clean", "test_session_fixture_holds", "test_allowed"):
        assert f"ERROR test_libs.py::{clean} " not in out
    report = json.loads((inner.path / "out" / "leaks.json").read_text())
    assert report["leaking_tests"] == len(LEAKS)
    assert [test["nodeid"] for test in report["tests"]] == [
        f"test_libs.py::{t}" for t, _, _ in LEAKS
    ]
    [allowed] = report["allowed"]
    assert (allowed["nodeid"], allowed["reason"]) == (
        "test_libs.py::test_allowed",
        "kept on purpose",
    )
    assert [e["event"] for e in allowed["events"]] == ["leak.collected"]
    sa_events = report["tests"][0]["events"]
    assert [e["event"] for e in sa_events] == ["leak.collected"]
    assert sa_events[0]["stack"][-1].endswith(site(source, "LEAK-SA", "test_libs.py"))
