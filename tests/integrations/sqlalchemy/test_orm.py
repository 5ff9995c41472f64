"""ORM sessions name the user's line, not SQLAlchemy's generated wrappers.

A ``Session`` checks out inside ``session.execute()`` through functions SQLAlchemy generates
at import (``<sqlalchemy generated _go() wrapper for ...>`` pseudo-files). They are SQLAlchemy's
frames: a report that stops at one of them names no line of the application, and since the
headline site is also what ``report.suppressed`` throttles by, every ORM leak in an
application would collapse into one call site.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest
import sqlalchemy as sa
from sqlalchemy.orm import Session, scoped_session, sessionmaker

import pgleak
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import assert_site, site_of

SELECT_1 = sa.text("SELECT 1")


@pytest.fixture
def engine(pg: Server, installed: pgleak.Settings) -> Iterator[sa.Engine]:
    eng = sa.create_engine(pg.url("psycopg"), pool_size=4, max_overflow=0, pool_timeout=0.5)
    yield eng
    eng.dispose()


def test_session_checkout_names_the_execute_line(engine: sa.Engine, events: EventCapture) -> None:
    session = Session(engine)
    try:
        session.execute(SELECT_1)  # SESSION
        [event] = events.wait_for("leak.suspected")
    finally:
        session.close()
    assert event.checkout is not None
    assert_site(event.stack, "SESSION")
    assert "sqlalchemy generated" not in " ".join(event.stack)
    assert (event.checkout.site or "").startswith(site_of("SESSION"))


def test_sessionmaker_and_begin_name_the_users_line(
    engine: sa.Engine, events: EventCapture
) -> None:
    factory = sessionmaker(engine)
    with factory.begin() as session:
        session.execute(SELECT_1)  # BEGIN
        [event] = events.wait_for("leak.suspected")
    assert event.checkout is not None
    assert_site(event.stack, "BEGIN")


def test_scoped_sessions_in_threads_each_name_their_own_line(
    engine: sa.Engine, events: EventCapture
) -> None:
    registry = scoped_session(sessionmaker(engine))
    done = threading.Event()
    both_suspected = threading.Event()

    def first() -> None:
        registry().execute(SELECT_1)  # THREAD-A
        both_suspected.wait(10)
        registry.remove()

    def second() -> None:
        registry().execute(SELECT_1)  # THREAD-B
        both_suspected.wait(10)
        registry.remove()
        done.set()

    threads = [threading.Thread(target=first, name="a"), threading.Thread(target=second, name="b")]
    for thread in threads:
        thread.start()
    try:
        suspected = events.wait_for("leak.suspected", count=2)
    finally:
        both_suspected.set()
        for thread in threads:
            thread.join(10)
    assert done.is_set()
    by_holder = {e.checkout.holder: e for e in suspected if e.checkout is not None}
    assert set(by_holder) == {"thread 'a'", "thread 'b'"}
    assert_site(by_holder["thread 'a'"].stack, "THREAD-A")
    assert_site(by_holder["thread 'b'"].stack, "THREAD-B")


def test_async_session_names_the_awaited_execute_line(pg: Server, events: EventCapture) -> None:
    pytest.importorskip("greenlet")
    from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine

    async def main() -> None:
        engine = create_async_engine(pg.url("asyncpg"), pool_size=2, max_overflow=0)
        try:
            async with AsyncSession(engine) as session:
                await session.execute(SELECT_1)  # ASYNC-SESSION
                await asyncio.to_thread(events.wait_for, "leak.suspected")
        finally:
            await engine.dispose()

    asyncio.run(main())
    [event] = events.of("leak.suspected")
    assert_site(event.stack, "ASYNC-SESSION")


def test_two_leaking_session_lines_are_reported_separately(
    engine: sa.Engine, events: EventCapture, caplog: pytest.LogCaptureFixture
) -> None:
    """Each line gets its full report: throttling is per call site, and these are two."""
    caplog.set_level(logging.WARNING, logger="pgleak")
    first, second = Session(engine), Session(engine)
    try:
        first.execute(SELECT_1)  # FIRST-LINE
        second.execute(SELECT_1)  # SECOND-LINE
        suspected = events.wait_for("leak.suspected", count=2)
    finally:
        first.close()
        second.close()
    sites = sorted(e.stack[-1] for e in suspected)
    assert sites[0].startswith(site_of("FIRST-LINE"))
    assert sites[1].startswith(site_of("SECOND-LINE"))
    logged = [r for r in caplog.records if r.getMessage().startswith("leak.suspected")]
    assert len(logged) == 2
    assert not [r for r in caplog.records if r.getMessage().startswith("report.suppressed")]
