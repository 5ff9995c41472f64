"""The rule that pgleak never breaks the application, in one place.

Every piece of pgleak's own bookkeeping that runs on a user's thread (adapter hooks, finalizers,
sinks) catches ``Exception`` and hands it here. The first failure at each site is logged with its
traceback on ``pgleak.internal``; later ones at the same site are only counted, so a bug in pgleak
cannot flood the logs either. If logging itself is what fails (a handler that raises), the
failure is written once to stderr and otherwise dropped.

The test suite reads :data:`swallowed` to turn any swallowed failure into a test failure, the way
sentry-python's suite re-raises what its guard caught.
"""

from __future__ import annotations

import collections
import logging
import sys
import threading

__all__ = ["internal_error", "say", "swallowed"]

_log = logging.getLogger("pgleak.internal")

#: The most recent failures pgleak swallowed, as ``(site, exception)``; bounded.
swallowed: collections.deque[tuple[str, BaseException]] = collections.deque(maxlen=100)

_counts: dict[str, int] = {}
_lock = threading.Lock()
_stderr_written = False


def internal_error(site: str, exc: BaseException) -> None:
    """Record a failure inside pgleak at ``site``; log it the first time. Never raises."""
    global _stderr_written
    try:
        swallowed.append((site, exc))
        with _lock:
            count = _counts.get(site, 0) + 1
            if len(_counts) < 1000 or site in _counts:
                _counts[site] = count
        if count != 1:
            return
        try:
            _log.warning(
                "pgleak: internal error in %s (reported once; pgleak carries on): %s: %s",
                site,
                type(exc).__name__,
                exc,
                exc_info=(type(exc), exc, exc.__traceback__),
            )
        except Exception:
            if not _stderr_written:
                _stderr_written = True
                sys.stderr.write(
                    f"pgleak: internal error in {site}: {type(exc).__name__}: {exc} "
                    "(and logging it failed too; further ones are dropped)\n"
                )
    except Exception:  # pragma: no cover - the last line of defence
        pass


def say(logger: logging.Logger, level: int, msg: str, *args: object) -> None:
    """``logger.log(level, msg, *args)`` that never raises.

    A handler or filter the application put on the ``pgleak`` logger may raise (logging only
    shields ``emit`` failures that call ``handleError``); pgleak's own lines, at install, on a
    checkout or at uninstall, must not carry that into the application's call.
    """
    try:
        logger.log(level, msg, *args)
    except Exception as exc:
        internal_error("logging", exc)


def reset() -> None:
    """Forget what was logged, so a test (or a forked child) starts clean."""
    global _stderr_written
    with _lock:
        _counts.clear()
    swallowed.clear()
    _stderr_written = False
