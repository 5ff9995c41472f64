"""Opt-in: what is checked out right now, logged when the process gets a signal.

A running process that is filling the server cannot always be restarted to find out why;
``dump_signal="SIGUSR2"`` (``PGLEAK_DUMP_SIGNAL=SIGUSR2``) makes ``kill -USR2 <pid>`` log one
``pool.checked_out`` record: every connection checked out, oldest first, with the line that
took it and where its holder is now (the same snapshot as :func:`pgleak.checked_out`).

The handler only sets a flag; the watchdog, which looks at least once a second while a dump
signal is set, writes the record on its own thread. A signal handler runs between two bytecodes
of whatever the main thread was doing: taking any lock there (an ``Event``'s, logging's,
pgleak's) could deadlock on one that the interrupted code holds. A handler the application had
for that signal is called after pgleak's, and is put back by ``uninstall()``. Signals can only
be handled from the main thread: installed from another, it is logged once and skipped.
"""

from __future__ import annotations

import logging
import signal
import threading
from typing import Any

from pgleak._guard import internal_error, say

__all__ = ["CHECKED_OUT", "configure", "due", "write"]

CHECKED_OUT = "pool.checked_out"
_log = logging.getLogger("pgleak")
_installed: tuple[int, Any] | None = None  # (signal number, the handler it replaced)
_asked = False
#: How often the watchdog looks for a request at the least, while a dump signal is set.
CHECK_EVERY = 1.0


def _handler(signum: int, frame: Any) -> None:
    global _asked
    _asked = True  # a plain store: no lock in a signal handler
    previous = _installed[1] if _installed is not None else None
    if callable(previous):
        previous(signum, frame)


def configure(name: str | None) -> None:
    """Handle ``name`` (``"SIGUSR2"``), or no signal (``None``), from now on."""
    global _installed
    number = getattr(signal, name, None) if name else None
    if _installed is not None and _installed[0] != number:
        try:
            signal.signal(_installed[0], _installed[1])
        except Exception as exc:
            internal_error("dump_signal", exc)
        _installed = None
    if number is None or _installed is not None:
        return
    if threading.current_thread() is not threading.main_thread():
        say(_log, logging.WARNING, "pgleak: dump_signal=%s ignored: not the main thread", name)
        return
    try:
        _installed = (number, signal.signal(number, _handler))
    except Exception as exc:
        internal_error("dump_signal", exc)
        return
    from pgleak._core import core

    core.watchdog.start()  # here, not in the handler: starting a thread takes locks


def due() -> bool:
    """Whether a dump was asked for since the last one (the watchdog calls this each pass)."""
    global _asked
    if not _asked:
        return False
    _asked = False
    return True


def write(checkouts: list[Any]) -> None:
    """Log the snapshot as one record: a readable list, and ``record.pgleak["holders"]``."""
    lines = [f"{CHECKED_OUT}: {len(checkouts)} connection(s) checked out now, oldest first:"]
    for n, c in enumerate(checkouts, 1):
        lines.append(
            f"  #{n} held {c.held_s:.1f}s by {c.holder} from pool {c.pool}, "
            f"checked out at {c.site or '?'}"
        )
        if c.holder_stack:
            lines.append(f"    holder is now at {c.holder_stack[-1]}")
    try:
        _log.warning(
            "%s",
            "\n".join(lines),
            extra={
                "pgleak": {
                    "event": CHECKED_OUT,
                    "holders": [c.as_dict() for c in checkouts],
                    "pool": None,
                    "held_s": None,
                    "holder": None,
                    "stack": [],
                }
            },
        )
    except Exception as exc:  # a handler that raises: pgleak's problem, not the app's
        internal_error("dump_signal.write", exc)
