"""The C checkout and checkin wrappers (``pgleak._speedups.Tracked``) leave the same ledger and
the same reports as the Python templates they stand in for, step for step: checkouts with
every way of passing the arguments, a wait that runs out (``pool.exhausted``), a refused
checkin, a checkin that fails after the user let go, an observer started half-way, and a
fault inside pgleak."""

from __future__ import annotations

import types
from typing import Any

import pytest

import pgleak
from pgleak import _adapter, _guard, _stack
from pgleak._core import Lease, core
from pgleak.testing import capture_events

pytestmark = pytest.mark.skipif(
    getattr(_stack._fast, "Tracked", None) is None,
    reason="pgleak._speedups is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: the "
    "Python templates run, and the rest of the suite tests those",
)


class Timeout(Exception):
    pass


class Refused(Exception):
    pass


class Conn:
    fail = False


class ToyPool:
    """Lends what it has; refuses what it did not lend; can fail to take one back."""

    def __init__(self, size: int) -> None:
        self.free = [Conn() for _ in range(size)]
        self.lent: list[Conn] = []
        self.timeout = 3.0

    def getconn(self, timeout: float | None = None) -> Conn:
        if not self.free:
            raise Timeout(f"no connection in {timeout}")
        conn = self.free.pop()
        self.lent.append(conn)
        return conn

    def putconn(self, conn: Conn) -> None:
        if conn not in self.lent:
            raise Refused("not mine")
        self.lent.remove(conn)
        if conn.fail:
            raise RuntimeError("reset failed")
        self.free.append(conn)


class Toy(_adapter.Adapter):
    name = "toy"
    distribution = "no-such-distribution-pgleak-toy"

    def _install(self) -> None:
        self.track_acquire(
            ToyPool,
            "getconn",
            namer=lambda pool: "toy pool",
            is_timeout=lambda err: isinstance(err, Timeout),
            give_back="putconn",
        )
        self.track_release(ToyPool, "putconn", refused=(Refused,))


class Recorder:
    """An observer that writes down what it is told (the OpenTelemetry observer's hooks)."""

    def __init__(self, seen: list[Any]) -> None:
        self.seen = seen

    def checked_out(self, lease: Lease, since: float | None) -> None:
        # The wait's start is the core's clock reading (Core.wait_start): whether it came.
        self.seen.append(("checked_out", lease.pool.name, since is not None))

    def checked_in(self, lease: Lease, late: bool, discarded: bool) -> None:
        self.seen.append(("checked_in", lease.pool.name, late, discarded))

    def __getattr__(self, name: str) -> Any:
        return lambda *args: self.seen.append((name,))


def _ledger(pool: ToyPool) -> list[Any]:
    """The open leases, as a report shows them, plus the slots a report does not show."""
    out = []
    for lease in sorted(core.leases.values(), key=lambda lease: lease.id):
        conn = lease.ref() if lease.ref is not None else None
        out.append(
            (
                pool.lent.index(conn) if conn in pool.lent else None,
                lease.key == id(conn),
                core.by_conn.get(id(conn)) is lease,
                lease.pool.name,
                lease.thread[1],
                lease.task,
                lease.context,
                lease.self_returning,
                lease.flagged,
                lease.t_in,
                round(lease.threshold, 6),
            )
        )
    return out + [(c.pool, c.holder, c.stack, c.context, c.state) for c in pgleak.checked_out()]


def _scenario(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    transcript: list[Any] = []
    pool = ToyPool(2)

    def step(name: str, call: Any) -> Any:
        try:
            result: Any = call()
            outcome = "ok"
        except Exception as err:
            result, outcome = None, f"{type(err).__name__}: {err}"
        transcript.append((name, outcome, _ledger(pool)))
        return result

    with capture_events() as events:
        first = step("positional", lambda: pool.getconn(1.5))
        second = step("keyword", lambda: pool.getconn(timeout=2.5))
        step("timeout, positional", lambda: pool.getconn(0.25))
        step("timeout, keyword", lambda: pool.getconn(timeout=0.5))
        step("timeout, pool's", pool.getconn)
        step("unbound", lambda: ToyPool.getconn(pool))
        step("refused", lambda: pool.putconn(Conn()))
        first.fail = True
        step("failed checkin", lambda: pool.putconn(first))
        step("keyword checkin", lambda: pool.putconn(conn=second))
        seen: list[Any] = []
        monkeypatch.setattr(core, "observer", Recorder(seen))
        third = step("observed checkout", pool.getconn)
        step("observed checkin", lambda: ToyPool.putconn(pool, third))
        transcript.append(("observer saw", seen))
        monkeypatch.setattr(core, "observer", None)

        def broken(*args: Any, **kwargs: Any) -> None:
            raise RuntimeError("pgleak's own fault")

        monkeypatch.setattr(core, "checkout", broken)
        fourth = step("faulty checkout", pool.getconn)
        monkeypatch.undo()
        step("its checkin", lambda: pool.putconn(fourth))
    transcript.append(("faults", [(site, repr(exc)) for site, exc in _guard.swallowed]))
    transcript.append(
        (
            "events",
            [
                (
                    e.event,
                    e.pool,
                    e.detail,
                    e.threshold_s,
                    [(h.holder, h.stack) for h in e.holders],
                    e.waiter and (e.waiter.holder, e.waiter.stack),
                    e.as_dict().get("waited_s"),
                )
                for e in events.events
            ],
        )
    )
    return transcript


@pytest.fixture
def leak_threshold() -> float:
    return 60.0  # no leak.suspected from the watchdog half-way, whatever the machine's pace


@pytest.fixture
def run(installed: pgleak.Settings, monkeypatch: pytest.MonkeyPatch) -> Any:
    def run(c: bool) -> list[Any]:
        monkeypatch.setattr(_adapter, "use_c_wrappers", c)
        toy = Toy()
        toy.install()
        try:
            wrapper = ToyPool.__dict__["getconn"]
            assert type(wrapper) is (_stack._fast.Tracked if c else types.FunctionType)
            with monkeypatch.context() as inner:
                return _scenario(inner)
        finally:
            toy.uninstall()
            _guard.reset()
            core.leases.clear()
            core.by_conn.clear()

    return run


@pytest.mark.internal_errors
def test_the_c_and_python_wrappers_leave_the_same_ledger_and_reports(run: Any) -> None:
    python, c = run(False), run(True)
    assert c == python
    # and the scenario did what it says
    steps = {entry[0]: entry[1] for entry in python if len(entry) == 3}
    assert steps["timeout, keyword"] == "Timeout: no connection in 0.5"
    assert steps["refused"] == "Refused: not mine"
    assert steps["failed checkin"] == "RuntimeError: reset failed"
    transcript = dict(entry for entry in python if len(entry) == 2)
    assert transcript["faults"] == [("toy.checkout", 'RuntimeError("pgleak\'s own fault")')]
    assert [e[-1] for e in transcript["events"]] == [0.25, 0.5, 3.0, 3.0]
    assert transcript["observer saw"] == [
        ("checked_out", "toy pool", True),
        ("checked_in", "toy pool", False, False),
    ]
    assert [len(entry[2]) for entry in python if len(entry) == 3] == [
        2,
        4,
        4,
        4,
        4,
        4,
        4,
        2,
        0,
        2,
        0,
        0,
        0,
    ]
