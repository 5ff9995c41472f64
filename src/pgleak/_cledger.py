"""Binding the C ledger (``pgleak._speedups``' ``checkout``/``checkin``) to ``pgleak._core``.

The C functions work on ``_core``'s own objects (``Lease`` and ``_ConnRef`` slots, its context
variables, its clock, its dicts) and hand every rare case to ``Core``'s Python methods, so they
are given those objects once, at import, by name; the C side checks each. Kept out of
``_core`` so that the ledger's module holds the ledger, and this the wiring; ``_core`` calls
:func:`bind` at its end, when every name it passes exists.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Any

from pgleak import _stack
from pgleak._guard import say

_log = logging.getLogger("pgleak")


def _unread() -> None:
    """Without the extension the Python ledger reads the variables at every checkout."""


#: Called before any of ``_core``'s context variables (``suppressed``, ``allowance``,
#: ``context``) is set: until the first call, the C ledger takes their defaults at a checkout
#: without reading them (three context lookups less for a process that never sets them).
#: Whoever sets one of them calls this first; setting one without it would go unseen.
vars_set: Callable[[], None] = getattr(_stack._fast, "vars_set", None) or _unread


def bind(ns: dict[str, Any]) -> Any:
    """The C ledger (``checkout``/``checkin``), given ``pgleak._core``'s namespace ``ns``;
    ``None`` without it.

    Without the extension, with ``PGLEAK_NO_SPEEDUPS=1``, or if it refuses what it is given
    (a slot renamed there and not in C), the Python methods run: same ledger, same reports.
    """
    fast = _stack._fast
    if fast is None or not hasattr(fast, "bind"):
        return None
    try:
        fast.bind(
            {
                "Lease": ns["Lease"],
                "_ConnRef": ns["_ConnRef"],
                "suppressed": ns["suppressed"],
                "allowance": ns["allowance"],
                "context": ns["context"],
                "get_running_loop": ns["_get_running_loop"],
                "current_task": ns["_current_task"],
                "monotonic": ns["_monotonic"],
                "thread_identity": ns["_thread_identity"],
                "core_globals": ns,
                "capture_from": _stack.capture_from,
                "capture_in_task": _stack._capture_in_task,
                "skip_cache": _stack._skip_cache,
                "pseudo_codes": _stack._pseudo_codes,
                "checkout_py": ns["Core"].checkout,
                "checkin_py": ns["Core"].checkin,
                "RETURNED": ns["RETURNED"],
                "parent_greenlet_frame": _stack._parent_greenlet_frame,
                "add_task_chain": _stack._add_task_chain,
            }
        )
    except Exception as exc:
        say(_log, logging.DEBUG, "pgleak: the C ledger is off (%s); the Python one runs", exc)
        return None
    return fast
