"""The plugin under the test frameworks applications use: pytest-asyncio, anyio, pytest-django."""

from __future__ import annotations

import pytest

from tests.pytest_plugin.conftest import site

#: As QUIET, with pytest-asyncio and anyio on (anyio's plugin is always loaded).
ASYNC_ARGS = ("-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:django")

ASYNC_SUITE = """import os

import asyncpg
import pytest
import pytest_asyncio
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import create_async_engine

URL = os.environ["PGLEAK_INNER_URL"]
KEPT = []


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def pool():
    pool = await asyncpg.create_pool(URL, min_size=1, max_size=4)
    yield pool
    pool.terminate()


@pytest_asyncio.fixture(scope="session", loop_scope="session")
async def held(pool):
    async with pool.acquire() as conn:  # the session's: not any test's
        yield conn


@pytest.mark.asyncio(loop_scope="session")
async def test_clean(pool, held):
    assert await held.fetchval("select 1") == 1
    async with pool.acquire() as conn:
        assert await conn.fetchval("select 2") == 2
    assert await pool.fetchval("select 3") == 3


@pytest.mark.asyncio(loop_scope="session")
async def test_leaks(pool):
    KEPT.append(await pool.acquire())  # LEAK-ASYNCIO


@pytest.fixture
def anyio_backend():
    return "asyncio"


@pytest.mark.anyio
async def test_anyio_clean():
    engine = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"))
    async with engine.connect() as conn:
        await conn.execute(sa.text("select 1"))
    await engine.dispose()


@pytest.mark.anyio
async def test_anyio_leaks():
    engine = create_async_engine(URL.replace("postgresql://", "postgresql+asyncpg://"))
    conn = await engine.connect()  # LEAK-ANYIO
    await conn.execute(sa.text("select 1"))
    KEPT.append(conn)
"""


def test_pytest_asyncio_and_anyio_tests(inner: pytest.Pytester) -> None:
    inner.makepyfile(test_async=ASYNC_SUITE)
    inner.makeini("[pytest]\nasyncio_default_fixture_loop_scope = function\n")
    result = inner.runpytest_subprocess("--pgleak", *ASYNC_ARGS)
    result.assert_outcomes(passed=4, errors=2)
    asyncio_site = site(ASYNC_SUITE, "LEAK-ASYNCIO", "test_async.py")
    anyio_site = site(ASYNC_SUITE, "LEAK-ANYIO", "test_async.py")
    result.stdout.fnmatch_lines_random(
        [
            f"test_async.py::test_leaks: leak.at_exit at *{asyncio_site}",
            f"test_async.py::test_anyio_leaks*: leak.at_exit at *{anyio_site}",
            "ERROR test_async.py::test_leaks - Failed: pgleak: *",
            "ERROR test_async.py::test_anyio_leaks* - Failed: pgleak: *",
        ]
    )


DJANGO_SETTINGS = """import os

SECRET_KEY = "pgleak-plugin-tests"
USE_TZ = True
INSTALLED_APPS = []
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "HOST": os.environ["PGLEAK_INNER_HOST"],
        "PORT": os.environ["PGLEAK_INNER_PORT"],
        "USER": os.environ["PGLEAK_INNER_USER"],
        "NAME": os.environ["PGLEAK_INNER_DBNAME"],
        "TEST": {"NAME": f"test_pgleak_plugin_{os.getpid()}"},
    }
}
"""

DJANGO_SUITE = """import threading

import pytest
from django.db import connection
from django.test import TestCase, TransactionTestCase


def query():
    with connection.cursor() as cursor:  # QUERY
        cursor.execute("select 1")
        return cursor.fetchone()[0]


@pytest.fixture(scope="session")
def seeded(django_db_setup, django_db_blocker):
    with django_db_blocker.unblock():
        assert query() == 1


def test_db(db, seeded):
    assert query() == 1


def test_db_again(db):
    assert query() == 1


@pytest.mark.django_db(transaction=True)
def test_transactional():
    assert query() == 1


def test_transactional_again(transactional_db):
    assert query() == 1  # reopened by the fixture: the test thread's connection, not a leak


@pytest.mark.django_db(transaction=True)
def test_thread_closes():
    def work():
        try:
            query()
        finally:
            connection.close()

    worker = threading.Thread(target=work)
    worker.start()
    worker.join()


@pytest.mark.django_db(transaction=True)
def test_thread_leaks():
    worker = threading.Thread(target=query)
    worker.start()
    worker.join()


class TestDjangoTestCase(TestCase):
    def test_query(self):
        assert query() == 1


class TestDjangoTransactionTestCase(TransactionTestCase):
    def test_query(self):
        assert query() == 1


@pytest.fixture
def unblocked(django_db_blocker):
    with django_db_blocker.unblock():
        yield


def test_blocker_unblocked_for_one_test(unblocked):
    assert query() == 1  # opens the test thread's connection, which Django keeps: not a leak
"""


def test_pytest_django_with_a_real_database(inner: pytest.Pytester) -> None:
    inner.makepyfile(settings=DJANGO_SETTINGS, test_django=DJANGO_SUITE)
    args = ("-p", "no:randomly", "-p", "no:cacheprovider", "-p", "no:asyncio", "--ds=settings")
    result = inner.runpytest_subprocess("--pgleak", *args)
    result.assert_outcomes(passed=9, errors=1)
    where = site(DJANGO_SUITE, "QUERY", "test_django.py")
    result.stdout.fnmatch_lines(
        [
            "*pgleak: 1 test(s) leaked connections*",
            f"test_django.py::test_thread_leaks: leak.* at *{where}",
            "ERROR test_django.py::test_thread_leaks - Failed: pgleak: *",
        ]
    )
    assert "Thread-" in result.stdout.str()  # the holder: the thread the test started
