"""The C half of Telemetry's hot methods (``trace_checkout``, ``ts_*`` in ``pgleak/_c/otel_*.c``).

A traced checkout's observer call was a Python frame (~3,500 instructions) that, in its common
case, only makes the checkout's :class:`pgleak._otel._Trace`. The C ledger makes it itself once
:func:`bind` has handed it the classes it fills and the API's context variable; every other
case (a provider still to look for, metrics, a pool not described yet, ``checked_out`` replaced
or overridden) still calls the method, which stays the one definition of what a checkout
records. The same for the rest of the cycle (``enter``, ``exit``, ``checked_in``, ``_start``:
four more frames, ~12,000 instructions): the C block wrappers and the C ledger's checkin run
their common case themselves once ``trace_span_bind`` has ``pgleak._otel``'s globals (the
span's name, the context key, the clocks as the module has them at each call), and call the
methods in every other case (a call site not kept yet, metrics, a method replaced, another
runtime context). Kept out of ``_otel`` so that module holds the spans, and this the wiring.
"""

from __future__ import annotations

import logging
from typing import Any

from opentelemetry import context as otel_context
from opentelemetry import trace
from opentelemetry.metrics import _internal as _metrics_internal

from pgleak import _core, _otel, _stack
from pgleak._guard import say
from pgleak._otel_metrics import _PoolInfo

_log = logging.getLogger("pgleak")


def _pass(self: Any, arg: Any = None) -> None:
    pass


def _noops() -> tuple[Any, ...]:
    """``NonRecordingSpan.set_attributes`` and ``end`` if both do nothing, else ``()``.

    A span the sampler dropped is a ``NonRecordingSpan``; a traced checkin calls both on it
    (~1,800 instructions with their arguments). The C checkin leaves out a call that finds
    exactly such a function, a body of ``pass`` as the API has it; any other (a replaced
    method, an API whose methods do something) is called.
    """
    found = []
    for name in ("set_attributes", "end"):
        fn = vars(trace.NonRecordingSpan).get(name)
        code = getattr(fn, "__code__", None)
        own = _pass.__code__
        if code is None or (code.co_code, code.co_consts) != (own.co_code, own.co_consts):
            return ()
        found.append(fn)
    return tuple(found)


def bind() -> bool:
    """Hand the C ledger what it needs to make ``_Trace`` itself; ``False`` where it cannot
    (no extension, ``PGLEAK_NO_SPEEDUPS=1``, the Python ledger running, another runtime
    context than the API's context variable, ``Telemetry.checked_out`` not ``_otel``'s own:
    a wrapper in its place must not be taken for it): then the Python method runs, to the same
    end."""
    fast = _stack._fast
    var = _otel._CONTEXT
    if fast is None or not hasattr(fast, "trace_bind") or var is None:
        return False
    if _core._fast_ledger is None:
        return False
    try:
        fast.trace_bind(
            _otel.Telemetry,
            _otel._Trace,
            _PoolInfo,
            _core.PoolHandle,
            var,
            trace,
            _metrics_internal,
        )
    except Exception as exc:
        say(_log, logging.DEBUG, "pgleak: checked_out stays in Python (%s)", exc)
        return False
    if hasattr(fast, "trace_span_bind"):
        try:
            fast.trace_span_bind(otel_context.Context, vars(_otel), _noops())
        except Exception as exc:
            say(_log, logging.DEBUG, "pgleak: the checkout span stays in Python (%s)", exc)
    return True
