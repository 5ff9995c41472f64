"""``pgleak.context()`` labels checkouts; an adapter's probe adds the connection's state."""

from __future__ import annotations

import logging

import pytest

import pgleak
from pgleak._core import core
from pgleak._events import EXHAUSTED, SUSPECTED
from pgleak.testing import EventCapture


class Conn:
    """A stand-in connection: the core only needs something weakly referenceable."""


def test_context_labels_the_checkout_and_its_reports(
    events: EventCapture, caplog: pytest.LogCaptureFixture
) -> None:
    pool = core.pool(object(), "test", lambda _: "test pool")
    conn = Conn()
    with pgleak.context("GET /orders/42"):
        lease = core.checkout(pool, conn)
    assert lease is not None
    conn2 = Conn()
    other = core.checkout(pool, conn2)  # outside the block: no label
    assert other is not None
    lease.probe = lambda: "idle in transaction"
    caplog.set_level(logging.WARNING, "pgleak")
    suspected = events.wait_for(SUSPECTED, count=2)
    mine = next(e for e in suspected if e.checkout and e.checkout.checkout_id == lease.id)
    assert mine.checkout is not None
    assert mine.checkout.context == "GET /orders/42"
    assert mine.checkout.state == "idle in transaction"
    assert mine.as_dict()["context"] == "GET /orders/42"
    assert mine.checkout.holder.endswith("during GET /orders/42")
    plain = next(e for e in suspected if e.checkout and e.checkout.checkout_id == other.id)
    assert plain.checkout is not None
    assert plain.checkout.context is None
    assert "during" not in plain.checkout.holder
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "during GET /orders/42" in text
    assert "the connection is idle in transaction" in text
    core.checkin(lease)
    core.checkin(other)


def test_contexts_nest_and_reset(installed: pgleak.Settings) -> None:
    pool = core.pool(object(), "test")
    with pgleak.context("outer"):
        with pgleak.context("inner"):
            inner = core.checkout(pool, Conn())
        outer = core.checkout(pool, Conn())
    after = core.checkout(pool, Conn())
    assert inner is not None
    assert outer is not None
    assert after is not None
    assert (inner.context, outer.context, after.context) == ("inner", "outer", None)
    for lease in (inner, outer, after):
        core.checkin(lease)


@pytest.mark.internal_errors
def test_a_failing_probe_is_swallowed(events: EventCapture) -> None:
    pool = core.pool(object(), "test")
    conn = Conn()
    lease = core.checkout(pool, conn)
    assert lease is not None

    def broken() -> str:
        raise RuntimeError("probe failed")

    lease.probe = broken
    (event,) = events.wait_for(SUSPECTED)
    assert event.checkout is not None
    assert event.checkout.state is None
    core.checkin(lease)


def test_the_waiter_of_an_exhausted_pool_carries_the_context(events: EventCapture) -> None:
    pool = core.pool(object(), "test")
    with pgleak.context("POST /checkout"):
        core.exhausted(pool, 1.0, "no connection")
    (event,) = events.of(EXHAUSTED)
    assert event.waiter is not None
    assert event.waiter.context == "POST /checkout"
    assert event.as_dict()["context"] == "POST /checkout"
