"""Behaviour every synchronous pool shares, tested once per pool API (see ``kits.py``)."""

from __future__ import annotations

import contextlib
import gc
import subprocess
import sys
import textwrap
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import pgleak
from pgleak._core import core
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.helpers import assert_site, site_of
from tests.integrations.kits import SYNC_KITS, TERMINATE_OTHERS, Kit

pytestmark = pytest.mark.parametrize("kit", SYNC_KITS, ids=str)

POOL_SIZE = 3
KITS_FILE = sys.modules[Kit.__module__].__file__


@pytest.fixture
def pool(kit: Kit, pg: Server, installed: pgleak.Settings) -> Iterator[Any]:
    opened = kit.open(pg, POOL_SIZE, 0.5)
    yield opened
    with contextlib.suppress(Exception):  # closed by the test already
        kit.close(opened)


def _outside_kits(stack: list[str]) -> list[str]:
    return [entry for entry in stack if not entry.startswith(f"{KITS_FILE}:")]


def test_held_past_threshold_then_returned(kit: Kit, pool: Any, events: EventCapture) -> None:
    conn = kit.take(pool)  # TAKE
    [event] = events.wait_for("leak.suspected")  # WAITING
    kit.give(pool, conn)
    [returned] = events.wait_for("leak.returned")
    assert event.checkout is not None
    assert returned.checkout is not None
    assert event.stack[-1].startswith(kit.take_site + " in ")
    assert_site(event.stack[:-1], "TAKE")
    assert event.checkout.holder_stack is not None
    assert_site(_outside_kits(event.checkout.holder_stack), "WAITING")
    assert returned.checkout.checkout_id == event.checkout.checkout_id
    assert pgleak.checked_out() == []


def test_a_with_block_is_named_by_its_with_line(kit: Kit, pool: Any, events: EventCapture) -> None:
    with kit.use(pool) as conn:  # WITH
        kit.query(conn)
        [event] = events.wait_for("leak.suspected")
    assert_site(_outside_kits(event.stack), "WITH")
    events.wait_for("leak.returned")
    assert pgleak.checked_out() == []


def test_dropped_connection_is_collected_or_still_out(
    kit: Kit, pool: Any, events: EventCapture
) -> None:
    """Where the pool keeps no reference, a dropped connection is reported collected; where
    it does (psycopg2, asyncpg), it stays out and is reported when the pool closes."""
    conn = kit.take(pool)  # DROPPED
    kit.query(conn)
    del conn
    gc.collect()
    if kit.collectable:
        [event] = events.wait_for("leak.collected")
        assert_site(event.stack[:-1], "DROPPED")
        assert pgleak.checked_out() == []
    else:
        assert len(pgleak.checked_out()) == 1
        kit.close(pool)
        [event] = events.of("leak.at_exit")
        assert_site(event.stack[:-1], "DROPPED")
        assert events.of("leak.collected") == []


def test_still_out_at_close_is_reported(kit: Kit, pool: Any, events: EventCapture) -> None:
    held = kit.take(pool)  # AT-CLOSE
    kit.close(pool)
    [event] = events.of("leak.at_exit")
    assert_site(event.stack[:-1], "AT-CLOSE")
    assert event.detail not in (None, "process exit")
    del held


def _hold(kit: Kit, pool: Any, ready: threading.Barrier, release: threading.Event) -> None:
    conn = kit.take(pool)  # HOLDER
    ready.wait(10)
    release.wait(30)  # HOLDER-WAITING
    kit.give(pool, conn)


def _holders_parked_at(site: str) -> bool:
    held = pgleak.checked_out(with_holder_stack=True)
    return len(held) == POOL_SIZE and all(
        h.holder_stack and _outside_kits(h.holder_stack)[-1].startswith(f"{site} in ") for h in held
    )


def test_exhausted_pool_lists_every_holder_oldest_first(
    kit: Kit, pool: Any, events: EventCapture
) -> None:
    ready = threading.Barrier(POOL_SIZE + 1)
    release = threading.Event()
    threads = [
        threading.Thread(target=_hold, args=(kit, pool, ready, release), name=f"holder-{n}")
        for n in range(POOL_SIZE)
    ]
    for thread in threads:
        thread.start()
    try:
        ready.wait(10)
        # Past the barrier a holder is still on its way to HOLDER-WAITING; a pool that refuses
        # at once (psycopg2) would list it one line early. Wait until all are parked there.
        parked_at = site_of("HOLDER-WAITING")
        events.wait_until(lambda _: _holders_parked_at(parked_at))
        with pytest.raises(kit.exhausted):
            kit.take(pool)  # WAITER
    finally:
        release.set()
        for thread in threads:
            thread.join(10)
    [event] = events.of("pool.exhausted")
    assert [h.checkout_id for h in event.holders] == sorted(h.checkout_id for h in event.holders)
    assert {h.holder for h in event.holders} == {f"thread 'holder-{n}'" for n in range(POOL_SIZE)}
    for holder in event.holders:
        assert_site(holder.stack[:-1], "HOLDER")
        assert holder.holder_stack is not None
        assert_site(_outside_kits(holder.holder_stack), "HOLDER-WAITING")
    assert event.waiter is not None
    assert_site(event.waiter.stack[:-1], "WAITER")


def test_reports_say_the_connections_transaction_state(
    kit: Kit, pool: Any, events: EventCapture
) -> None:
    """Read off the driver at report time: a held connection's open transaction is visible."""
    fresh, busy = kit.take(pool), kit.take(pool)
    kit.query(busy)
    try:
        suspected = events.wait_for("leak.suspected", count=2)
        rest = kit.take(pool)
        with pytest.raises(kit.exhausted):
            kit.take(pool)
        [exhausted] = events.of("pool.exhausted")
    finally:
        for conn in (fresh, busy, rest):
            kit.give(pool, conn)
    states = {e.checkout.checkout_id: e.checkout.state or "" for e in suspected if e.checkout}
    assert sorted(states.values()) == sorted(kit.states)
    assert [holder.state for holder in exhausted.holders] == [*kit.states, kit.states[0]]


def test_many_threads_leave_the_ledger_empty(kit: Kit, pg: Server, installed: object) -> None:
    pool = kit.open(pg, POOL_SIZE, 30)
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(30):
                with kit.use(pool) as conn:
                    kit.query(conn)
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=work) for _ in range(8)]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
    finally:
        kit.close(pool)
    assert errors == []
    assert core.leases == {}
    assert core.by_conn == {}


def test_backends_terminated_mid_load_leave_no_false_report(
    kit: Kit, pg: Server, events: EventCapture
) -> None:
    """pg_terminate_backend() on every backend while threads use the pool: connections die,
    the pool discards them, the application gives them back; nothing is left, nothing reported."""
    import psycopg

    pgleak.install(leak_threshold=30)
    pool = kit.open(pg, POOL_SIZE, 30)
    stop = threading.Event()
    rounds: list[int] = []

    def work() -> None:
        n = 0
        while not stop.is_set() and n < 400:
            n += 1
            try:
                with kit.use(pool) as conn:
                    kit.query(conn)
            except Exception:  # the server killed this one: the application moves on
                pass
        rounds.append(n)

    threads = [threading.Thread(target=work) for _ in range(4)]
    try:
        for thread in threads:
            thread.start()
        with pgleak.suppress(), psycopg.connect(pg.dsn, autocommit=True) as admin:
            for _ in range(5):
                admin.execute(TERMINATE_OTHERS)
        stop.set()
        for thread in threads:
            thread.join(60)
    finally:
        stop.set()
        kit.close(pool)
    assert len(rounds) == 4
    assert core.leases == {}
    assert [e.event for e in events.events] == []


def test_still_out_at_process_exit_is_reported(kit: Kit, pg: Server, tmp_path: Path) -> None:
    root = Path(__file__).resolve().parents[2]
    script = tmp_path / "leaky.py"
    script.write_text(
        textwrap.dedent(
            f"""\
            import logging, sys
            sys.path.insert(0, {str(root)!r})
            import pgleak
            logging.basicConfig(stream=sys.stdout, level=logging.WARNING, format="%(message)s")
            pgleak.install()
            from tests.conftest import Server
            from tests.integrations.kits import SYNC_KITS
            [kit] = [k for k in SYNC_KITS if k.name == {kit.name!r}]
            server = Server({pg.host!r}, {pg.port}, {pg.user!r}, {pg.dbname!r}, 0)
            pool = kit.open(server, 2, 5)
            held = kit.take(pool)
            print("exiting", flush=True)
            """
        )
    )
    result = subprocess.run(
        [sys.executable, str(script)], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "leak.at_exit" in result.stdout, result.stdout + result.stderr
    assert f"{script}:11 in <module>" in result.stdout
    assert kit.take_site in result.stdout
