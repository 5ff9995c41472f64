"""OpenTelemetry: a span per checkout, leak events on it, and the pool metrics.

Imported only when ``opentelemetry-api`` is importable and the ``otel`` setting allows; pgleak
itself never needs it. One :class:`Telemetry` object is the core's observer
(:class:`pgleak._core.Observer`): the core tells it of every wait, checkout, checkin and
report, and it turns them into spans and metrics. Adapters only mark the two things the core
cannot see - when a caller starts waiting, and the user-facing ``with`` block of a checkout -
so a new adapter gets spans and metrics without knowing about OpenTelemetry.

Why it is built the way it is:

* **Dormant without an SDK.** With the API alone every call is a no-op, but not a free one (a
  no-op ``start_span`` costs about 1 µs). Until the application sets a tracer (or meter)
  provider, the observer is not even installed: the core asks its ``waker`` at each checkout,
  which reads the API's two globals, and the first checkout after ``set_tracer_provider()``
  installs it. Providers passed to ``install()`` are used as they are (the API's no-op ones
  switch that half off).
* **The span is created late, with the right parent.** A checkout happens deep inside the pool
  library, where other instrumentations may have made their own span current (SQLAlchemy's
  ``connect``). So the checkout only records the caller's context and the wait's start; the
  span is started - backdated to the start of the wait - when the user-facing ``with`` block is
  entered (in the user's own context), or, for a bare ``getconn()``/``putconn()``, when the
  connection comes back, under the context recorded at checkout. A report about a checkout
  that has no span yet starts it then.
* **Current only inside the user's block, attached by the outermost wrapper.** The span is made
  current by the adapters' wrappers of the user-facing context managers (``Connection.__enter__``,
  ``pool.connection()``, ``PoolAcquireContext.__aenter__``), after the library's own call
  returns, and detached before the library's exit runs. Never inside pool events: a context
  attached there is undone by any instrumentation wrapper around the library call (see
  ``docs/otel.md``, "With the contrib instrumentations"), and asyncpg and SQLAlchemy's
  asyncio mode return connections from another task, where a context cannot be detached.
* **The holder ends the span, unless the watchdog is reporting on it.** A checkin ends the span
  on the holder's thread; a checkin of a checkout the watchdog has already looked at leaves the
  end to the watchdog, which then ends it after adding its ``leak.suspected`` event (see
  ``Core.checkin``), so an event is never added to an ended span.
* **Metrics read the pools when they are collected.** Connection counts, limits and pending
  requests are observable instruments whose callbacks read each pool's own state (its
  adapter's ``PoolKind.stats``), registered once per meter provider; only the three histograms
  and two counters follow events, and the checkout's wait and use times are queued and handed
  to the SDK at collection (see :class:`pgleak._otel_metrics._Instruments`).
* **Names are hard-coded** (:mod:`pgleak._otel_names`) rather than imported from
  ``opentelemetry-semantic-conventions``, which pins an exact API version;
  ``tests/otel/test_names.py`` checks them against it.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
import re
import time
from collections.abc import Callable
from typing import Any, Final

from opentelemetry import context as otel_context
from opentelemetry import metrics as otel_metrics
from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.context.contextvars_context import ContextVarsRuntimeContext
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from pgleak import _stack
from pgleak._core import Lease, PoolHandle, core
from pgleak._events import (
    AT_EXIT,
    COLLECTED,
    CONNECT_GAVE_UP,
    SUSPECTED,
    Checkout,
    LeakEvent,
)
from pgleak._guard import internal_error
from pgleak._otel_metrics import _instruments, _pool_info, _PoolInfo
from pgleak._otel_names import (
    CODE_FILE_PATH,
    CODE_FUNCTION_NAME,
    CODE_LINE_NUMBER,
    CODE_STACKTRACE,
    DB_NAMESPACE,
    DB_RESPONSE_STATUS_CODE,
    DB_SYSTEM_NAME,
    ERROR_TYPE,
    LEAK,
    LEAK_KIND,
    POOL_NAME,
    POSTGRESQL,
    SCHEMA_URL,
    SCOPE,
    SERVER_ADDRESS,
    SERVER_PORT,
    SPAN_NAME,
)

__all__ = ["SPAN_NAME", "Telemetry"]

_LEAK_KINDS: Final = {SUSPECTED: "suspected", COLLECTED: "collected", AT_EXIT: "at_exit"}
_MESSAGES: Final = {
    COLLECTED: "the connection was garbage-collected without being returned to its pool",
    AT_EXIT: "the connection was still checked out",
}

_monotonic = time.monotonic
_time_ns = time.time_ns
_INTERNAL: Final = SpanKind.INTERNAL
_SITE = re.compile(r"^(?P<file>.*):(?P<line>\d+) in (?P<function>.*)$")


def _epoch_ns(mono: float) -> int:
    """A ``time.monotonic()`` reading as the wall-clock nanoseconds spans are stamped with."""
    return _time_ns() - int((_monotonic() - mono) * 1e9)


def _global_tracer_set() -> bool:
    """Whether the application has set a global tracer provider (an SDK, most likely).

    Reads the API's private global: the public ``get_tracer_provider()`` costs a few hundred
    nanoseconds more per checkout. If the name ever goes away, pgleak assumes an SDK and pays
    the no-op calls instead.
    """
    return getattr(trace, "_TRACER_PROVIDER", True) is not None


def _global_meter_set() -> bool:
    """:func:`_global_tracer_set` for the meter provider."""
    return getattr(_metrics_internal, "_METER_PROVIDER", True) is not None


def _context_var() -> contextvars.ContextVar[Any] | None:
    """The variable the API's default runtime context keeps the current context in, if in use.

    Found through the public API (``attach`` returns that variable's token), so that the
    checkout span's block reads, sets and resets it directly: ``context.attach``,
    ``get_current`` and ``set_span_in_context`` are two to four Python calls each, around the
    same ``ContextVar`` operation. Any other runtime context (``OTEL_PYTHON_CONTEXT``): ``None``,
    and the API is called as documented.
    """
    if not isinstance(getattr(otel_context, "_RUNTIME_CONTEXT", None), ContextVarsRuntimeContext):
        return None
    current = otel_context.get_current()
    token = otel_context.attach(current)
    try:
        var = token.var if isinstance(token, contextvars.Token) else None
    finally:
        otel_context.detach(token)
    if var is None or var.get() is not otel_context.get_current():
        return None
    return var


def _span_key() -> str | None:
    """The key ``trace.set_span_in_context`` files the span under, read off what it returns."""
    marker = trace.INVALID_SPAN
    found = list(trace.set_span_in_context(marker, Context()))
    if len(found) != 1 or trace.get_current_span(Context({found[0]: marker})) is not marker:
        return None
    return found[0]


_SPAN_KEY: Final[str] = _span_key() or ""
#: ``None``: the API's functions are called instead (another runtime context, or an API whose
#: span key could not be read).
_CONTEXT: Final = _context_var() if _SPAN_KEY else None
#: Call-site attributes kept per pool (see ``Telemetry._base``); bounded like ``_stack``'s.
_MAX_SITES: Final = 1_000


class _Trace:
    """One checkout's tracing state, in ``Lease.otel``.

    Made at every traced checkout, by ``Telemetry.checked_out`` alone, without ``__init__``
    (``_new`` and a store per slot: a Python ``__init__`` call costs as much again).

    Attributes:
        parent: The context the checkout was made in: the span's parent when nobody enters a
            ``with`` block for it.
        since: When the caller started waiting (monotonic), if the adapter said.
        span: Started on demand (see the module docstring).
        token, ctx, depth: While the span is current inside the user's block.
        outcome: How the checkout ended, for a span ended later by the watchdog.
        ended: Set once, by whoever ends the span.
        offset: Wall-clock minus monotonic nanoseconds when the span started, which stamps
            its end as well.
    """

    __slots__ = (
        "ctx",
        "depth",
        "ended",
        "offset",
        "outcome",
        "parent",
        "since",
        "span",
        "token",
    )
    ctx: Any
    depth: int
    ended: bool
    offset: int
    outcome: str
    parent: Any
    since: float | None
    span: Span | None
    token: Any


_new = object.__new__


def _detach(token: Any) -> None:
    """Undo ``context.attach``, quietly when it cannot be undone here.

    ``opentelemetry.context.detach`` logs an ERROR with a traceback when the token belongs to
    another ``contextvars.Context`` (a task that copied the user's context); resetting the
    variable directly only raises, which is caught.
    """
    if isinstance(token, contextvars.Token):
        with contextlib.suppress(ValueError, RuntimeError):
            token.var.reset(token)
    else:  # a runtime context other than contextvars (``OTEL_PYTHON_CONTEXT``)
        otel_context.detach(token)


def _site_attributes(site: str | None) -> dict[str, Any]:
    """``code.*`` attributes from a ``"file:line in function"`` stack entry."""
    match = _SITE.match(site or "")
    if match is None:
        return {}
    return {
        CODE_FILE_PATH: match["file"],
        CODE_LINE_NUMBER: int(match["line"]),
        CODE_FUNCTION_NAME: match["function"],
    }


def _stack_text(stack: list[str]) -> str:
    return "\n".join(stack)


def _checkout_event_attributes(event: LeakEvent) -> dict[str, Any]:
    checkout = event.checkout
    attrs: dict[str, Any] = {}
    if checkout is not None:
        attrs["pgleak.checkout_id"] = checkout.checkout_id
        attrs["pgleak.held_s"] = round(checkout.held_s, 6)
        attrs["pgleak.holder"] = checkout.holder
        attrs["pgleak.holder_finished"] = checkout.holder_finished
        if checkout.stack:
            attrs[CODE_STACKTRACE] = _stack_text(checkout.stack)
        if checkout.holder_stack:
            attrs["pgleak.holder_stack"] = _stack_text(checkout.holder_stack)
        if checkout.state:
            attrs["pgleak.state"] = checkout.state
        if checkout.context:
            attrs["pgleak.context"] = checkout.context
    if event.threshold_s is not None and math.isfinite(event.threshold_s):
        attrs["pgleak.threshold_s"] = event.threshold_s
    if event.detail:
        attrs["pgleak.detail"] = event.detail
    return attrs


def _holder_line(holder: Checkout) -> str:
    site = holder.site or "(no stack)"
    return f"{site} (held {holder.held_s:.3f}s by {holder.holder}, checkout #{holder.checkout_id})"


class Telemetry:
    """The core's observer: spans, span events and metrics for every checkout.

    Args:
        version: pgleak's version, for the instrumentation scope.
        tracer_provider: Use this provider; ``None``: the global one (a no-op until the
            application sets one).
        meter_provider: The same for metrics.
    """

    def __init__(
        self, version: str, tracer_provider: Any = None, meter_provider: Any = None
    ) -> None:
        # get_*_provider() also loads a provider named by OTEL_PYTHON_*_PROVIDER.
        tracers = tracer_provider if tracer_provider is not None else trace.get_tracer_provider()
        meters = meter_provider if meter_provider is not None else otel_metrics.get_meter_provider()
        self.tracer = tracers.get_tracer(SCOPE, version, schema_url=SCHEMA_URL)
        self.instruments = _instruments(meters, version)
        # The API's own no-op providers, passed on purpose, switch that half off for good:
        # ``install(tracer_provider=trace.NoOpTracerProvider())`` gives metrics without spans.
        self._tracer_off = isinstance(tracer_provider, trace.NoOpTracerProvider)
        self._meter_off = isinstance(meter_provider, otel_metrics.NoOpMeterProvider)
        self.tracing = not self._tracer_off and (
            tracer_provider is not None or _global_tracer_set()
        )
        self.metering = not self._meter_off and (meter_provider is not None or _global_meter_set())
        self._doze()

    @property
    def asleep(self) -> bool:
        """Nothing to record into (yet): neither a tracer nor a meter provider is set up."""
        return not (self.tracing or self.metering)

    def wake(self) -> Telemetry | None:
        """This observer once the application has set up a provider, else ``None``."""
        self._wake()
        return None if self.asleep else self

    def waker(self) -> Callable[[], Telemetry | None]:
        """``Core.waker``: :meth:`wake`, behind the cheapest test of "still no SDK".

        It runs at every checkout for as long as no SDK is set up, which may be forever.
        """
        known = hasattr(trace, "_TRACER_PROVIDER") and hasattr(_metrics_internal, "_METER_PROVIDER")
        if not known:
            return self.wake  # an API without these globals: ask it the slow way

        def wake(tracing: Any = trace, metering: Any = _metrics_internal) -> Telemetry | None:
            if tracing._TRACER_PROVIDER is None and metering._METER_PROVIDER is None:
                return None
            return self.wake()

        return wake

    def wake_gate(self) -> tuple[Any, str, Any, str] | None:
        """``Core.wake_gate``: the two globals the waker's first test reads (see :meth:`waker`)."""
        if hasattr(trace, "_TRACER_PROVIDER") and hasattr(_metrics_internal, "_METER_PROVIDER"):
            return (trace, "_TRACER_PROVIDER", _metrics_internal, "_METER_PROVIDER")
        return None

    def _wake(self) -> None:
        """Start what the application has set up since (a provider is set only once)."""
        if not self.tracing and not self._tracer_off and _global_tracer_set():
            self.tracing = True
        if not self.metering and not self._meter_off and _global_meter_set():
            self.metering = True
        self._doze()

    def _doze(self) -> None:
        """Which global provider a checkout still has to look for (see :meth:`checked_out`)."""
        self._watch_tracer = not (self.tracing or self._tracer_off)
        self._watch_meter = not (self.metering or self._meter_off)
        self.dormant = self._watch_tracer or self._watch_meter

    # -- the hot path ------------------------------------------------------------------------
    #
    # A traced checkout runs checked_out() and checked_in(), and enter() and exit() when a
    # ``with`` block surrounds it: one call each, beside the SDK's own. What does not change
    # from one checkout to the next (the pool's attributes and the call site's) is built once
    # (_base), and the API's context functions give way to the ContextVar they wrap (_CONTEXT).

    def checked_out(self, lease: Lease, since: float | None) -> None:
        # Dormant: a provider may still be set. _wake()'s tests, inlined: with spans and no
        # metrics (or the other way round) for good, this runs at every checkout.
        if self.dormant and (
            (self._watch_tracer and getattr(trace, "_TRACER_PROVIDER", True) is not None)
            or (
                self._watch_meter
                and getattr(_metrics_internal, "_METER_PROVIDER", True) is not None
            )
        ):
            self._wake()
        info = lease.pool.observed
        if type(info) is not _PoolInfo:
            info = _pool_info(lease.pool)
        if self.tracing:
            var = _CONTEXT
            state = lease.otel = _new(_Trace)
            state.parent = otel_context.get_current() if var is None else var.get()
            state.since = since
            state.span = state.token = state.ctx = None
            state.depth = state.offset = 0
            state.outcome = "returned"
            state.ended = False
            if info.span is None:
                self._pool_attributes(lease)  # while the connection is surely open
        if self.metering and since is not None:
            t0 = lease.t0
            self.instruments.later(
                self.instruments.wait_time, t0 - since if t0 > since else 0.0, info.metric
            )

    def checked_in(self, lease: Lease, late: bool, discarded: bool) -> None:
        end = lease.t_in
        if self.metering and end is not None:
            t0 = lease.t0
            self.instruments.later(
                self.instruments.use_time,
                end - t0 if end > t0 else 0.0,
                _pool_info(lease.pool).metric,
            )
        state = lease.otel
        if state is None:
            return
        if discarded:
            state.outcome = "discarded"
        if late or state.ended:
            return
        # _finish(), its common case inlined: this is every traced checkin.
        state.ended = True
        span = state.span
        if span is None:
            span = self._start(lease, state, state.parent)
        state.parent = None  # the user's context is not kept alive by a finished checkout
        if end is None:
            end = _monotonic()
        t0 = lease.t0
        # No is_recording() first: a span that does not record ignores its attributes anyway.
        span.set_attributes(
            {"pgleak.held_s": end - t0 if end > t0 else 0.0, "pgleak.outcome": state.outcome}
        )
        span.end(state.offset + int(end * 1e9))  # the API's end(end_time)

    def settled(self, lease: Lease) -> None:
        state = lease.otel
        if state is not None:
            self._finish(lease, state, lease.t_in)

    def enter(self, lease: Lease) -> None:
        """The user's block for ``lease`` begins: its span becomes the current span."""
        state = lease.otel
        if state is None or state.ended:
            return
        if state.token is not None:  # the same connection's block, nested
            state.depth += 1
            return
        # Started here, it is parented to the user's own context, not to whatever the pool
        # library's instrumentation had made current when the checkout happened.
        var = _CONTEXT
        span = state.span
        if var is None:
            if span is None:
                span = self._start(lease, state, None)
            ctx = state.ctx = trace.set_span_in_context(span)
            state.token = otel_context.attach(ctx)
        else:
            current = var.get()
            if span is None:
                span = self._start(lease, state, current)
            # trace.set_span_in_context(span) and context.attach(), without their four calls
            ctx = state.ctx = Context(current, **{_SPAN_KEY: span})
            state.token = var.set(ctx)
        state.depth = 1

    def exit(self, lease: Lease) -> None:
        """The user's block for ``lease`` ends: what was current before it is again."""
        state = lease.otel
        if state is None or state.token is None:
            return
        state.depth -= 1
        if state.depth > 0:
            return
        token, ctx = state.token, state.ctx
        state.token = state.ctx = None
        # Someone attached a context since and has not detached it: resetting ours now would
        # pull theirs out from under them.
        var = _CONTEXT
        if var is None:
            if otel_context.get_current() is ctx:
                _detach(token)
        elif var.get() is ctx:
            try:  # noqa: SIM105 - _detach(), inlined; contextlib.suppress is three calls more
                var.reset(token)
            except (ValueError, RuntimeError):  # a token of another contextvars.Context
                pass

    # -- spans -------------------------------------------------------------------------------

    def _start(self, lease: Lease, state: _Trace, parent: Any) -> Span:
        since, t0 = state.since, lease.t0
        # The pool's and the call site's attributes, as kept for this pool and line.
        raw = lease.raw
        info = lease.pool.observed
        hit = None
        if type(info) is _PoolInfo:
            code = raw[0] if raw else None
            hit = info.sites.get((id(code), raw[1]) if raw else None)
            if hit is not None and hit[0] is not code:
                hit = None  # an id reused by another code object
        attrs = hit[1].copy() if hit is not None else self._base(lease)
        attrs["pgleak.checkout_id"] = lease.id
        # lease.holder(), inlined
        context, task = lease.context, lease.task
        if task is None:
            holder = f"thread {lease.thread[1]!r}"
        else:
            holder = f"task {task[1]!r} (thread {lease.thread[1]!r})"
        if context:
            attrs["pgleak.holder"] = f"{holder} during {context}"
            attrs["pgleak.context"] = context
        else:
            attrs["pgleak.holder"] = holder
        start = t0
        if since is not None:
            attrs["pgleak.waited_s"] = t0 - since if t0 > since else 0.0
            start = since
        # The attributes go in with the start: the SDK takes them in one pass (and hands them
        # to the sampler), where set_attributes() afterwards takes the span's lock and checks
        # each one again. Backdated to the start of the wait; the arguments by position, in
        # the API's order (name, context, kind, attributes, links, start_time).
        offset = state.offset = _time_ns() - int(_monotonic() * 1e9)
        span = self.tracer.start_span(
            SPAN_NAME, parent, _INTERNAL, attrs, None, offset + int(start * 1e9)
        )
        state.span = span
        return span

    def _base(self, lease: Lease) -> dict[str, Any]:
        """A new dict of the span attributes that the pool and the line of ``lease`` decide.

        Kept per pool and line (``_PoolInfo.sites``, keyed by the checkout's innermost
        recorded frame) once the pool's server is known, and only when that frame is the line
        itself, since :func:`pgleak._stack.site` may look further out.
        """
        attrs = dict(self._pool_attributes(lease))
        raw = lease.raw
        site = _stack.site(raw)
        if site is not None:
            attrs[CODE_FILE_PATH], attrs[CODE_LINE_NUMBER], attrs[CODE_FUNCTION_NAME] = site
        info = _pool_info(lease.pool)
        if info.span is not None and len(info.sites) < _MAX_SITES:
            if not raw:
                info.sites[None] = (None, attrs)
            elif _stack.site(raw[:2]) == site:
                info.sites[id(raw[0]), raw[1]] = (raw[0], attrs)
        return dict(attrs)

    def _pool_attributes(
        self, lease: Lease | None, pool: PoolHandle | None = None
    ) -> dict[str, Any]:
        """The pool's span attributes, with the server's address read off a lent connection.

        Read once per pool, at a checkout (a connection may be closed by the time it is back),
        and kept once the server is known.
        """
        handle = lease.pool if lease is not None else pool
        assert handle is not None
        info = _pool_info(handle)
        if info.span is not None:
            return info.span
        attrs: dict[str, Any] = {DB_SYSTEM_NAME: POSTGRESQL, POOL_NAME: info.metric[POOL_NAME]}
        kind = core.kinds.get(handle.kind)
        if kind is None or kind.target is None:
            info.span = attrs  # nothing more will ever be known
            return attrs
        conn = lease.ref() if lease is not None and lease.ref is not None else None
        if conn is None:
            return attrs  # maybe from the next checkout
        try:
            host, port, database = kind.target(conn)
        except Exception as exc:
            internal_error(f"{handle.kind}.otel_target", exc)
            return attrs
        if host is None:
            return attrs
        attrs[SERVER_ADDRESS] = host
        if port:
            attrs[SERVER_PORT] = port
        if database:
            attrs[DB_NAMESPACE] = database
        info.span = attrs
        return attrs

    def _finish(
        self,
        lease: Lease,
        state: _Trace,
        end: float | None,
        error: tuple[str, str] | None = None,
    ) -> None:
        if state.ended:
            return
        state.ended = True
        span = state.span if state.span is not None else self._start(lease, state, state.parent)
        state.parent = None  # the user's context is not kept alive by a finished checkout
        end = _monotonic() if end is None else end
        if span.is_recording():
            held = max(0.0, end - lease.t0)
            if error is None:
                span.set_attributes({"pgleak.held_s": held, "pgleak.outcome": state.outcome})
            else:
                span.set_attributes(
                    {"pgleak.held_s": held, "pgleak.outcome": error[0], ERROR_TYPE: error[0]}
                )
                span.set_status(Status(StatusCode.ERROR, error[1]))
        span.end(end_time=_epoch_ns(end))

    # -- reports -----------------------------------------------------------------------------

    def lease_event(self, lease: Lease, event: LeakEvent, when: float) -> None:
        kind = event.event
        leak = _LEAK_KINDS.get(kind)
        if leak is None:
            return  # leak.returned: the span ends when the watchdog settles the checkout
        if self.dormant:
            self._wake()
        if self.metering:
            self.instruments.leaks.add(
                1, {POOL_NAME: _pool_info(lease.pool).metric[POOL_NAME], LEAK_KIND: leak}
            )
        state = lease.otel
        if state is None or state.ended:
            return
        span = state.span if state.span is not None else self._start(lease, state, state.parent)
        if span.is_recording():
            span.add_event(kind, _checkout_event_attributes(event), timestamp=_epoch_ns(when))
            span.set_attribute(LEAK, kind)
        if kind != SUSPECTED:
            message = _MESSAGES[kind]
            if event.detail:
                message = f"{message} ({event.detail})"
            self._finish(lease, state, when, error=(kind, message))

    def exhausted(self, pool: PoolHandle, event: LeakEvent) -> None:
        """A wait timed out: a failed checkout's span, with every holder, and a timeout."""
        if self.dormant:
            self._wake()
        if self.metering:
            self.instruments.timeouts.add(1, _pool_info(pool).metric)
        if not self.tracing:
            return
        waiter = event.waiter
        waited = waiter.held_s if waiter is not None else math.nan
        now = _time_ns()
        start = now - int(waited * 1e9) if math.isfinite(waited) else now
        span = self.tracer.start_span(SPAN_NAME, kind=SpanKind.INTERNAL, start_time=start)
        if span.is_recording():
            attrs = dict(self._pool_attributes(None, pool))
            if waiter is not None:
                attrs.update(_site_attributes(waiter.site))
                attrs["pgleak.holder"] = waiter.holder
            if math.isfinite(waited):
                attrs["pgleak.waited_s"] = waited
            attrs["pgleak.outcome"] = "timeout"
            attrs[ERROR_TYPE] = event.event
            span.set_attributes(attrs)
            details: dict[str, Any] = {
                "pgleak.holders": len(event.holders),
                "pgleak.holder_sites": [_holder_line(h) for h in event.holders],
            }
            if waiter is not None and waiter.stack:
                details[CODE_STACKTRACE] = _stack_text(waiter.stack)
            if event.detail:
                details["pgleak.detail"] = event.detail
            span.add_event(event.event, details, timestamp=now)
            message = f"no connection within {waited:.3f}s" if math.isfinite(waited) else ""
            message = f"{message}; {len(event.holders)} held".lstrip("; ")
            span.set_status(Status(StatusCode.ERROR, message))
        span.end(end_time=now)

    def pool_event(self, event: LeakEvent) -> None:
        """A refused connection attempt: an event on the caller's current span.

        When nothing is being traced there, a short span of its own carries it, so that the
        refusal is not lost.
        """
        if self.dormant:
            self._wake()
        if not self.tracing:
            return
        extra = dict(event.extra or {})
        attrs: dict[str, Any] = {DB_SYSTEM_NAME: POSTGRESQL, POOL_NAME: event.pool}
        if extra.get("sqlstate"):
            attrs[DB_RESPONSE_STATUS_CODE] = extra["sqlstate"]
        for key in ("attempt", "sleep_s", "elapsed_s", "held", "held_over_threshold", "reason"):
            value = extra.get(key)
            if value is not None:
                attrs[f"pgleak.{key}"] = value
        if event.detail:
            attrs["pgleak.detail"] = event.detail
        current = trace.get_current_span()
        if current.is_recording():
            current.add_event(event.event, attrs)
            return
        span = self.tracer.start_span(event.event, kind=SpanKind.INTERNAL)
        if span.is_recording():
            span.set_attributes(attrs)
            span.add_event(event.event, attrs)
            if event.event == CONNECT_GAVE_UP:
                span.set_attribute(ERROR_TYPE, event.event)
                span.set_status(Status(StatusCode.ERROR, event.detail or event.event))
        span.end()

    def connected(self, pool: PoolHandle, seconds: float) -> None:
        if self.dormant:
            self._wake()
        if self.metering:
            self.instruments.create_time.record(seconds, _pool_info(pool).metric)


# -- metrics ------------------------------------------------------------------------------------
