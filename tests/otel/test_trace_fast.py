"""The C ledger makes a traced checkout's ``_Trace`` itself (``trace_checkout`` in
``pgleak/_speedups.c``, bound by ``pgleak._otel_fast``): it must be the one
``Telemetry.checked_out`` makes, slot for slot, and leave every other case to that method."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import _internal as _metrics_internal
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor

import pgleak
from pgleak import _core, _otel, _otel_fast
from pgleak._core import Core, Lease, core
from pgleak._otel_metrics import _pool_info
from tests.otel.conftest import SpanCollector

pytestmark = pytest.mark.skipif(
    _core._fast_ledger is None or not _otel_fast.bind(),
    reason="the C ledger is not built here or PGLEAK_NO_SPEEDUPS=1 turned it off: "
    "Telemetry.checked_out runs, and the rest of the suite tests that",
)


class Conn:
    pass


class Pool:
    pass


@pytest.fixture
def traced() -> Iterator[SpanCollector]:
    """pgleak with a tracer provider and no meter provider: the C path's common case."""
    collector = SpanCollector()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(collector))
    pgleak.install(leak_threshold=60, report_interval=60, tracer_provider=provider)
    try:
        yield collector
    finally:
        pgleak.uninstall()
        provider.shutdown()


def _calls_of(fn: Any, run: Callable[[], Any]) -> tuple[int, Any]:
    """How many times the Python function ``fn`` ran during ``run()``, and its result."""
    code, seen = fn.__code__, [0]

    def profile(frame: Any, event: str, arg: Any) -> None:
        if event == "call" and frame.f_code is code:
            seen[0] += 1

    sys.setprofile(profile)
    try:
        result = run()
    finally:
        sys.setprofile(None)
    return seen[0], result


def _state(lease: Lease) -> dict[str, Any]:
    state = lease.otel
    assert type(state) is _otel._Trace
    return {name: getattr(state, name) for name in _otel._Trace.__slots__}


def _described(handle: Any) -> None:
    # The first checkout of a pool reads its span attributes (the Python method's part).
    conn = Conn()
    lease = core.checkout(handle, conn, True, None)
    assert lease is not None
    assert _pool_info(handle).span is not None
    core.checkin(lease)


@pytest.mark.parametrize("since", [None, 1234.5])
def test_the_c_trace_is_the_python_one(traced: SpanCollector, since: float | None) -> None:
    observer = core.observer
    assert isinstance(observer, _otel.Telemetry)
    handle = core.pool(Pool(), "test")
    _described(handle)
    conn_c, conn_py = Conn(), Conn()
    token = otel_context.attach(otel_context.set_value("k", "v"))
    try:
        ran, made_c = _calls_of(
            _otel.Telemetry.checked_out, lambda: core.checkout(handle, conn_c, True, since)
        )
        assert ran == 0  # made in C
        ran, made_py = _calls_of(
            _otel.Telemetry.checked_out,
            lambda: Core.checkout(core, handle, conn_py, True, since),
        )
        assert ran == 1
        parent = otel_context.get_current()
    finally:
        otel_context.detach(token)
    c, py = _state(made_c), _state(made_py)
    assert c == py
    assert c["parent"] is parent
    assert c["since"] == since
    assert (c["span"], c["token"], c["ctx"], c["depth"], c["offset"]) == (None, None, None, 0, 0)
    assert (c["outcome"], c["ended"]) == ("returned", False)
    # and the spans they end in are alike
    core.checkin(made_c)
    core.checkin(made_py)
    spans = traced.spans()
    assert len(spans) == 3
    ours, theirs = dict(spans[1].attributes or {}), dict(spans[2].attributes or {})
    for attrs in (ours, theirs):
        attrs.pop("pgleak.checkout_id")
        attrs.pop("pgleak.held_s")
        attrs.pop("code.line.number")
        waited = attrs.pop("pgleak.waited_s", None)
        assert (waited is None) == (since is None)
    assert ours == theirs
    assert spans[1].parent == spans[2].parent


def test_every_other_case_is_the_methods(
    traced: SpanCollector, monkeypatch: pytest.MonkeyPatch
) -> None:
    observer = core.observer
    assert isinstance(observer, _otel.Telemetry)
    handle = core.pool(Pool(), "test")
    conn = Conn()

    def methods_runs(since: float | None = None) -> int:
        ran, lease = _calls_of(
            _otel.Telemetry.checked_out, lambda: core.checkout(handle, conn, True, since)
        )
        assert type(lease.otel) is _otel._Trace
        core.checkin(lease)
        return ran

    assert methods_runs() == 1  # the pool not described yet
    assert methods_runs() == 0
    # metrics with a wait to record
    monkeypatch.setattr(observer, "metering", True)
    monkeypatch.setattr(observer, "instruments", _Instruments())
    assert methods_runs(1.0) == 1
    assert methods_runs(None) == 0  # nothing to record without a wait
    monkeypatch.undo()
    # a provider still looked for: asked after (in C) while it is not set, woken once it is
    monkeypatch.setattr(observer, "dormant", True)
    monkeypatch.setattr(observer, "_watch_meter", True)
    monkeypatch.setattr(observer, "metering", False)
    monkeypatch.setattr(observer, "_doze", lambda: None)
    monkeypatch.setattr(_metrics_internal, "_METER_PROVIDER", None)
    assert methods_runs() == 0
    monkeypatch.setattr(_metrics_internal, "_METER_PROVIDER", object())
    monkeypatch.setattr(_otel, "_global_meter_set", lambda: True)
    assert methods_runs() == 1
    assert observer.metering is True  # woken by the method
    monkeypatch.undo()
    assert methods_runs() == 0
    # the method replaced, on the instance or the class
    told: list[Any] = []
    monkeypatch.setattr(observer, "checked_out", lambda lease, since: told.append(lease))
    lease = core.checkout(handle, conn, True, None)
    assert lease is not None
    assert told == [lease]
    assert lease.otel is None
    core.checkin(lease)
    monkeypatch.undo()
    original = _otel.Telemetry.checked_out
    monkeypatch.setattr(
        _otel.Telemetry, "checked_out", lambda self, lease, since: told.append(since)
    )
    lease = core.checkout(handle, conn, True, 2.0)
    assert lease is not None
    assert told[1:] == [2.0]
    assert lease.otel is None
    core.checkin(lease)
    monkeypatch.undo()
    assert _otel.Telemetry.checked_out is original
    assert methods_runs() == 0


@pytest.mark.parametrize("change", ["tracing", "tracer_provider", "meter_provider"])
def test_a_setting_changed_after_the_c_path_read_it_is_seen(
    traced: SpanCollector, monkeypatch: pytest.MonkeyPatch, change: str
) -> None:
    """The C path keeps what it read of the observer's attributes, its class and the API's
    provider globals while their dicts are unchanged: a change after it has read them (and
    kept the answers) sends the next checkout to the method."""
    observer = core.observer
    assert isinstance(observer, _otel.Telemetry)
    handle = core.pool(Pool(), "test")
    conn = Conn()

    def methods_runs() -> tuple[int, Any]:
        ran, lease = _calls_of(
            _otel.Telemetry.checked_out, lambda: core.checkout(handle, conn, True, 1.0)
        )
        core.checkin(lease)
        return ran, lease.otel

    # dormant, looking for the other provider (what install(tracer_provider=...) leaves)
    monkeypatch.setattr(observer, "_doze", lambda: None)
    monkeypatch.setattr(observer, "dormant", True)
    monkeypatch.setattr(observer, "_watch_meter", True)
    monkeypatch.setattr(observer, "_watch_tracer", change == "tracer_provider")
    monkeypatch.setattr(_metrics_internal, "_METER_PROVIDER", None)
    monkeypatch.setattr(trace, "_TRACER_PROVIDER", None)
    methods_runs()  # the pool described
    for _ in range(2):  # read, then kept
        assert methods_runs()[0] == 0
    if change == "tracing":
        monkeypatch.setattr(observer, "tracing", False)
        assert methods_runs() == (1, None)  # the method's: no span to trace
    else:
        module = trace if change == "tracer_provider" else _metrics_internal
        monkeypatch.setattr(module, f"_{change.upper()}", object())
        monkeypatch.setattr(observer, "_wake", lambda: None)  # stays dormant: no change
        ran, state = methods_runs()
        assert ran == 1  # the method's first test, to wake it
        assert type(state) is _otel._Trace
    monkeypatch.undo()
    assert methods_runs()[0] == 0


class _Instruments:
    wait_time = use_time = object()

    def later(self, instrument: Any, value: float, attributes: Any) -> None:
        pass


def test_a_method_replaced_before_install_is_not_taken_for_the_original(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``trace_bind`` keeps ``Telemetry.checked_out`` to tell when it was replaced: bound while
    a wrapper stood in its place, the C path took the wrapper for the original and never called
    it. Only the method ``pgleak._otel`` defines is bound; the wrapper runs at every checkout."""
    told: list[Any] = []
    original = _otel.Telemetry.checked_out

    def wrapper(self: _otel.Telemetry, lease: Lease, since: float | None) -> None:
        told.append(lease)
        original(self, lease, since)

    monkeypatch.setattr(_otel.Telemetry, "checked_out", wrapper)
    assert _otel_fast.bind() is False
    provider = TracerProvider()
    pgleak.install(leak_threshold=60, report_interval=60, tracer_provider=provider)
    try:
        handle = core.pool(Pool(), "test")
        conn = Conn()
        leases = []
        for _ in range(3):  # the first describes the pool; the others are the C path's case
            lease = core.checkout(handle, conn, True, None)
            assert lease is not None
            assert type(lease.otel) is _otel._Trace
            core.checkin(lease)
            leases.append(lease)
        assert told == leases
    finally:
        pgleak.uninstall()
        provider.shutdown()
    monkeypatch.undo()
    assert _otel_fast.bind() is True
