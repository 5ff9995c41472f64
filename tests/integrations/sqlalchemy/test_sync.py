"""SQLAlchemy sync engines against the real server: every event names the test's own line."""

from __future__ import annotations

import contextlib
import gc
import logging
import os
import threading
import time
from collections.abc import Iterator

import pytest
import sqlalchemy as sa

import pgleak
from pgleak import _adapter, _guard, _stack
from pgleak._core import core
from pgleak.integrations import sqlalchemy as sa_adapter
from pgleak.testing import EventCapture, capture_events
from tests.conftest import Server
from tests.helpers import BlockObserver, assert_site, observed_by, site_of


@pytest.fixture(autouse=True, params=["direct", "direct, python", "events"])
def hooks(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test here runs with each way of hooking checkout and checkin: SQLAlchemy's private
    methods (2.0, 2.1), wrapped in C where the extension is loaded and by the Python templates
    the C wrappers stand in for, and the pool events pgleak falls back on when the private
    methods are not as expected. Autouse, so it is set before ``installed`` installs."""
    if request.param == "events":
        monkeypatch.setattr(sa_adapter, "_direct_hooks_fit", lambda: False)
    if request.param == "direct, python":
        monkeypatch.setattr(_adapter, "use_c_wrappers", False)
    return str(request.param)


@pytest.fixture
def engine(pg: Server, installed: pgleak.Settings) -> Iterator[sa.Engine]:
    # A password the trust-auth server ignores: it must never appear in a report.
    url = pg.url("psycopg").replace(f"{pg.user}@", f"{pg.user}:s3cret-pw@")
    eng = sa.create_engine(url, pool_size=3, max_overflow=0, pool_timeout=0.5)
    yield eng
    eng.dispose()


def test_held_past_threshold_is_suspected_with_checkout_and_current_line(
    engine: sa.Engine, events: EventCapture
) -> None:
    """A connection held past leak_threshold is reported once, naming where it was taken and
    where its holder is now."""
    conn = engine.connect()  # CHECKOUT
    try:
        [event] = events.wait_for("leak.suspected")  # HOLDER-NOW
    finally:
        conn.close()
    assert event.checkout is not None
    assert_site(event.stack, "CHECKOUT")
    assert event.checkout.holder_stack is not None
    assert_site(event.checkout.holder_stack, "HOLDER-NOW")
    assert event.checkout.held_s >= 0.2
    assert event.checkout.holder == f"thread {threading.current_thread().name!r}"
    assert "s3cret" not in event.pool
    assert event.pool.startswith("postgresql+psycopg://postgres:***@")


def test_a_flagged_connection_that_comes_back_gets_a_follow_up(
    engine: sa.Engine, events: EventCapture
) -> None:
    conn = engine.connect()  # CHECKOUT
    [suspected] = events.wait_for("leak.suspected")
    conn.close()
    [returned] = events.wait_for("leak.returned")
    assert suspected.checkout is not None
    assert returned.checkout is not None
    assert returned.checkout.checkout_id == suspected.checkout.checkout_id
    assert returned.checkout.held_s >= suspected.checkout.held_s
    assert_site(returned.stack, "CHECKOUT")
    assert pgleak.checked_out() == []


def test_a_holder_that_finished_without_returning_is_called_out(
    engine: sa.Engine, events: EventCapture, caplog: pytest.LogCaptureFixture
) -> None:
    leaked: list[sa.Connection] = []
    worker = threading.Thread(target=lambda: leaked.append(engine.connect()), name="request-7")
    worker.start()
    worker.join(10)
    [event] = events.wait_for("leak.suspected")
    leaked[0].close()
    assert event.checkout is not None
    assert event.checkout.holder == "thread 'request-7'"
    assert event.checkout.holder_finished is True
    assert event.checkout.holder_stack is None
    assert any("the thread that took it has ended" in r.getMessage() for r in caplog.records)


def test_a_short_hold_is_not_reported(engine: sa.Engine, events: EventCapture) -> None:
    with engine.connect() as conn:
        conn.exec_driver_sql("select 1")
    # A second, held connection is reported; by then the first one's deadline has passed too.
    held = engine.connect()  # HELD
    try:
        [event] = events.wait_for("leak.suspected")
    finally:
        held.close()
    assert_site(event.stack, "HELD")
    assert len(events.of("leak.suspected")) == 1


def test_log_record_carries_the_structured_event(
    engine: sa.Engine, events: EventCapture, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="pgleak")
    conn = engine.connect()  # CHECKOUT
    events.wait_for("leak.suspected")
    conn.close()
    events.wait_for("leak.returned")
    records = [r for r in caplog.records if r.name == "pgleak" and hasattr(r, "pgleak")]
    data = [r.pgleak for r in records]
    assert [d["event"] for d in data] == ["leak.suspected", "leak.returned"]
    first = data[0]
    assert {"event", "pool", "held_s", "holder", "stack"} <= set(first)
    assert first["stack"][-1].startswith(site_of("CHECKOUT") + " in ")
    assert records[0].levelno == logging.WARNING
    assert site_of("CHECKOUT") in records[0].getMessage()
    assert "s3cret" not in records[0].getMessage()


def test_garbage_collected_without_return_is_reported(
    engine: sa.Engine, events: EventCapture
) -> None:
    conn = engine.connect()  # COLLECTED
    del conn
    gc.collect()
    [event] = events.wait_for("leak.collected")
    assert_site(event.stack, "COLLECTED")
    assert pgleak.checked_out() == []
    assert events.of("leak.returned") == []


def test_still_out_at_dispose_is_reported_then_followed_up(
    engine: sa.Engine, events: EventCapture
) -> None:
    conn = engine.connect()  # AT-DISPOSE
    engine.dispose()
    [event] = events.of("leak.at_exit")
    assert_site(event.stack, "AT-DISPOSE")
    assert event.detail == "engine.dispose()"
    conn.close()
    [returned] = events.wait_for("leak.returned")
    assert returned.checkout is not None
    assert event.checkout is not None
    assert returned.checkout.checkout_id == event.checkout.checkout_id


def _hold_until(engine: sa.Engine, release: threading.Event, ready: threading.Barrier) -> None:
    conn = engine.connect()  # THREAD-CHECKOUT
    ready.wait(10)
    release.wait(30)  # THREAD-WAITING
    conn.close()


def test_pool_exhausted_lists_every_holder_oldest_first(
    engine: sa.Engine, events: EventCapture
) -> None:
    release = threading.Event()
    ready = threading.Barrier(4)
    threads = [
        threading.Thread(target=_hold_until, args=(engine, release, ready), name=f"holder-{n}")
        for n in range(3)
    ]
    for thread in threads:
        thread.start()
    try:
        ready.wait(10)
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()  # WAITER
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    [event] = events.of("pool.exhausted")
    assert len(event.holders) == 3
    ids = [holder.checkout_id for holder in event.holders]
    assert ids == sorted(ids)
    assert [h.held_s for h in event.holders] == sorted(
        (h.held_s for h in event.holders), reverse=True
    )
    assert {h.holder for h in event.holders} == {f"thread 'holder-{n}'" for n in range(3)}
    for holder in event.holders:
        assert_site(holder.stack, "THREAD-CHECKOUT")
        assert holder.holder_stack is not None
        assert_site(holder.holder_stack, "THREAD-WAITING")
    assert event.waiter is not None
    assert_site(event.waiter.stack, "WAITER")
    assert event.waiter.held_s >= 0.4
    assert "QueuePool limit" in (event.detail or "")


def test_checked_out_is_a_snapshot_oldest_first(engine: sa.Engine, events: EventCapture) -> None:
    first = engine.connect()  # FIRST
    second = engine.connect()  # SECOND
    snapshot = pgleak.checked_out()
    assert [c.checkout_id for c in snapshot] == sorted(c.checkout_id for c in snapshot)
    assert_site(snapshot[0].stack, "FIRST")
    assert_site(snapshot[1].stack, "SECOND")
    first.close()
    second.close()
    assert pgleak.checked_out() == []


def test_allow_long_hold_covers_new_and_held_connections(
    engine: sa.Engine, events: EventCapture
) -> None:
    already = engine.connect()  # ALREADY-HELD
    with pgleak.allow_long_hold(seconds=30):
        inside = engine.connect()  # INSIDE
        control_thread_conn: list[sa.Connection] = []
        # A checkout from another thread is not covered: its report proves the deadlines of
        # the two covered connections (taken earlier) have passed unreported.
        worker = threading.Thread(target=lambda: control_thread_conn.append(engine.connect()))
        worker.start()
        worker.join(10)
        [event] = events.wait_for("leak.suspected")
    control_thread_conn[0].close()
    inside.close()
    already.close()
    assert event.checkout is not None
    assert event.checkout.holder != f"thread {threading.current_thread().name!r}"
    assert len(events.of("leak.suspected")) == 1


def test_many_threads_leave_the_ledger_empty(engine: sa.Engine, installed: object) -> None:
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(40):
                with engine.connect() as conn:
                    conn.exec_driver_sql("select 1")
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    with engine.connect():
        pass
    engine.pool._timeout = 30  # type: ignore[attr-defined]
    threads = [threading.Thread(target=work) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert errors == []
    assert pgleak.checked_out() == []
    assert core.leases == {}


class _RaisingHandler(logging.Handler):
    def emit(self, record: logging.LogRecord) -> None:
        raise RuntimeError("log shipper is down")


@pytest.mark.internal_errors
def test_a_raising_log_handler_does_not_break_the_app(
    engine: sa.Engine, events: EventCapture, capfd: pytest.CaptureFixture[str]
) -> None:
    logger = logging.getLogger("pgleak")
    handler = _RaisingHandler()
    logger.addHandler(handler)
    try:
        held = [engine.connect() for _ in range(3)]
        # The user's own exception comes through, unchanged, past the failing report.
        with pytest.raises(sa.exc.TimeoutError):
            engine.connect()
        events.wait_for("leak.suspected", count=3)
        for conn in held:
            conn.close()
        events.wait_for("leak.returned", count=1)
        with engine.connect() as conn:
            assert conn.exec_driver_sql("select 42").scalar() == 42
    finally:
        logger.removeHandler(handler)
    assert any(isinstance(exc, RuntimeError) for _, exc in _guard.swallowed)
    assert core.watchdog.thread is not None
    assert core.watchdog.thread.is_alive()
    err = capfd.readouterr().err
    assert err.count("pgleak: internal error") <= 2


@pytest.mark.skipif(not hasattr(os, "fork"), reason="fork() is POSIX-only")
# Forking while pgleak's watchdog thread runs is the very case under test (3.12+ warns about it).
@pytest.mark.filterwarnings("ignore:This process .* is multi-threaded:DeprecationWarning")
def test_a_forked_child_starts_with_an_empty_ledger_and_its_own_watchdog(
    pg: Server, engine: sa.Engine, events: EventCapture
) -> None:
    parent_conn = engine.connect()
    assert len(pgleak.checked_out()) == 1
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report back through the pipe, never return into pytest
        code = 1
        try:
            empty = pgleak.checked_out() == []
            child_engine = sa.create_engine(pg.url("psycopg"))
            with capture_events() as child_events:
                conn = child_engine.connect()  # CHILD-CHECKOUT
                [event] = child_events.wait_for("leak.suspected", timeout=10)
                conn.close()
            ok = empty and event.stack[-1].startswith(site_of("CHILD-CHECKOUT") + " in ")
            os.write(write_fd, b"ok" if ok else f"bad {empty} {event.stack}".encode())
            code = 0
        except BaseException as exc:
            os.write(write_fd, f"error {exc!r}".encode())
        finally:
            os._exit(code)
    os.close(write_fd)
    with os.fdopen(read_fd, "rb") as pipe:
        answer = pipe.read().decode()
    _, status = os.waitpid(pid, 0)
    parent_conn.close()
    assert answer == "ok"
    assert os.waitstatus_to_exitcode(status) == 0
    # The parent's own ledger is untouched by the child.
    assert pgleak.checked_out() == []


def test_tracking_is_bounded_by_max_tracked(
    pg: Server, installed: pgleak.Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A runaway leak cannot make pgleak itself grow without bound."""
    pgleak.install(max_tracked=2)
    engine = sa.create_engine(pg.url("psycopg"), pool_size=4, max_overflow=0)
    try:
        held = [engine.connect() for _ in range(4)]
        assert len(pgleak.checked_out()) == 2
        assert core.untracked == 2
        warnings = [r for r in caplog.records if "max_tracked" in r.getMessage()]
        assert len(warnings) == 1
        for conn in held:
            conn.close()
        assert pgleak.checked_out() == []
    finally:
        engine.dispose()


def test_waiting_for_collected_runs_the_collector_itself(
    engine: sa.Engine, events: EventCapture
) -> None:
    """The documented ``pgleak.testing`` example: no ``gc.collect()`` of the test's own, although
    a connection that ran a query sits in a reference cycle."""
    gc.disable()  # the cycle is freed only by a collection: wait_for must run it
    try:
        conn = engine.connect()  # DROPPED
        conn.execute(sa.text("SELECT 1"))
        del conn
        [event] = events.wait_for("leak.collected")
    finally:
        gc.enable()
    assert_site(event.stack, "DROPPED")


def test_an_allowance_that_ends_early_gives_a_fresh_threshold_from_its_end(
    engine: sa.Engine, events: EventCapture
) -> None:
    held = engine.connect()  # HELD-ACROSS
    taken = time.monotonic()
    with pgleak.allow_long_hold(seconds=60):
        # Past the connection's first deadline (the clock is what is waited for here), then
        # a whole pass: the watchdog has met that deadline and filed the allowance's instead.
        time.sleep(2 * pgleak.settings().leak_threshold)
        assert core.watchdog.wait_for_pass(10)
        assert events.of("leak.suspected") == []
    ended = time.monotonic()
    [event] = events.wait_for("leak.suspected")
    held.close()
    assert event.checkout is not None
    assert_site(event.checkout.stack, "HELD-ACROSS")
    # Reported a threshold after the block, not at the 60 s the allowance had granted.
    assert event.checkout.held_s < ended - taken + 10


class _Told(BlockObserver):
    """The thread each enter and exit ran in and the type of the lease's connection."""

    def note(self, what: str, lease: object) -> object:
        ref = getattr(lease, "ref", None)
        fairy = ref() if ref is not None else None
        return (what, threading.current_thread().name, type(fairy).__name__)

    def mine(self, conn: sa.Connection) -> bool:
        """Whether the last lease told is the one filed on ``conn``'s pool record."""
        record = conn._dbapi_connection._connection_record  # type: ignore[union-attr]
        return self.last is not None and record.__dict__.get(sa_adapter._KEY) is self.last


# Run once, with the direct hooks: what it compares does not depend on how checkout is hooked.
@pytest.mark.parametrize("hooks", ["direct"], indirect=True)
@pytest.mark.internal_errors
@pytest.mark.skipif(
    not hasattr(_stack._fast, "ablock_wrapper"), reason="pgleak._speedups is not in use here"
)
def test_the_c_and_python_blocks_tell_the_observer_the_same(
    pg: Server, monkeypatch: pytest.MonkeyPatch, hooks: str
) -> None:
    """``with engine.connect()`` / ``engine.begin()`` while an observer runs: the C
    ``Connection.__enter__`` / ``__exit__`` (pgleak._speedups.Tracked) tell it what the Python
    functions tell it, in the same thread, with the block's own lease, and report its faults at
    the same site."""

    def body(engine: sa.Engine, told: _Told) -> None:
        with engine.connect() as conn:
            value = conn.execute(sa.text("select 1")).scalar()
            told.seen.append(("inside", value, told.mine(conn)))
        with engine.begin() as conn:
            told.seen.append(("inside begin", told.mine(conn)))

        def in_a_thread() -> None:
            with engine.connect() as conn:
                told.seen.append(("inside a thread", told.mine(conn)))

        thread = threading.Thread(target=in_a_thread, name="block-thread")
        thread.start()
        thread.join(timeout=30)
        assert not thread.is_alive()
        with contextlib.suppress(KeyError), engine.connect():
            raise KeyError("the user's")
        engine.connect().close()  # no block: never entered
        conn = engine.connect()  # the methods called as such, not by ``with``
        assert conn.__enter__() is conn
        told.seen.append(("called", told.mine(conn)))
        conn.__exit__(None, None, None)
        held = engine.connect()
        try:
            with engine.connect():
                told.seen.append(("never inside",))
        except sa.exc.TimeoutError:
            told.seen.append(("no connection",))
        held.close()
        told.broken = True
        with engine.connect():
            told.seen.append(("inside, faulty observer",))

    def run(c: bool) -> list[object]:
        told = _Told()
        with observed_by(monkeypatch, c, told, sa.Connection, ("__enter__", "__exit__")) as faults:
            engine = sa.create_engine(
                pg.url("psycopg"), pool_size=1, max_overflow=0, pool_timeout=0.01
            )
            try:
                body(engine, told)
            finally:
                engine.dispose()
        return [*told.seen, ("faults", faults)]

    python, c = run(False), run(True)
    assert c == python
    main = threading.current_thread().name
    fairy = "_ConnectionFairy"
    enter, exit_ = ("enter", main, fairy), ("exit", main, fairy)
    fault = ("sqlalchemy.scope", 'RuntimeError("pgleak\'s own fault")')
    assert python == [
        *(enter, ("inside", 1, True), exit_),
        *(enter, ("inside begin", True), exit_),
        *(("enter", "block-thread", fairy), ("inside a thread", True)),
        ("exit", "block-thread", fairy),
        *(enter, exit_),
        *(enter, ("called", True), exit_),
        ("no connection",),
        ("inside, faulty observer",),
        ("faults", [fault, fault]),  # the block's enter and exit
    ]


# Run once, with the direct hooks: what it compares does not depend on how checkout is hooked.
@pytest.mark.parametrize("hooks", ["direct"], indirect=True)
@pytest.mark.internal_errors
def test_a_fairy_class_changed_or_subclassed_is_read_as_python_reads_it(
    pg: Server, monkeypatch: pytest.MonkeyPatch, hooks: str
) -> None:
    """The C checkout reads the fairy's record from its slot while the fairy's class is the
    one it found the slot on, unchanged: the class's ``_connection_record`` made a property
    since, or a subclass whose ``_connection_record`` is one, and it reads by name, as the
    Python template does (the lease on the record the property gives, the property read as
    often)."""
    from sqlalchemy.pool import base

    slot = base._ConnectionFairy.__dict__["_connection_record"]

    reads = [0]

    def read(fairy: object) -> object:
        reads[0] += 1
        return slot.__get__(fairy, type(fairy))

    counted = property(read, slot.__set__)

    class Fairy(base._ConnectionFairy):
        __slots__ = ()
        _connection_record = counted

    def cycle(engine: sa.Engine, seen: list[tuple[object, ...]], what: str) -> None:
        before = reads[0]
        with engine.connect() as conn:
            fairy = conn._dbapi_connection
            record = slot.__get__(fairy, type(fairy))
            filed = record.__dict__.get(sa_adapter._KEY)
            on_record = filed is not None and filed.ref() is fairy
        seen.append((what, type(fairy).__name__, on_record, sa_adapter._KEY in record.__dict__))
        seen.append(("property read", reads[0] - before))

    def run(c: bool) -> list[tuple[object, ...]]:
        seen: list[tuple[object, ...]] = []
        with monkeypatch.context() as patched:
            patched.setattr(_adapter, "use_c_wrappers", c)
            pgleak.install(leak_threshold=60, report_interval=60, capture_stack=False)
            try:
                engine = sa.create_engine(pg.url("psycopg"), pool_size=1, max_overflow=0)
                try:
                    cycle(engine, seen, "plain")
                    cycle(engine, seen, "plain again")
                    with monkeypatch.context() as swapped:  # the slot read through a property
                        swapped.setattr(base._ConnectionFairy, "_connection_record", counted)
                        cycle(engine, seen, "its class changed")
                    cycle(engine, seen, "its class changed back")
                    with monkeypatch.context() as swapped:  # SQLAlchemy makes Fairy ones
                        swapped.setattr(base, "_ConnectionFairy", Fairy)
                        cycle(engine, seen, "a subclass")
                        cycle(engine, seen, "a subclass again")
                    cycle(engine, seen, "plain after")
                finally:
                    engine.dispose()
                seen.append(("faults", list(_guard.swallowed)))
            finally:
                pgleak.uninstall()
                _guard.reset()
        return seen

    python, c = run(False), run(True)
    assert c == python
    # pgleak's own read of the property: one a checkout, in C as in Python
    counts = [entry[1] for entry in python if entry[0] == "property read"]
    assert counts[0] == counts[1] == counts[3] == counts[6] == 0
    assert counts[2] == counts[4] == counts[5] != 0
    assert [entry for entry in python if entry[0] != "property read"] == [
        ("plain", "_ConnectionFairy", True, False),
        ("plain again", "_ConnectionFairy", True, False),
        ("its class changed", "_ConnectionFairy", True, False),
        ("its class changed back", "_ConnectionFairy", True, False),
        ("a subclass", "Fairy", True, False),
        ("a subclass again", "Fairy", True, False),
        ("plain after", "_ConnectionFairy", True, False),
        ("faults", []),
    ]
