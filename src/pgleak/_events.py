"""The events pgleak emits, and the snapshot type of :func:`pgleak.checked_out`.

Event names are API: log pipelines and alert rules match on them, so they never change.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping
from typing import Any, Final

__all__ = [
    "AT_EXIT",
    "COLLECTED",
    "CONNECT_GAVE_UP",
    "CONNECT_RETRY",
    "EXHAUSTED",
    "RECLAIMED",
    "RETURNED",
    "SUPPRESSED",
    "SUSPECTED",
    "Checkout",
    "LeakEvent",
    "Sink",
]

SUSPECTED: Final = "leak.suspected"
RETURNED: Final = "leak.returned"
COLLECTED: Final = "leak.collected"
AT_EXIT: Final = "leak.at_exit"
EXHAUSTED: Final = "pool.exhausted"
#: ``reclaim=True``: an abandoned connection (its holder has ended) was closed and its slot
#: given back to a pool under pressure.
RECLAIMED: Final = "leak.reclaimed"
#: A connection attempt the server refused (full, starting up) is retried after a backoff sleep.
CONNECT_RETRY: Final = "connect.retry"
#: pgleak stopped retrying a refused connection attempt; the driver's error goes to the caller.
CONNECT_GAVE_UP: Final = "connect.gave_up"
#: Logged by the logging sink when repeats from one call site were counted instead of logged.
SUPPRESSED: Final = "report.suppressed"


@dataclasses.dataclass(frozen=True)
class Checkout:
    """One connection currently checked out (or, inside an event, the one the event is about).

    Attributes:
        checkout_id: Process-unique number of this checkout, to match a ``leak.returned`` with
            its ``leak.suspected``.
        pool: The pool's readable name (a URL without password, or a class name and id).
        held_s: Seconds since checkout, when the snapshot or event was made.
        holder: Who took it: ``thread 'name' (id N)`` or ``task 'name' in thread 'name'``.
        stack: The checkout stack as ``"file:line in function"``, newest (the user's line) last.
        holder_stack: Where the holder is *now*, same format; ``None`` when not known (the
            holder has finished, or the snapshot did not ask for it).
        holder_finished: The holding thread or task has ended while the connection is still
            out (other code may still hold the connection and return it).
        context: What the holder was doing at checkout, from ``pgleak.context()`` (a web
            integration sets the request: ``GET /orders/42``); also part of ``holder``.
        state: The connection's state when the snapshot was made, where the integration can
            tell (``idle in transaction``); ``None`` otherwise.
    """

    checkout_id: int
    pool: str
    held_s: float
    holder: str
    stack: list[str]
    holder_stack: list[str] | None = None
    holder_finished: bool = False
    context: str | None = None
    state: str | None = None

    __module__ = "pgleak"

    @property
    def site(self) -> str | None:
        """The user's line that checked the connection out, ``file:line in function``."""
        return self.stack[-1] if self.stack else None

    def as_dict(self) -> dict[str, Any]:
        return {
            "checkout_id": self.checkout_id,
            "pool": self.pool,
            "held_s": round(self.held_s, 3),
            "holder": self.holder,
            "stack": list(self.stack),
            "holder_stack": None if self.holder_stack is None else list(self.holder_stack),
            "holder_finished": self.holder_finished,
            "context": self.context,
            "state": self.state,
        }


@dataclasses.dataclass(frozen=True)
class LeakEvent:
    """Something a developer should know about a connection; see ``docs/events.md``.

    Attributes:
        event: One of ``leak.suspected``, ``leak.returned``, ``leak.collected``,
            ``leak.at_exit``, ``pool.exhausted``, ``connect.retry``, ``connect.gave_up``.
        pool: The pool's readable name.
        checkout: The checkout the event is about (``None`` for ``pool.exhausted``).
        threshold_s: The hold threshold that applied to this checkout.
        holders: For ``pool.exhausted``: every connection held from the pool, oldest first.
        waiter: For ``pool.exhausted``: who waited in vain, and where (as a ``Checkout`` whose
            ``held_s`` is how long it waited, ``None`` if the pool did not say).
        detail: A short extra sentence (why an at-exit report fired, what the pool said, the
            driver's error of a refused connection attempt).
        lost: For ``pool.exhausted`` of a pool that keeps only a count of what it lends
            (psycopg_pool): the checkouts garbage-collected without being returned, whose slots
            are gone for good; newest last.
        extra: Event-specific fields, merged into :meth:`as_dict`; for ``connect.*``:
            ``attempt``, ``sleep_s``, ``sqlstate``, ``held`` (connections this process holds),
            ``held_over_threshold``, ``elapsed_s``, ``reason`` (why pgleak gave up).
    """

    event: str
    pool: str
    checkout: Checkout | None = None
    threshold_s: float | None = None
    holders: tuple[Checkout, ...] = ()
    waiter: Checkout | None = None
    detail: str | None = None
    extra: Mapping[str, Any] | None = None
    lost: tuple[Checkout, ...] = ()

    __module__ = "pgleak"

    @property
    def held_s(self) -> float | None:
        return self.checkout.held_s if self.checkout else None

    @property
    def stack(self) -> list[str]:
        """The stack that answers "which line?": the checkout's, or the waiter's."""
        if self.checkout is not None:
            return self.checkout.stack
        return self.waiter.stack if self.waiter is not None else []

    def as_dict(self) -> dict[str, Any]:
        """The structured form, as attached to log records (``record.pgleak``)."""
        who = self.checkout or self.waiter
        data: dict[str, Any] = {
            "event": self.event,
            "pool": self.pool,
            "held_s": None if self.checkout is None else round(self.checkout.held_s, 3),
            "holder": who.holder if who else None,
            "stack": list(self.stack),
            "checkout_id": self.checkout.checkout_id if self.checkout else None,
            "holder_stack": self.checkout.holder_stack if self.checkout else None,
            "holder_finished": self.checkout.holder_finished if self.checkout else None,
            "context": who.context if who else None,
            "state": self.checkout.state if self.checkout else None,
            "threshold_s": self.threshold_s,
        }
        if self.event == EXHAUSTED:
            data["holders"] = [holder.as_dict() for holder in self.holders]
            data["lost"] = [lost.as_dict() for lost in self.lost]
            data["waited_s"] = None if self.waiter is None else round(self.waiter.held_s, 3)
        if self.detail:
            data["detail"] = self.detail
        if self.extra:
            data.update(self.extra)
        return data


#: A sink receives every event; it runs on pgleak's watchdog thread or the thread that caused the
#: event, inside pgleak's guard, so it must not block for long and may not raise into the app.
Sink = Callable[[LeakEvent], None]
