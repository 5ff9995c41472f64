"""The C code starts, makes current, leaves and ends a traced checkout's span itself
(``ts_enter``, ``ts_exit``, ``ts_checked_in``, ``ts_start`` in ``pgleak/_speedups.c``, bound by
``pgleak._otel_fast``): the same spans, the same ``_Trace`` state and the same current context
as ``Telemetry.enter`` / ``exit`` / ``checked_in`` / ``_start``, which still run in every case
the C code leaves to them."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import sys
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import trace
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import pgleak
from pgleak import _core, _otel, _otel_fast, _stack
from pgleak._core import Lease, core
from pgleak._otel_metrics import _PoolInfo
from pgleak._otel_names import CODE_LINE_NUMBER
from tests.conftest import Server
from tests.integrations.kits import all_kits
from tests.otel.conftest import SpanCollector

pytestmark = pytest.mark.skipif(
    _core._fast_ledger is None or not _otel_fast.bind() or not hasattr(_stack._fast, "trace_block"),
    reason="the C ledger is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: "
    "Telemetry's methods run, and the rest of the suite tests that",
)

METHODS = ("enter", "exit", "checked_in", "_start")
#: Their code, as pgleak._otel defines them (whatever a test has put on the class since).
CODES = {getattr(_otel.Telemetry, name).__code__: name for name in METHODS}
#: Fixed clocks (pgleak._otel's globals): the span's timestamps are then known exactly.
NOW_NS, MONO = 1_700_000_000_123_456_789, 5000.25
OFFSET = NOW_NS - int(MONO * 1e9)


class Conn:
    pass


class Pool:
    pass


class Traced(SpanCollector):
    tracer: trace.Tracer


@pytest.fixture
def traced() -> Iterator[Traced]:
    """pgleak with a tracer provider, no meter provider and fixed clocks: the C path's case."""
    collector = Traced()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collector))
    collector.tracer = provider.get_tracer("test")
    clocks = _otel._time_ns, _otel._monotonic
    _otel._time_ns, _otel._monotonic = (lambda: NOW_NS), (lambda: MONO)
    pgleak.install(leak_threshold=60, report_interval=60, tracer_provider=provider)
    try:
        yield collector
    finally:
        pgleak.uninstall()
        provider.shutdown()
        _otel._time_ns, _otel._monotonic = clocks


def _runs(run: Callable[[], Any]) -> tuple[dict[str, int], Any]:
    """How many times each of Telemetry's four methods ran during ``run()``, and its result."""
    codes = CODES
    seen = dict.fromkeys(METHODS, 0)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            seen[codes[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return seen, result


def _in_python(monkeypatch: pytest.MonkeyPatch) -> None:
    """Telemetry's four methods replaced by wrappers of themselves: the C code leaves them to
    Python, where the originals run."""
    for name in METHODS:
        original = getattr(_otel.Telemetry, name)

        def wrapper(self: Any, *args: Any, _original: Any = original) -> Any:
            return _original(self, *args)

        monkeypatch.setattr(_otel.Telemetry, name, wrapper)


def _var() -> contextvars.ContextVar[Any]:
    assert _otel._CONTEXT is not None
    return _otel._CONTEXT


def _tell(observer: Any, lease: Lease, entering: bool) -> None:
    _stack._fast.trace_block(observer, lease, entering)


#: The connections lent: kept alive, so that none is reported garbage-collected.
_LENT: list[Conn] = []


def _checkout(handle: Any, since: float | None) -> Lease:
    conn = Conn()
    _LENT.append(conn)
    lease = core.checkout(handle, conn, True, since)  # one line: one kept call site
    assert lease is not None
    return lease


def _state(lease: Lease) -> dict[str, Any]:
    state = lease.otel
    assert type(state) is _otel._Trace
    return {name: getattr(state, name) for name in _otel._Trace.__slots__}


def _cycle(handle: Any, since: float | None, label: str | None) -> dict[str, Any]:
    """A checkout, its block (entered twice, nested) and its checkin, as the C wrappers tell
    the observer; what was current at each step and the state after each."""
    observer = core.observer
    seen: dict[str, Any] = {}
    with pgleak.context(label) if label else contextlib.nullcontext():
        lease = _checkout(handle, since)
    outer = trace.get_current_span()
    _tell(observer, lease, True)
    seen["inside"] = trace.get_current_span()
    seen["entered"] = _state(lease)
    _tell(observer, lease, True)
    seen["nested"] = _state(lease)["depth"]
    _tell(observer, lease, False)
    seen["still"] = trace.get_current_span()
    _tell(observer, lease, False)
    seen["left"] = _state(lease)
    seen["after"] = trace.get_current_span() is outer
    core.checkin(lease)
    seen["ended"] = _state(lease)
    seen["lease"] = lease
    return seen


def _expected_times(span: ReadableSpan, lease: Lease, since: float | None) -> None:
    start = lease.t0 if since is None else since
    assert span.start_time == OFFSET + int(start * 1e9)
    assert lease.t_in is not None
    assert span.end_time == OFFSET + int(lease.t_in * 1e9)


def _attributes(span: ReadableSpan, lease: Lease) -> dict[str, Any]:
    attrs = dict(span.attributes or {})
    assert attrs.pop("pgleak.checkout_id") == lease.id
    assert lease.t_in is not None
    assert attrs.pop("pgleak.held_s") == max(0.0, lease.t_in - lease.t0)
    assert attrs.pop("pgleak.holder") == lease.holder()
    since = lease.otel.since
    if since is not None:
        assert attrs.pop("pgleak.waited_s") == max(0.0, lease.t0 - since)
    return {key: (type(value), value) for key, value in attrs.items()}


def _both_ways(run: Callable[[], Any]) -> tuple[Any, Any]:
    """``run()`` in C, then with the Python methods; asserts which ran, each time."""
    ran, made_c = _runs(run)
    assert ran == dict.fromkeys(METHODS, 0)
    with pytest.MonkeyPatch.context() as monkeypatch:
        _in_python(monkeypatch)
        ran, made_py = _runs(run)
    assert ran == {"enter": 2, "exit": 2, "checked_in": 1, "_start": 1}
    return made_c, made_py


def _compare(traced: Traced, made: tuple[Any, Any], since: float | None) -> None:
    """The two cycles' spans, states and current contexts, alike but for the lease's own."""
    spans = traced.spans()
    assert len(spans) == 2
    views = []
    for span, seen in zip(spans, made, strict=True):
        lease = seen["lease"]
        _expected_times(span, lease, since)
        assert seen["inside"] is lease.otel.span
        assert seen["still"] is lease.otel.span
        assert seen["after"] is True
        assert seen["nested"] == 2
        entered, left, ended = seen["entered"], seen["left"], seen["ended"]
        assert entered["span"] is lease.otel.span
        assert entered["ctx"] is not None
        assert entered["token"] is not None
        assert trace.get_current_span(entered["ctx"]) is lease.otel.span
        assert entered["offset"] == OFFSET
        for state in (entered, left, ended):
            state.pop("span")
            state.pop("parent")
        entered.pop("ctx")
        entered.pop("token")
        views.append(
            (
                span.name,
                span.kind,
                span.parent,
                span.status.status_code,
                _attributes(span, lease),
                entered,
                left,
                ended,
            )
        )
    assert views[0] == views[1]


@pytest.mark.parametrize("waited", [False, True])
@pytest.mark.parametrize("label", [None, "nightly export"])
def test_the_c_span_is_the_python_one(traced: Traced, waited: bool, label: str | None) -> None:
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)  # the pool described, the call site kept (the methods' part)
    _cycle(handle, 1.0, None)
    traced.clear()
    since = time.monotonic() - 0.25 if waited else None
    with traced.tracer.start_as_current_span("request"):
        made = _both_ways(lambda: _cycle(handle, since, label))
    _compare(traced, made, since)
    for span in traced.spans():
        attrs = span.attributes or {}
        assert type(attrs.get("pgleak.waited_s")) is (float if waited else type(None))
        holder = "thread 'MainThread'" + (f" during {label}" if label else "")
        assert attrs["pgleak.holder"] == holder
        assert attrs.get("pgleak.context") == label


@pytest.mark.parametrize("waited", [False, True])
@pytest.mark.parametrize("label", [None, "nightly export"])
def test_the_c_spans_attributes_come_in_the_python_order(
    traced: Traced, waited: bool, label: str | None
) -> None:
    """The C path copies the site's attributes with the checkout's keys already in place (a
    dict of the right size): the span's attributes are the same keys in the same order."""
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)
    _cycle(handle, 1.0, None)
    traced.clear()
    since = time.monotonic() - 0.25 if waited else None
    _both_ways(lambda: _cycle(handle, since, label))
    c, python = (list(span.attributes or {}) for span in traced.spans())
    assert c == python
    assert c[-2:] == ["pgleak.held_s", "pgleak.outcome"]
    assert ("pgleak.waited_s" in c) is waited
    assert ("pgleak.context" in c) is (label is not None)


def test_a_site_whose_attributes_changed_is_copied_as_it_is_now(traced: Traced) -> None:
    handle = core.pool(Pool(), "test")
    for since in (None, 1.0, None, 1.0):  # both of the C path's copies made
        _cycle(handle, since, None)
    info = handle.observed
    assert type(info) is _PoolInfo
    for _code, kept in info.sites.values():
        kept["app.tier"] = "gold"
        kept.pop(CODE_LINE_NUMBER, None)
    traced.clear()
    for since in (None, 1.0):
        _both_ways(functools.partial(_cycle, handle, since, None))
    spans = traced.spans()
    assert len(spans) == 4
    for span in spans:
        assert (span.attributes or {})["app.tier"] == "gold"
        assert CODE_LINE_NUMBER not in (span.attributes or {})
    assert list(spans[0].attributes or {}) == list(spans[1].attributes or {})
    assert list(spans[2].attributes or {}) == list(spans[3].attributes or {})


@pytest.mark.parametrize("mono", [1e12, -1e12, 7])
def test_times_beyond_64_bits_or_of_another_type_are_pythons_arithmetic(
    traced: Traced, monkeypatch: pytest.MonkeyPatch, mono: float
) -> None:
    """The C path adds nanoseconds in 64 bits while they are far from its limits: a clock
    that puts the offset beyond them (or an int clock) gives the times Python's ints give."""
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)
    _cycle(handle, 1.0, None)
    monkeypatch.setattr(_otel, "_monotonic", lambda: mono)
    offset = NOW_NS - int(mono * 1e9)
    traced.clear()
    made = _both_ways(lambda: _cycle(handle, 1.0, None))
    for span, seen in zip(traced.spans(), made, strict=True):
        lease = seen["lease"]
        assert span.start_time == offset + int(1.0 * 1e9)
        assert span.end_time == offset + int(lease.t_in * 1e9)


def test_times_own_clocks_are_read_in_c_and_a_clock_replaced_since_is_called(
    traced: Traced, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With ``time.time_ns`` and ``time.monotonic`` as pgleak._otel's clocks, the C path reads
    both clocks itself (no call): the span's offset is the one the calls would give, within
    the time between readings. A clock put in their place afterwards is called at the next
    span, as the method calls it."""
    monkeypatch.setattr(_otel, "_time_ns", time.time_ns)
    monkeypatch.setattr(_otel, "_monotonic", time.monotonic)
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)
    traced.clear()
    before = time.time_ns() - int(time.monotonic() * 1e9)
    ran, seen = _runs(lambda: _cycle(handle, 1.0, None))
    after = time.time_ns() - int(time.monotonic() * 1e9)
    assert ran == dict.fromkeys(METHODS, 0)
    lease = seen["lease"]
    offset = lease.otel.offset
    assert type(offset) is int
    # each reading is a wall clock minus a later monotonic one: at most the time between
    assert min(before, after) - 50_000_000 <= offset <= max(before, after) + 50_000_000
    (span,) = traced.spans()
    assert span.start_time == offset + int(1.0 * 1e9)
    assert span.end_time == offset + int(lease.t_in * 1e9)
    # replaced since: called from the next span on
    fixed_ns: Callable[[], int] = lambda: NOW_NS  # noqa: E731
    fixed_mono: Callable[[], float] = lambda: MONO  # noqa: E731
    clocks: list[tuple[Callable[[], int], Callable[[], float]]] = [
        (fixed_ns, time.monotonic),
        (time.time_ns, fixed_mono),
    ]
    for time_ns, monotonic in clocks:
        monkeypatch.setattr(_otel, "_time_ns", time_ns)
        monkeypatch.setattr(_otel, "_monotonic", monotonic)
        traced.clear()
        before = time_ns() - int(monotonic() * 1e9)
        ran, seen = _runs(lambda: _cycle(handle, 1.0, None))
        after = time_ns() - int(monotonic() * 1e9)
        assert ran == dict.fromkeys(METHODS, 0)
        offset = seen["lease"].otel.offset
        assert min(before, after) - 50_000_000 <= offset <= max(before, after) + 50_000_000
    monkeypatch.setattr(_otel, "_monotonic", lambda: MONO)
    monkeypatch.setattr(_otel, "_time_ns", lambda: NOW_NS)
    ran, seen = _runs(lambda: _cycle(handle, 1.0, None))
    assert seen["lease"].otel.offset == OFFSET


def test_a_dropped_spans_no_op_methods_are_not_called_and_any_other_is(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A span the sampler dropped is a ``NonRecordingSpan``, whose ``set_attributes`` and
    ``end`` do nothing: the C checkin leaves those two calls out. A method put in their place,
    on the class or on the span, is called with what the Python method passes it."""
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF

    assert len(_otel_fast._noops()) == 2
    provider = TracerProvider(sampler=ALWAYS_OFF)
    monkeypatch.setattr(_otel, "_time_ns", lambda: NOW_NS)
    monkeypatch.setattr(_otel, "_monotonic", lambda: MONO)
    pgleak.install(leak_threshold=60, report_interval=60, tracer_provider=provider)
    try:
        handle = core.pool(Pool(), "test")
        _cycle(handle, None, None)
        noops = {vars(trace.NonRecordingSpan)[name].__code__ for name in ("set_attributes", "end")}
        called = [0]

        def profile(frame: Any, event: str, arg: Any) -> None:
            if event == "call" and frame.f_code in noops:
                called[0] += 1

        sys.setprofile(profile)
        try:
            seen = _cycle(handle, 1.0, None)
        finally:
            sys.setprofile(None)
        assert type(seen["lease"].otel.span) is trace.NonRecordingSpan
        assert called == [0]
        told: list[tuple[str, Any]] = []
        monkeypatch.setattr(
            trace.NonRecordingSpan, "end", lambda self, at=None: told.append(("end", at))
        )
        seen = _cycle(handle, 1.0, None)
        lease = seen["lease"]
        assert told == [("end", OFFSET + int(lease.t_in * 1e9))]
        monkeypatch.undo()
        monkeypatch.setattr(_otel, "_time_ns", lambda: NOW_NS)
        monkeypatch.setattr(_otel, "_monotonic", lambda: MONO)
        told.clear()
        lease = _checkout(handle, None)
        _tell(core.observer, lease, True)
        span = lease.otel.span
        span.set_attributes = lambda attrs: told.append(("set_attributes", attrs))
        _tell(core.observer, lease, False)
        core.checkin(lease)
        assert lease.t_in is not None
        held = lease.t_in - lease.t0 if lease.t_in > lease.t0 else 0.0
        assert told == [("set_attributes", {"pgleak.held_s": held, "pgleak.outcome": "returned"})]
    finally:
        pgleak.uninstall()
        provider.shutdown()


def test_in_a_task_too(traced: Traced) -> None:
    handle = core.pool(Pool(), "test")

    async def cycle() -> Any:
        return _cycle(handle, None, None)

    def in_a_task() -> Any:
        return asyncio.run(cycle())

    in_a_task()
    in_a_task()
    traced.clear()
    made = _both_ways(in_a_task)
    _compare(traced, made, None)
    for span in traced.spans():
        holder = str((span.attributes or {})["pgleak.holder"])
        assert holder.startswith("task 'Task-")
        assert holder.endswith(" (thread 'MainThread')")


def test_a_checkin_without_a_block_starts_the_span_under_the_checkouts_context(
    traced: Traced,
) -> None:
    handle = core.pool(Pool(), "test")
    observer = core.observer
    for _ in range(2):
        core.checkin(_checkout(handle, None))
    traced.clear()

    def bare() -> Any:
        with traced.tracer.start_as_current_span("request") as request:
            lease = _checkout(handle, None)
        core.checkin(lease)
        return request, lease

    ran, (request, lease) = _runs(bare)
    assert ran == {"enter": 0, "exit": 0, "checked_in": 0, "_start": 0}
    [span] = traced.spans()
    assert span.parent is not None
    assert span.parent.span_id == request.get_span_context().span_id
    _expected_times(span, lease, None)
    assert lease.otel.parent is None
    assert lease.otel.ended is True
    assert observer is core.observer


def test_a_late_checkin_leaves_the_span_to_the_watchdog(traced: Traced) -> None:
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)
    _cycle(handle, None, None)
    traced.clear()

    def late() -> dict[str, Any]:
        lease = _checkout(handle, None)
        _tell(core.observer, lease, True)
        _tell(core.observer, lease, False)
        lease.flagged = True  # the watchdog has looked at it
        core.checkin(lease)
        return _state(lease)

    ran, state = _runs(late)
    assert ran == dict.fromkeys(METHODS, 0)
    assert state["ended"] is False
    assert state["span"] is not None
    assert traced.spans() == []


def test_a_block_left_in_another_context_resets_nothing(traced: Traced) -> None:
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)
    observer = core.observer
    results = []
    for python in (False, True):
        with pytest.MonkeyPatch.context() as monkeypatch:
            if python:
                _in_python(monkeypatch)
            lease = _checkout(handle, None)
            _tell(observer, lease, True)
            span, token = trace.get_current_span(), lease.otel.token
            # a copy of this context (a task's): the token is not its own, and reset refuses
            contextvars.copy_context().run(_tell, observer, lease, False)
            results.append((trace.get_current_span() is span, _state(lease)["token"]))
            _var().reset(token)
            core.checkin(lease)
    assert results == [(True, None), (True, None)]


def test_every_other_case_is_the_methods(traced: Traced, monkeypatch: pytest.MonkeyPatch) -> None:
    observer = core.observer
    handle = core.pool(Pool(), "test")
    _cycle(handle, None, None)

    def methods(run: Callable[[], Any] | None = None) -> dict[str, int]:
        return _runs(run or (lambda: _cycle(handle, None, None)))[0]

    assert methods() == dict.fromkeys(METHODS, 0)
    # a call site not kept yet: _start alone
    conn = Conn()
    ran = methods(lambda: core.checkin(core.checkout(handle, conn, True, None)))  # type: ignore[arg-type]
    assert ran == {"enter": 0, "exit": 0, "checked_in": 0, "_start": 1}
    # another runtime context than the API's context variable
    monkeypatch.setattr(_otel, "_CONTEXT", None)
    assert methods() == {"enter": 2, "exit": 2, "checked_in": 1, "_start": 1}
    monkeypatch.undo()
    # metrics to record: checked_in alone
    monkeypatch.setattr(observer, "metering", True)
    monkeypatch.setattr(observer, "instruments", _Instruments())
    assert methods() == {"enter": 0, "exit": 0, "checked_in": 1, "_start": 0}
    monkeypatch.undo()
    # a method replaced on the instance or the class is the one called
    told: list[Any] = []
    monkeypatch.setattr(observer, "enter", lambda lease: told.append(("enter", lease)))
    lease = _checkout(handle, None)
    _tell(observer, lease, True)
    assert told == [("enter", lease)]
    assert lease.otel.token is None
    core.checkin(lease)
    monkeypatch.undo()
    monkeypatch.setattr(_otel.Telemetry, "exit", lambda self, lease: told.append(("exit", lease)))
    lease = _checkout(handle, None)
    _tell(observer, lease, True)
    _tell(observer, lease, False)
    assert told[1:] == [("exit", lease)]
    assert lease.otel.token is not None  # still current: the replacement did not leave it
    _var().reset(lease.otel.token)
    core.checkin(lease)
    monkeypatch.undo()
    # _start replaced: every method is Python's
    start = _otel.Telemetry._start
    monkeypatch.setattr(_otel.Telemetry, "_start", lambda *args: start(*args))  # noqa: PLW0108
    assert methods() == {"enter": 2, "exit": 2, "checked_in": 1, "_start": 1}
    monkeypatch.undo()
    assert methods() == dict.fromkeys(METHODS, 0)
    # not a lease the C ledger made, or one without a span: nothing to do either way
    lease = _checkout(handle, None)
    lease.otel = None
    _tell(observer, lease, True)
    _tell(observer, lease, False)
    core.checkin(lease)


class _Instruments:
    wait_time = use_time = object()

    def later(self, instrument: Any, value: float, attributes: Any) -> None:
        pass


@pytest.mark.parametrize("kit", all_kits(), ids=str)
def test_the_pool_apis_reach_it(kit: Any, pg: Server, traced: Traced) -> None:
    """Every pool API's block and checkin: after the first checkout at a line, no Python
    method of Telemetry runs, and the span is current inside the block, under the caller's."""
    seen: list[tuple[Any, Any]] = []

    async def ause(pool: Any) -> None:
        async with kit.use(pool) as conn:
            seen.append((trace.get_current_span(), pgleak.checked_out()))
            await kit.query(conn)

    def use(pool: Any) -> None:
        with kit.use(pool) as conn:
            seen.append((trace.get_current_span(), pgleak.checked_out()))
            kit.query(conn)

    async def arun() -> dict[str, int]:
        pool = kit.open(pg, 2, 5.0)
        if asyncio.iscoroutine(pool):
            pool = await pool
        try:
            await ause(pool)
            traced.clear()
            with traced.tracer.start_as_current_span("request"):
                seen.clear()
                return await _aruns(lambda: ause(pool))
        finally:
            await kit.close(pool)

    if kit.is_async:
        ran = asyncio.run(arun())
    else:
        pool = kit.open(pg, 2, 5.0)
        try:
            use(pool)
            traced.clear()
            with traced.tracer.start_as_current_span("request"):
                seen.clear()
                ran, _ = _runs(lambda: use(pool))
        finally:
            kit.close(pool)
    assert ran == dict.fromkeys(METHODS, 0)
    [span] = traced.spans()
    [request] = traced.spans("request")
    [(current, _out)] = seen
    if not kit.name.startswith("psycopg2"):  # putconn(getconn()): no block, never current
        assert current.get_span_context().span_id == span.context.span_id
    assert span.parent is not None
    assert span.parent.span_id == request.context.span_id


async def _aruns(make: Callable[[], Any]) -> dict[str, int]:
    """:func:`_runs` of an awaitable ``make()``."""
    codes = CODES
    seen = dict.fromkeys(METHODS, 0)

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code in codes:
            seen[codes[frame.f_code]] += 1

    sys.setprofile(profile)
    try:
        await make()
    finally:
        sys.setprofile(None)
    return seen
