"""psycopg2 pools against the real server: what is particular to psycopg2.

The shared kit tests (``test_common_sync.py``) cover thresholds, ``with`` blocks, exhaustion
under threads, exit reports. Here: keys, ``putconn(close=True)``, another pool's connection, a
pool that refuses at once instead of waiting, subclasses, ``closeall()``, pool names, and the
six attributes the adapter replaces.
"""

from __future__ import annotations

import math
import subprocess
import sys
import threading
from collections.abc import Callable, Iterator
from importlib import metadata
from typing import Any

import psycopg2
import pytest
from psycopg2.pool import (
    AbstractConnectionPool,
    PoolError,
    SimpleConnectionPool,
    ThreadedConnectionPool,
)

import pgleak
from pgleak._core import core
from pgleak.integrations.psycopg2 import Psycopg2Adapter, _pool_name
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import assert_site

POOL_CLASSES = [SimpleConnectionPool, ThreadedConnectionPool]
#: Every attribute the adapter replaces.
PATCHED = [
    (AbstractConnectionPool, "_getconn"),
    (AbstractConnectionPool, "_putconn"),
    (AbstractConnectionPool, "_closeall"),
    (SimpleConnectionPool, "getconn"),
    (SimpleConnectionPool, "putconn"),
    (SimpleConnectionPool, "closeall"),
    # connect retry, outside ThreadedConnectionPool's lock
    (ThreadedConnectionPool, "getconn"),
]

by_class = pytest.mark.parametrize("cls", POOL_CLASSES, ids=lambda cls: cls.__name__)

OpenPool = Callable[..., Any]


@pytest.fixture
def leak_threshold() -> float:
    """No test here is about thresholds: none may see a ``leak.suspected`` it did not ask for."""
    return 30.0


@pytest.fixture
def pools(pg: Server, installed: pgleak.Settings) -> Iterator[OpenPool]:
    """``pools(cls, minconn, maxconn, *args, **kwargs)``: a pool on the test server (its DSN
    unless connection arguments are given), closed after the test."""
    opened: list[Any] = []

    def open_pool(cls: Any, minconn: int, maxconn: int, *args: Any, **kwargs: Any) -> Any:
        if not args and not kwargs:
            args = (pg.dsn,)
        pool = cls(minconn, maxconn, *args, **kwargs)
        opened.append(pool)
        return pool

    yield open_pool
    for pool in opened:
        if not pool.closed:
            pool.closeall()


@pytest.fixture
def clean() -> Iterator[None]:
    pgleak.uninstall()
    yield
    pgleak.uninstall()


# -- keys ---------------------------------------------------------------------------------------


@by_class
def test_a_key_that_is_out_lends_the_same_connection_and_stays_one_checkout(
    cls: Any, pools: OpenPool, events: EventCapture
) -> None:
    """``getconn(key)`` for a key that is out returns that key's connection again and takes no
    slot. pgleak must neither record a second checkout nor lose the first: the line that took
    the slot keeps it, and the one ``putconn`` that releases the key checks it in."""
    pool = pools(cls, 0, 1)
    first = pool.getconn(key="a")  # KEYED
    again = pool.getconn("a")
    assert again is first
    [held] = pgleak.checked_out()
    assert_site(held.stack, "KEYED")
    # No second slot was taken: maxconn is 1, so another key is refused, with one holder.
    with pytest.raises(PoolError, match="exhausted"):
        pool.getconn(key="b")
    [event] = events.of("pool.exhausted")
    assert [holder.checkout_id for holder in event.holders] == [held.checkout_id]

    pool.putconn(first, key="a")
    assert pgleak.checked_out() == []
    assert core.by_conn == {}
    # The second borrower gives it back too: the key is gone, the pool refuses, nothing changes.
    with pytest.raises(PoolError, match="unkeyed"):
        pool.putconn(again)
    # Released, the key is free: taking it now is a new checkout.
    pool.getconn(key="a")  # KEYED-AGAIN
    [retaken] = pgleak.checked_out()
    assert retaken.checkout_id != held.checkout_id
    assert_site(retaken.stack, "KEYED-AGAIN")


def test_an_unhashable_key_fails_in_psycopg2_not_in_pgleak(
    pools: OpenPool, events: EventCapture
) -> None:
    """pgleak looks the key up before psycopg2 does; psycopg2's own error must be what the
    caller sees (and pgleak must swallow nothing: the autouse fixture checks)."""
    pool = pools(ThreadedConnectionPool, 0, 1)
    with pytest.raises(TypeError, match="unhashable"):
        pool.getconn(key=["a"])
    assert pgleak.checked_out() == []
    assert events.events == []


# -- putconn ------------------------------------------------------------------------------------


@by_class
def test_putconn_with_close_is_a_checkin(cls: Any, pools: OpenPool, events: EventCapture) -> None:
    """``close=True``: the user gives the connection back and the pool closes it instead of
    keeping it (minconn is 1, so without ``close`` it would keep it)."""
    pool = pools(cls, 1, 2)
    conn = pool.getconn()
    pool.putconn(conn, close=True)
    assert conn.closed
    assert pgleak.checked_out() == []
    assert core.by_conn == {}
    pool.closeall()
    assert events.events == []


@by_class
def test_putconn_of_another_pools_connection_raises_and_changes_nothing(
    cls: Any, pools: OpenPool, events: EventCapture
) -> None:
    """psycopg2 refuses a connection it did not lend ("trying to put unkeyed connection")
    before touching it: the other pool's checkout must stay on record, and so must the error."""
    mine = pools(cls, 0, 2)
    theirs = pools(cls, 0, 2)
    conn = theirs.getconn()  # THEIRS
    [before] = pgleak.checked_out()
    with pytest.raises(PoolError, match="trying to put unkeyed connection"):
        mine.putconn(conn)
    [after] = pgleak.checked_out()
    assert (after.checkout_id, after.pool) == (before.checkout_id, before.pool)
    assert_site(after.stack, "THEIRS")
    assert not conn.closed

    theirs.putconn(conn)
    assert pgleak.checked_out() == []
    with pytest.raises(PoolError, match="trying to put unkeyed connection"):  # given back twice
        theirs.putconn(conn)
    assert events.events == []


@by_class
def test_a_connection_the_pool_keeps_is_a_new_checkout_each_time(cls: Any, pools: OpenPool) -> None:
    pool = pools(cls, 1, 1)
    first = pool.getconn()
    [taken] = pgleak.checked_out()
    pool.putconn(first)
    again = pool.getconn()  # REUSED
    assert again is first  # minconn 1: the pool kept it and lends the same object again
    [retaken] = pgleak.checked_out()
    assert retaken.checkout_id != taken.checkout_id
    assert_site(retaken.stack, "REUSED")
    pool.putconn(again)
    assert pgleak.checked_out() == []
    assert core.by_conn == {}


def test_threads_passing_the_same_connections_around_leave_the_ledger_empty(
    pools: OpenPool, events: EventCapture
) -> None:
    """``ThreadedConnectionPool(3, 3)`` lends the same three connection objects over and over,
    to whichever thread asks next: every checkout is closed by its own checkin."""
    pool = pools(ThreadedConnectionPool, 3, 3)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(300):
                pool.putconn(pool.getconn())
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert not any(thread.is_alive() for thread in threads)
    assert errors == []
    assert core.leases == {}
    assert core.by_conn == {}
    assert events.events == []


def test_threaded_pool_is_tracked_inside_its_lock(
    pools: OpenPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """pgleak files a checkout under its connection object, which the pool may lend to another
    thread the moment it is back. Recorded inside the pool's lock, a checkin cannot land after
    that thread's checkout of the same connection and close the wrong one (a race too narrow
    for a stress test to show reliably, hence this direct check)."""
    pool = pools(ThreadedConnectionPool, 1, 1)
    seen: list[tuple[str, bool]] = []
    for name in ("checkout", "checkin", "pool_closed"):
        real = getattr(core, name)

        def spy(*args: Any, _name: str = name, _real: Any = real, **kwargs: Any) -> Any:
            seen.append((_name, pool._lock.locked()))
            return _real(*args, **kwargs)

        monkeypatch.setattr(core, name, spy)
    pool.putconn(pool.getconn())
    pool.closeall()
    assert seen == [("checkout", True), ("checkin", True), ("pool_closed", True)]


# -- exhaustion and close -----------------------------------------------------------------------


@by_class
def test_exhausted_at_once_lists_every_holder_oldest_first(
    cls: Any, pools: OpenPool, events: EventCapture
) -> None:
    """psycopg2 never waits: past maxconn getconn raises at once, and the report is already
    written (on the caller's thread) when the PoolError reaches the caller."""
    pool = pools(cls, 0, 3)
    first = pool.getconn()  # FIRST
    second = pool.getconn()  # SECOND
    third = pool.getconn()  # THIRD
    with pytest.raises(PoolError, match="connection pool exhausted"):
        pool.getconn()  # REFUSED
    [event] = events.of("pool.exhausted")
    assert [h.checkout_id for h in event.holders] == sorted(h.checkout_id for h in event.holders)
    for holder, marker in zip(event.holders, ["FIRST", "SECOND", "THIRD"], strict=True):
        assert_site(holder.stack, marker)
    assert event.waiter is not None
    assert_site(event.waiter.stack, "REFUSED")
    assert math.isnan(event.waiter.held_s)  # no wait happened, and none is claimed
    assert event.detail == "PoolError: connection pool exhausted"
    assert event.pool.startswith(f"psycopg2 {cls.__name__} (")
    for conn in (first, second, third):
        pool.putconn(conn)
    assert pgleak.checked_out() == []


@by_class
def test_a_closed_pool_is_not_exhausted(cls: Any, pools: OpenPool, events: EventCapture) -> None:
    """The same exception class says "connection pool is closed": that is no exhaustion."""
    pool = pools(cls, 0, 1)
    pool.closeall()
    with pytest.raises(PoolError, match="connection pool is closed"):
        pool.getconn()
    assert events.events == []


@by_class
def test_closeall_reports_what_is_still_out(
    cls: Any, pools: OpenPool, events: EventCapture
) -> None:
    pool = pools(cls, 1, 3)
    out_1 = pool.getconn()  # OUT-1
    out_2 = pool.getconn()  # OUT-2
    pool.putconn(pool.getconn())
    pool.closeall()
    reports = events.of("leak.at_exit")
    assert [report.detail for report in reports] == ["pool.closeall()", "pool.closeall()"]
    assert_site(reports[0].stack, "OUT-1")
    assert_site(reports[1].stack, "OUT-2")
    assert pgleak.checked_out() == []
    assert out_1.closed
    assert out_2.closed
    # Given back after the close: the pool refuses it; it was reported already, once.
    with pytest.raises(PoolError, match="connection pool is closed"):
        pool.putconn(out_1)
    assert len(events.events) == 2


# -- subclasses: each call is recorded exactly once ---------------------------------------------


@by_class
def test_each_public_call_is_recorded_once(
    cls: Any, pools: OpenPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``SimpleConnectionPool.getconn`` *is* ``_getconn`` under another name, and
    ``ThreadedConnectionPool.getconn`` calls ``_getconn``: both are wrapped, and neither call
    may pass through two wrappers."""
    calls: list[str] = []
    checkout, checkin = core.checkout, core.checkin

    def counting_checkout(*args: Any, **kwargs: Any) -> Any:
        calls.append("checkout")
        return checkout(*args, **kwargs)

    def counting_checkin(lease: Any) -> None:
        calls.append("checkin")
        checkin(lease)

    monkeypatch.setattr(core, "checkout", counting_checkout)
    monkeypatch.setattr(core, "checkin", counting_checkin)
    pool = pools(cls, 0, 2)
    pool.putconn(pool.getconn())
    assert calls == ["checkout", "checkin"]


def _custom_pool(base: Any) -> Any:
    class Custom(base):  # type: ignore[misc]
        """Written the way ``ThreadedConnectionPool`` is: public methods over ``_getconn``."""

        def getconn(self, key: Any = None) -> Any:
            return self._getconn(key)  # CUSTOM-GETCONN

        def putconn(self, conn: Any, key: Any = None, close: bool = False) -> None:
            self._putconn(conn, key, close)

        def closeall(self) -> None:
            self._closeall()

    return Custom


@pytest.mark.parametrize(
    "base",
    [AbstractConnectionPool, SimpleConnectionPool, ThreadedConnectionPool],
    ids=lambda cls: cls.__name__,
)
def test_a_subclass_over_the_underscore_methods_is_tracked_once(
    base: Any, pools: OpenPool, events: EventCapture
) -> None:
    pool = pools(_custom_pool(base), 0, 2)
    conn = pool.getconn()  # CUSTOM-TAKE
    [held] = pgleak.checked_out()
    assert len(core.leases) == 1
    assert_site(held.stack, "CUSTOM-GETCONN")
    assert_site(held.stack[:-1], "CUSTOM-TAKE")
    assert held.pool.startswith("psycopg2 Custom (")
    pool.putconn(conn)
    assert core.leases == {}
    pool.getconn()  # CUSTOM-LEAK
    pool.closeall()
    [report] = events.of("leak.at_exit")
    assert_site(report.stack[:-1], "CUSTOM-LEAK")
    assert report.detail == "pool.closeall()"
    assert [event.event for event in events.events] == ["leak.at_exit"]


# -- pool names ---------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["conninfo", "url", "keywords"])
def test_pool_name_shows_the_target_without_the_password(
    form: str, pg: Server, pools: OpenPool
) -> None:
    """The pool keeps its ``connect()`` arguments; the name merges them as ``connect`` does and
    hides the password (which the trust-auth test server ignores)."""
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = {}
    if form == "conninfo":
        args = (f"{pg.dsn} password=hunter2",)
    elif form == "url":
        args = (f"postgresql://{pg.user}:hunter2@{pg.host}:{pg.port}/{pg.dbname}",)
    else:
        kwargs = {"host": pg.host, "port": pg.port, "user": pg.user, "dbname": pg.dbname}
        kwargs["password"] = "hunter2"
    pool = pools(ThreadedConnectionPool, 0, 1, *args, **kwargs)
    conn = pool.getconn()
    [held] = pgleak.checked_out()
    pool.putconn(conn)
    # A URL alone stays a URL; with keywords, or key=value, it is libpq's key=value form.
    target = (
        f"postgresql://{pg.user}:***@{pg.host}:{pg.port}/{pg.dbname}"
        if form == "url"
        else f"port={pg.port} user={pg.user} dbname={pg.dbname}"
    )
    assert held.pool.startswith("psycopg2 ThreadedConnectionPool (")
    assert "hunter2" not in held.pool
    assert "password=***" in held.pool or form == "url"
    assert target in held.pool


def test_pool_name_of_a_dsn_libpq_cannot_parse_still_hides_the_password() -> None:
    pool = ThreadedConnectionPool(0, 1, "host=db password=hunter2 not-a-pair")  # connects lazily
    name = _pool_name(pool)
    assert name.startswith("psycopg2 ThreadedConnectionPool (")
    assert "hunter2" not in name


# -- install / uninstall ------------------------------------------------------------------------


def _current() -> dict[tuple[Any, str], Any]:
    return {(owner, attr): owner.__dict__[attr] for owner, attr in PATCHED}


def test_install_three_times_uninstall_once_restores_every_patched_attribute(
    clean: None, pg: Server
) -> None:
    originals = _current()
    # psycopg2 binds the public names of SimpleConnectionPool to the underscore functions.
    assert (
        originals[SimpleConnectionPool, "getconn"] is originals[AbstractConnectionPool, "_getconn"]
    )
    for _ in range(3):
        pgleak.install(integrations=["psycopg2"])
    assert pgleak.installed() == ["psycopg2"]
    for key, wrapped in _current().items():
        assert wrapped is not originals[key]
        assert getattr(wrapped, "__pgleak_wrapped__", False)
    pgleak.uninstall()
    for key, restored in _current().items():
        assert restored is originals[key], f"{key[0].__name__}.{key[1]} not restored"
    assert not {"_getconn", "_putconn", "_closeall"} & ThreadedConnectionPool.__dict__.keys()
    pool = ThreadedConnectionPool(0, 1, pg.dsn)
    try:
        conn = pool.getconn()
        assert pgleak.checked_out() == []
        pool.putconn(conn)
    finally:
        pool.closeall()


@by_class
def test_pools_created_before_install_are_tracked(clean: None, cls: Any, pg: Server) -> None:
    pool = cls(0, 1, pg.dsn)
    try:
        pgleak.install(integrations=["psycopg2"], leak_threshold=30)
        conn = pool.getconn()  # BEFORE-INSTALL
        [held] = pgleak.checked_out()
        assert_site(held.stack, "BEFORE-INSTALL")
        pool.putconn(conn)
        assert pgleak.checked_out() == []
    finally:
        pgleak.uninstall()
        pool.closeall()


@pytest.mark.parametrize(
    "import_line", ["import psycopg2.pool as pool", "import psycopg2\nfrom psycopg2 import pool"]
)
def test_psycopg2_imported_after_install_is_patched_on_import(import_line: str, pg: Server) -> None:
    code = (
        "import sys, pgleak\n"
        "pgleak.install()\n"
        "assert 'psycopg2' not in sys.modules\n"
        f"{import_line}\n"
        "print('installed', 'psycopg2' in pgleak.installed())\n"
        f"p = pool.ThreadedConnectionPool(0, 1, {pg.dsn!r})\n"
        "conn = p.getconn()\n"
        "print('tracked', len(pgleak.checked_out()))\n"
        "p.putconn(conn)\n"
        "print('back', len(pgleak.checked_out()))\n"
        "p.closeall()\n"
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:3] == ["installed True", "tracked 1", "back 0"]


def test_psycopg2_older_than_2_8_is_refused(clean: None, monkeypatch: pytest.MonkeyPatch) -> None:
    """psycopg2 is installed as ``psycopg2`` or ``psycopg2-binary``: the version checked is the
    one of whichever is installed."""
    distribution = Psycopg2Adapter.distribution
    assert distribution in ("psycopg2", "psycopg2-binary")
    assert psycopg2.__version__.startswith(metadata.version(distribution))
    real = metadata.version
    monkeypatch.setattr(
        metadata, "version", lambda name: "2.7.7" if name == distribution else real(name)
    )
    originals = _current()
    adapter = Psycopg2Adapter()
    with pytest.raises(pgleak.AdapterUnavailable, match=r"2\.7\.7 is older .*>= 2\.8"):
        adapter.install()
    assert not adapter.installed
    assert _current() == originals
