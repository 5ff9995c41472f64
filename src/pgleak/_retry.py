"""Retrying a connection attempt the server refused because it is full or not ready.

A refused connection ("sorry, too many clients already", SQLSTATE 53300) is usually transient:
a holder gives a connection back a moment later. Failing the request at once turns a blip into
an error page; retrying in a tight loop turns a full server into a thundering herd. This module
does the middle thing, and only for the *connection attempt*, never for a statement (a statement
may have had effects; an attempt that the server refused had none):

* :func:`classify` decides whether an exception means "refused because full / not ready".
  Only asyncpg exposes the SQLSTATE of a refused connect; libpq-based drivers (psycopg,
  psycopg2) give the server's message only, so the English texts are matched as a fallback.
* exponential backoff with full jitter (AWS architecture blog, "Exponential Backoff And
  Jitter"): ``sleep = U(0, min(cap, base * 2**n))`` spreads many clients' retries over the
  whole window instead of synchronising them;
* a maximum number of attempts and a total deadline;
* a process-wide :class:`RetryBudget` (gRPC retry throttling): when most attempts fail, the
  server is not briefly full but down or permanently saturated, and retrying only adds load;
  pgleak then fails fast until successes have refilled the budget.

Every retry and give-up is a ``connect.retry`` / ``connect.gave_up`` event carrying how many
connections this process holds: a full server while this process sits on many connections is
a leak here, not a capacity problem there.

The driver's exception is always re-raised as the same object: pgleak never wraps, so code that
catches ``psycopg.OperationalError`` (or reads SQLAlchemy's ``.orig``) behaves as without it.
"""

from __future__ import annotations

import asyncio
import random
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, Final, TypeVar

from pgleak._core import PoolHandle, core
from pgleak._events import CONNECT_GAVE_UP, CONNECT_RETRY, LeakEvent
from pgleak._guard import internal_error
from pgleak._settings import Settings

__all__ = [
    "BUDGET",
    "RetryBudget",
    "aretry_connect",
    "backoff",
    "classify",
    "retry_connect",
]

T = TypeVar("T")

#: SQLSTATEs that mean "the server refused this connection for now": too_many_connections,
#: cannot_connect_now (starting up, shutting down, in recovery).
TOO_MANY_CONNECTIONS: Final = "53300"
CANNOT_CONNECT_NOW: Final = "57P03"
#: protocol_violation: what PgBouncer sends for its own limits. Also used for real protocol
#: errors, so it is retryable only together with one of PgBouncer's limit texts.
PROTOCOL_VIOLATION: Final = "08P01"

_RETRYABLE_SQLSTATES = frozenset({TOO_MANY_CONNECTIONS, CANNOT_CONNECT_NOW})

#: (lower-case text, SQLSTATE) matched against the messages of drivers that give no SQLSTATE on
#: a failed connect. English only: a server with a translated ``lc_messages`` is not recognised
#: (and its refusals fail at once, as without pgleak).
_MESSAGES: Final[tuple[tuple[str, str], ...]] = (
    ("sorry, too many clients already", TOO_MANY_CONNECTIONS),
    ("too many connections for role", TOO_MANY_CONNECTIONS),
    ("too many connections for database", TOO_MANY_CONNECTIONS),
    # <= PG15: "... reserved for non-replication superuser connections"; PG16+: "... reserved
    # for roles with the SUPERUSER attribute" / "... with privileges of the
    # "pg_use_reserved_connections" role".
    ("remaining connection slots are reserved", TOO_MANY_CONNECTIONS),
    ("the database system is starting up", CANNOT_CONNECT_NOW),
    ("the database system is not yet accepting connections", CANNOT_CONNECT_NOW),
    ("the database system is shutting down", CANNOT_CONNECT_NOW),
    ("the database system is in recovery mode", CANNOT_CONNECT_NOW),
    # PgBouncer's own limits (SQLSTATE 08P01).
    ("no more connections allowed (max_client_conn)", PROTOCOL_VIOLATION),
    ("client connections exceeded", PROTOCOL_VIOLATION),
)

#: How far a chain of causes is followed; exception chains can be cyclic.
_MAX_CHAIN = 16
#: From this many connections held here, a gave-up/retry message suggests a leak here.
MANY_HELD: Final = 10


def _chain(exc: BaseException) -> Iterator[BaseException]:
    """``exc`` and what it wraps: SQLAlchemy's ``.orig``, then ``__cause__``/``__context__``."""
    seen: set[int] = set()
    todo: list[BaseException] = [exc]
    while todo and len(seen) < _MAX_CHAIN:
        item = todo.pop(0)
        if id(item) in seen:
            continue
        seen.add(id(item))
        yield item
        for nxt in (getattr(item, "orig", None), item.__cause__, item.__context__):
            if isinstance(nxt, BaseException):
                todo.append(nxt)


def _sqlstate_of(exc: BaseException) -> str | None:
    for attr in ("sqlstate", "pgcode"):
        value = getattr(exc, attr, None)
        if isinstance(value, str) and value:
            return value
    return None


def _message_state(text: str) -> str | None:
    lowered = text.lower()
    for needle, state in _MESSAGES:
        if needle in lowered:
            return state
    return None


def classify(exc: BaseException) -> str | None:
    """The SQLSTATE that makes ``exc`` worth retrying at connect time, or ``None``.

    An explicit SQLSTATE anywhere in the chain decides (asyncpg gives one; psycopg and psycopg2
    give ``None`` during the handshake); 08P01 counts only with one of PgBouncer's limit texts,
    because it is also the code of real protocol errors. Without any SQLSTATE, the server's
    English message decides. A wrong password or an unknown database is ``None``: retrying it
    cannot help and would only delay the error the user needs to see.
    """
    if not isinstance(exc, Exception):
        return None  # KeyboardInterrupt, CancelledError, SystemExit: never retried
    explicit: str | None = None
    texts: list[str] = []
    for item in _chain(exc):
        state = _sqlstate_of(item)
        if state is not None and explicit is None:
            explicit = state
        try:
            texts.append(str(item))
        except Exception:  # a driver error whose __str__ fails must not break the connect
            continue
    by_text = next((s for s in map(_message_state, texts) if s is not None), None)
    if explicit is not None:
        if explicit in _RETRYABLE_SQLSTATES:
            return explicit
        if explicit == PROTOCOL_VIOLATION and by_text == PROTOCOL_VIOLATION:
            return explicit
        return None
    return by_text


def backoff(retry: int, base: float, cap: float, rand: Callable[[], float]) -> float:
    """Full jitter: ``U(0, min(cap, base * 2**retry))``, ``retry`` counted from 0.

    The whole interval, not ``[d/2, d]``: clients that failed together then retry at spread-out
    moments, which is what keeps a full server from being hit by synchronised waves.
    """
    ceiling = min(cap, base * 2.0 ** min(retry, 64))
    return ceiling * rand()


class RetryBudget:
    """A process-wide token bucket deciding whether retries are allowed at all.

    gRPC retry throttling: the bucket holds ``max_tokens``; each refused attempt spends one,
    each successful connection gives back ``ratio``; while the bucket is at or below half,
    nothing is retried. A server briefly full costs a few tokens; a server that refuses most
    attempts empties the bucket and every process fails fast instead of adding load.
    Thread-safe; the sizes are read from the settings at each call, so ``install()`` with new
    values applies at once.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._tokens: float | None = None  # None: full (the size is known only at first use)

    def _level(self, max_tokens: float) -> float:
        tokens = max_tokens if self._tokens is None else min(self._tokens, max_tokens)
        self._tokens = tokens
        return tokens

    def tokens(self, max_tokens: float) -> float:
        with self._lock:
            return self._level(max_tokens)

    def allows(self, max_tokens: float) -> bool:
        """Retries are allowed while more than half the tokens are left."""
        with self._lock:
            return self._level(max_tokens) > max_tokens / 2

    def failed(self, max_tokens: float) -> None:
        with self._lock:
            self._tokens = max(0.0, self._level(max_tokens) - 1.0)

    def succeeded(self, max_tokens: float, ratio: float) -> None:
        tokens = self._tokens
        if tokens is None or tokens >= max_tokens:
            return  # full: the common case, on every connection, takes no lock
        with self._lock:
            level = self._level(max_tokens)
            if level < max_tokens:
                self._tokens = min(max_tokens, level + ratio)

    def reset(self) -> None:
        """Full again (a forked child, ``uninstall()``): the parent's failures are not ours."""
        with self._lock:
            self._tokens = None


#: The process's budget, shared by every pool and adapter.
BUDGET = RetryBudget()


#: The pool an attempt is for: its handle, a name, or a callable giving the handle (looked up
#: only if the attempt is refused, so the common path pays nothing for it).
PoolRef = PoolHandle | str | Callable[[], PoolHandle]


class _Attempts:
    """The decisions of one retry loop, shared by the sync and async versions."""

    __slots__ = ("attempt", "budget", "clock", "deadline", "pool", "rand", "settings", "start")

    def __init__(
        self,
        settings: Settings,
        pool: PoolRef,
        clock: Callable[[], float],
        rand: Callable[[], float],
        budget: RetryBudget,
        deadline: float | None,
        start: float,
    ) -> None:
        self.settings = settings
        self.deadline = (
            settings.retry_deadline if deadline is None else min(deadline, settings.retry_deadline)
        )
        self.pool = pool() if callable(pool) else pool
        self.clock = clock
        self.rand = rand
        self.budget = budget
        self.start = start
        self.attempt = 1

    def refused(self, exc: BaseException) -> float | None:
        """After a failed attempt: seconds to sleep before the next, or ``None`` to re-raise."""
        state = classify(exc)
        if state is None:
            return None  # not ours to retry: no event, no token spent
        s = self.settings
        self.budget.failed(s.retry_budget)
        elapsed = self.clock() - self.start
        remaining = self.deadline - elapsed
        reason: str | None = None
        if self.attempt >= s.retry_max_attempts:
            reason = "max_attempts"
        elif remaining <= 0:
            reason = "deadline"
        elif not self.budget.allows(s.retry_budget):
            reason = "budget"
        if reason is not None:
            self._emit(CONNECT_GAVE_UP, exc, state, elapsed, None, reason)
            return None
        # The last sleep is cut at the deadline, so that one attempt is still made there.
        delay = min(
            backoff(self.attempt - 1, s.retry_base_delay, s.retry_max_delay, self.rand),
            remaining,
        )
        self._emit(CONNECT_RETRY, exc, state, elapsed, delay, None)
        self.attempt += 1
        return delay

    def _emit(
        self,
        kind: str,
        exc: BaseException,
        state: str,
        elapsed: float,
        delay: float | None,
        reason: str | None,
    ) -> None:
        try:
            now = time.monotonic()
            threshold = self.settings.leak_threshold
            leases = list(core.leases.values())
            held_long = sum(1 for lease in leases if now - lease.t0 >= threshold)
            name = self.pool if isinstance(self.pool, str) else self.pool.name
            message = str(exc).strip().splitlines()
            extra: dict[str, Any] = {
                "attempt": self.attempt,
                "sleep_s": None if delay is None else round(delay, 4),
                "sqlstate": state,
                "held": len(leases),
                "held_over_threshold": held_long,
                "elapsed_s": round(elapsed, 4),
                "reason": reason,
            }
            detail = f"{type(exc).__name__}: {message[0] if message else ''}".rstrip(": ")
            core.emit(LeakEvent(kind, name, detail=detail, extra=extra))
        except Exception as err:
            internal_error(f"retry.{kind}", err)


def _active() -> Settings | None:
    settings = core.settings
    return settings if settings.enabled and settings.retry_connect else None


def worth_retrying(exc: BaseException) -> bool:
    """Whether a caller's own failed first attempt should go on to :func:`retry_connect`.

    Hooks that make the first attempt themselves (so that a success pays for no retry
    machinery) ask this before entering it: any other error is re-raised where it happened,
    and the user's traceback shows no retry frames of pgleak's. Never raises.
    """
    settings = _active()
    if settings is None:
        return False
    try:
        return classify(exc) is not None
    except Exception:  # an exception type that breaks inspection: not ours to retry
        return False


def succeeded() -> None:
    """A caller's own first attempt (see ``refused`` below) succeeded: the budget's deposit."""
    if BUDGET._tokens is None:  # full: every checkout, nothing to do
        return
    settings = _active()
    if settings is not None:
        BUDGET.succeeded(settings.retry_budget, settings.retry_budget_ratio)


def retry_connect(
    connect: Callable[[], T],
    *,
    pool: PoolRef,
    sleep: Callable[[float], object] = time.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
    budget: RetryBudget | None = None,
    deadline: float | None = None,
    refused: Exception | None = None,
) -> T:
    """Call ``connect()``; retry it with backoff while the server refuses for being full.

    With ``retry_connect`` off or pgleak disabled, one plain call. The driver's exception is
    re-raised unchanged (the same object) when it is not retryable and when pgleak gives up.

    Args:
        connect: Opens one server connection; called once per attempt.
        pool: The pool (its name is computed only if an event is emitted) or a name.
        sleep: Blocks between attempts (``time.sleep``; inside SQLAlchemy's asyncio greenlet,
            one that awaits ``asyncio.sleep``).
        clock: Monotonic seconds, for the deadline.
        rand: ``U[0, 1)``, for the jitter.
        budget: The retry budget (the process-wide one by default).
        deadline: A shorter deadline than ``retry_deadline`` for this call (the caller's own
            wait, when the pool has one), in seconds from now.
        refused: How the caller's own first call of ``connect()`` failed: a hook on every
            checkout (psycopg2's ``getconn``) calls it bare, and comes here only when it
            raised, so that a checkout that succeeds pays for no retry machinery.
    """
    settings = _active()
    if settings is None:
        if refused is not None:
            raise refused
        return connect()
    bucket = BUDGET if budget is None else budget
    start = clock()
    # The retry state is built only after a refusal: some hooks sit on every checkout
    # (psycopg2's getconn), most of which open no connection at all.
    state: _Attempts | None = None
    while True:
        try:
            if refused is not None:  # the caller's own first attempt (see the argument)
                exc, refused = refused, None
                raise exc
            result = connect()
        except Exception as exc:
            if state is None:
                state = _Attempts(settings, pool, clock, rand, bucket, deadline, start)
            delay = state.refused(exc)
            if delay is None:
                raise
            del exc  # no traceback (and its frames) kept alive across the sleep
            sleep(delay)
            continue
        bucket.succeeded(settings.retry_budget, settings.retry_budget_ratio)
        return result


async def aretry_connect(
    connect: Callable[[], Awaitable[T]],
    *,
    pool: PoolRef,
    sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    clock: Callable[[], float] = time.monotonic,
    rand: Callable[[], float] = random.random,
    budget: RetryBudget | None = None,
    deadline: float | None = None,
) -> T:
    """:func:`retry_connect` for coroutines: sleeps with ``asyncio.sleep``, never blocking."""
    settings = _active()
    if settings is None:
        return await connect()
    bucket = BUDGET if budget is None else budget
    start = clock()
    state: _Attempts | None = None
    while True:
        try:
            result = await connect()
        except Exception as exc:
            if state is None:
                state = _Attempts(settings, pool, clock, rand, bucket, deadline, start)
            delay = state.refused(exc)
            if delay is None:
                raise
            del exc
            await sleep(delay)
            continue
        bucket.succeeded(settings.retry_budget, settings.retry_budget_ratio)
        return result
