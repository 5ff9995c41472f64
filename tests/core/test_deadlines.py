"""The watchdog's deadline index finds every due lease without reading the whole ledger.

The ledger here is a plain dict of stand-in leases (the index reads ``id``, ``deadline`` and
``flagged`` only), so insertion orders that threads produce rarely can be laid out exactly.
"""

from __future__ import annotations

import math
import types
from typing import Any

from pgleak._deadlines import _SLACK, Deadlines


def lease(lease_id: int, deadline: float) -> Any:
    return types.SimpleNamespace(id=lease_id, deadline=deadline, flagged=False)


def ids(leases: list[Any]) -> list[int]:
    return [item.id for item in leases]


def test_due_in_deadline_order_and_only_once() -> None:
    ledger: dict[int, Any] = {}
    index = Deadlines(ledger)
    for lease_id, deadline in [(1, 30.0), (2, 10.0), (3, 20.0)]:
        ledger[lease_id] = lease(lease_id, deadline)
    assert index.due(5.0) == []
    assert index.next_deadline() == 10.0
    assert ids(index.due(25.0)) == [2, 3]
    for item in ledger.values():  # what the core does with what is due
        item.flagged = item.deadline <= 25.0
    assert index.due(25.0) == []
    assert ids(index.due(31.0)) == [1]


def test_a_lease_inserted_after_a_higher_id_is_still_filed() -> None:
    # Two threads draw ids 5 and 6; 6 is inserted first and seen by a pass, then 5 arrives.
    ledger: dict[int, Any] = {}
    index = Deadlines(ledger)
    ledger[6] = lease(6, 10.0)
    assert index.due(0.0) == []
    ledger[5] = lease(5, 10.0)
    assert ids(index.due(11.0)) == [5, 6]


def test_returned_leases_are_not_due_and_their_entries_go() -> None:
    ledger: dict[int, Any] = {}
    index = Deadlines(ledger)
    ledger[1] = lease(1, 10.0)
    ledger[2] = lease(2, 10.0)
    assert index.due(0.0) == []
    del ledger[1]
    assert ids(index.due(11.0)) == [2]
    assert 1 not in index._known


def test_an_extended_deadline_is_honoured() -> None:
    ledger: dict[int, Any] = {1: lease(1, 10.0)}
    index = Deadlines(ledger)
    assert index.due(0.0) == []
    ledger[1].deadline = 100.0  # allow_long_hold() on a connection already held
    assert index.due(50.0) == []
    assert index.next_deadline() == 100.0
    assert ids(index.due(100.0)) == [1]


def test_a_deadline_moved_earlier_is_due_once_refiled() -> None:
    ledger: dict[int, Any] = {1: lease(1, 100.0)}
    index = Deadlines(ledger)
    assert index.due(0.0) == []
    ledger[1].deadline = 20.0  # an allowance that ended before the time it granted
    assert index.due(30.0) == []  # filed at 100: not seen without the refile
    index.refile(ledger[1])
    assert ids(index.due(30.0)) == [1]


def test_leases_that_never_expire_are_known_but_not_filed() -> None:
    ledger: dict[int, Any] = {1: lease(1, math.inf), 2: lease(2, 5.0)}
    index = Deadlines(ledger)
    assert ids(index.due(10.0)) == [2]
    assert index.next_deadline() == math.inf
    assert index._known == {1, 2}


def test_memory_follows_what_is_held_under_churn() -> None:
    # Every pass sees a new set of short-lived leases with far deadlines: without the rebuild
    # the heap would keep an entry per lease ever seen.
    ledger: dict[int, Any] = {}
    index = Deadlines(ledger)
    next_id = 1
    for _ in range(200):  # bounded: 200 passes of 100 checkouts
        ledger.clear()
        for _ in range(100):
            ledger[next_id] = lease(next_id, 3600.0)
            next_id += 1
        assert index.due(0.0) == []
        assert len(index._heap) <= 2 * len(ledger) + _SLACK + 100
        assert len(index._known) <= 2 * len(ledger) + _SLACK + 100
    assert len(index._heap) < 200 * 100  # rebuilt at least once
    ledger[next_id] = lease(next_id, 1.0)
    assert ids(index.due(2.0)) == [next_id]


def test_clear_forgets_everything() -> None:
    ledger: dict[int, Any] = {1: lease(1, 1.0)}
    index = Deadlines(ledger)
    index.due(0.0)
    ledger.clear()
    index.clear()
    assert index.next_deadline() == math.inf
    ledger[2] = lease(2, 1.0)
    assert ids(index.due(2.0)) == [2]
