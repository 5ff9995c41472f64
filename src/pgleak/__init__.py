"""pgleak: find the line of code that leaks PostgreSQL connections.

One line at startup::

    import pgleak
    pgleak.install()

and every connection checked out of a SQLAlchemy engine (sync or asyncio), a psycopg 3 pool
(``psycopg_pool``, sync or async), a psycopg2 pool, an asyncpg pool, or by Django is tracked:
who took it, from which line, for how long. A connection held past ``leak_threshold``, one
garbage-collected without being returned, one still out when its pool closes or the process
exits, and every holder at the moment a pool runs dry are reported on the ``pgleak`` logger.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import logging as _logging  # `pgleak.logging` is a submodule: this name must not clash
import math
import os
import sys
import threading
import time
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from pgleak import _appname, _dump, _guard, _retry, _stack
from pgleak._adapter import Adapter, AdapterUnavailable
from pgleak._cledger import vars_set
from pgleak._core import allowance, core, suppressed
from pgleak._core import context as _context
from pgleak._events import Checkout, LeakEvent, Sink
from pgleak._importhook import PostImportFinder
from pgleak._report import LoggingSink
from pgleak._settings import ConfigError, Settings, build_settings, env_typos
from pgleak._summary import SiteSummary

if TYPE_CHECKING:
    from pgleak import _otel

__all__ = [
    "AdapterUnavailable",
    "Checkout",
    "ConfigError",
    "LeakEvent",
    "Settings",
    "Sink",
    "add_sink",
    "allow_long_hold",
    "checked_out",
    "context",
    "install",
    "installed",
    "pending",
    "remove_sink",
    "settings",
    "summary",
    "suppress",
    "uninstall",
]

__version__ = "0.1.0"

_log = _logging.getLogger("pgleak")
_lock = threading.RLock()
_adapters: dict[str, Adapter] = {}
_finder = PostImportFinder()
_logging_sink = LoggingSink(interval=lambda: core.settings.report_interval)
_summary_sink = SiteSummary(interval=lambda: core.settings.summary_interval)
_installed = False
_exit_registered = False
_fork_registered = False


def install(
    *, tracer_provider: Any = None, meter_provider: Any = None, **settings: Any
) -> Settings:
    """Start tracking connection checkouts in every supported library, now or imported later.

    Idempotent: a second call applies new settings and patches nothing twice.

    Args:
        tracer_provider: The OpenTelemetry ``TracerProvider`` for pgleak's spans, like the
            contrib instrumentations' argument of that name; unset: the global one (nothing
            is recorded until the application sets one).
        meter_provider: The same for pgleak's metrics.
        **settings: Any field of :class:`Settings` (``leak_threshold=10``, ...); unset knobs
            come from ``PGLEAK_*`` environment variables, then the defaults.

    Returns:
        The settings now in force.

    Raises:
        ConfigError: a setting is unknown or its value is invalid.
        AdapterUnavailable: an adapter named in ``integrations`` is unknown, or its library is
            missing or too old (adapters found automatically are skipped quietly instead);
            or ``otel=True`` without ``opentelemetry-api`` installed.

    .. versionadded:: 0.1
    """
    global _installed
    with _lock:
        new = build_settings(settings)
        named = new.integrations
        if named is not None:
            from pgleak.integrations import ADAPTERS

            unknown = [name for name in named if name not in ADAPTERS]
            if unknown:
                raise AdapterUnavailable(
                    f"unknown integration(s) {', '.join(unknown)}; known: {', '.join(ADAPTERS)}"
                )
        observer = _observer(new, tracer_provider, meter_provider)
        _configure(new)
        # Without an SDK to record into, the observer only waits for one, at a checkout's cost
        # of one call; every other hook then sees no observer at all.
        core.observer = core.waker = core.wake_gate = None
        if observer is not None and not observer.asleep:
            core.observer = observer
            core.observer_started()
        elif observer is not None and observer.dormant:
            core.waker = observer.waker()
            core.wake_gate = observer.wake_gate()
        if not new.enabled:
            if _installed:
                _uninstall_locked()
            _configure(new)
            return new
        if _logging_sink not in core.sinks:
            core.sinks.insert(0, _logging_sink)
        if _summary_sink not in core.sinks:
            core.sinks.insert(1, _summary_sink)
        _register_process_hooks()
        _dump.configure(new.dump_signal)
        _warn_env_typos()
        _install_adapters(named)
        _installed = True
        waiting = pending()
        _guard.say(
            _log,
            _logging.INFO,
            "pgleak %s installed: leak_threshold=%ss, stack %s; tracking %s%s",
            __version__,
            f"{new.leak_threshold:g}",
            f"depth {new.stack_depth}" if new.capture_stack else "off",
            ", ".join(sorted(_adapters)) or "nothing yet",
            f"; waiting for the import of {', '.join(waiting)}" if waiting else "",
        )
        _guard.say(_log, _logging.DEBUG, "pgleak settings: %s", new)
        return new


_typos_warned: set[str] = set()


def _warn_env_typos() -> None:
    """Say once per variable that a ``PGLEAK_*`` variable looks like a misspelt setting."""
    for variable, meant in env_typos():
        if variable not in _typos_warned:
            _typos_warned.add(variable)
            _guard.say(
                _log,
                _logging.WARNING,
                "pgleak: %s is not a pgleak setting and is ignored: did you mean %s?",
                variable,
                meant,
            )


def _observer(new: Settings, tracer_provider: Any, meter_provider: Any) -> _otel.Telemetry | None:
    """The OpenTelemetry observer the settings ask for, if the API is there to build it."""
    if not new.enabled or new.otel is False:
        return None
    try:
        from pgleak import _otel
    except ImportError as exc:
        if new.otel:
            raise AdapterUnavailable(
                "otel=True, but opentelemetry-api is not installed (pip install 'pgleak[otel]')"
            ) from exc
        return None
    from pgleak import _otel_fast

    _otel_fast.bind()
    return _otel.Telemetry(__version__, tracer_provider, meter_provider)


def _install_adapters(named: tuple[str, ...] | None) -> None:
    from pgleak.integrations import ADAPTERS

    wanted = list(ADAPTERS) if named is None else list(named)
    for name in wanted:
        module_name = ADAPTERS[name][0]
        if name in _adapters:
            continue
        if module_name in sys.modules:
            _install_one(name, explicit=named is not None)
            continue
        if named is not None and _find_spec(module_name) is None:
            raise AdapterUnavailable(f"integration {name!r}: {module_name} is not installed")
        # Not imported yet: install the moment the application imports it.
        _finder.hooks[module_name] = functools.partial(_install_on_import, name)
    _finder.register()


def _install_on_import(name: str, _module: object) -> None:
    _install_one(name, explicit=False)


def _install_one(name: str, explicit: bool) -> None:
    from pgleak.integrations import load

    with _lock:
        if name in _adapters:
            return
        try:
            adapter = load(name)()
            adapter.install()
        except AdapterUnavailable as exc:
            if explicit:
                raise
            _guard.say(_log, _logging.DEBUG, "pgleak: integration %s skipped: %s", name, exc)
            return
        except Exception as exc:
            # A library version that breaks an adapter must not break the application: an
            # adapter found automatically is skipped (and logged once); one the user named fails.
            if explicit:
                raise AdapterUnavailable(f"integration {name!r} failed to install: {exc}") from exc
            _guard.internal_error(f"install {name}", exc)
            return
        _adapters[name] = adapter


def _find_spec(module: str) -> Any:
    try:
        return importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None


def uninstall() -> None:
    """Remove every patch and listener, restoring the originals exactly; forget all checkouts.

    Safe to call when not installed, and twice.

    .. versionadded:: 0.1
    """
    with _lock:
        _uninstall_locked()


def _uninstall_locked() -> None:
    global _installed
    if _installed:
        # Deliver what is already known (queued reports, counted repeats) before going quiet.
        try:
            core.flush()
        except Exception as exc:
            _guard.internal_error("uninstall.flush", exc)
    _dump.configure(None)
    _finder.hooks.clear()
    _finder.unregister()
    for adapter in reversed(list(_adapters.values())):
        adapter.uninstall()
    _adapters.clear()
    core.observer = core.waker = core.wake_gate = None
    core.watchdog.stop()
    core.clear()
    _retry.BUDGET.reset()
    for sink in (_logging_sink, _summary_sink):
        if sink in core.sinks:
            core.sinks.remove(sink)
    _configure(Settings(enabled=False))
    _installed = False


def _configure(new: Settings) -> None:
    core.configure(new)
    _stack.keep_framework_frames(new.keep_framework_frames)
    _appname.tags.configure(new)


def installed() -> list[str]:
    """The names of the adapters currently installed (see :func:`pending` for the others)."""
    return sorted(_adapters)


def pending() -> list[str]:
    """The adapters waiting for their library to be imported: each installs itself then.

    An application that imports a library after ``install()`` sees it here until the import.
    """
    from pgleak.integrations import ADAPTERS

    waiting = set(_finder.hooks)
    return sorted(
        name
        for name, (module, _) in ADAPTERS.items()
        if module in waiting and name not in _adapters
    )


def settings() -> Settings:
    """The settings in force (disabled defaults before ``install()``)."""
    return core.settings


def summary() -> list[dict[str, Any]]:
    """The call sites that leaked, worst first: what to fix first after a week in production.

    One dict per (call site, pool): ``site``, ``pool``, ``leaks`` (``leak.suspected`` +
    ``leak.collected`` + ``leak.at_exit``), ``counts`` by event kind (``pool.exhausted``: the
    site held a connection when its pool ran dry), ``held_total_s`` and ``held_max_s`` (each
    checkout counted once, at its longest), ``first_seen`` and ``last_seen`` (Unix time).
    Kept since the process started (or forked), across ``install()``/``uninstall()``; logged
    as ``leak.summary`` every ``summary_interval`` and at exit. See docs/events.md.
    """
    return _summary_sink.sites()


def checked_out(with_holder_stack: bool = False) -> list[Checkout]:
    """Every connection checked out right now, oldest first.

    Args:
        with_holder_stack: Also say where each holder is now (costs a look at every thread).
    """
    return core.checked_out(with_holder_stack)


@contextlib.contextmanager
def allow_long_hold(seconds: float) -> Iterator[None]:
    """Let connections be held up to ``seconds`` inside this block without a leak report.

    Applies to checkouts made inside the block and, for the block's duration, to those the
    current thread or task already holds; after the block those get a fresh ``leak_threshold``
    counted from its end. For a nightly batch that legitimately holds a connection for minutes.

    .. versionadded:: 0.1
    """
    if (
        isinstance(seconds, bool)
        or not isinstance(seconds, (int, float))
        or not math.isfinite(seconds)
        or seconds <= 0
    ):
        raise ConfigError(
            "allow_long_hold(seconds=...): expected a positive, finite number of seconds, "
            f"got {seconds!r}"
        )
    seconds = float(seconds)
    vars_set()
    token = allowance.set(seconds)
    start = time.monotonic()
    extended = []
    for lease in core.current_holder_leases():
        extended.append((lease, lease.deadline))
        lease.deadline = max(lease.deadline, start + seconds)
    try:
        yield
    finally:
        allowance.reset(token)
        end = time.monotonic()
        threshold = core.settings.leak_threshold
        for lease, deadline in extended:
            lease.deadline = max(deadline, end + threshold)
            core.deadlines.refile(lease)  # perhaps earlier than the allowance it had


@contextlib.contextmanager
def suppress() -> Iterator[None]:
    """Do not track checkouts made inside this block (pgleak's own connections, for one)."""
    vars_set()
    token = suppressed.set(True)
    try:
        yield
    finally:
        suppressed.reset(token)


@contextlib.contextmanager
def context(label: str) -> Iterator[None]:
    """Label the checkouts made inside this block with what the code is doing.

    Reports then say ``held ... by thread 'web-3' during GET /orders/42``, and every event
    carries it as ``context``. Web integrations set it per request (Django's does); use it for
    your own units of work (``with pgleak.context("job nightly-report"): ...``). Nests: the
    innermost label applies. Cheap: one context variable read per checkout.
    """
    vars_set()
    token = _context.set(label)
    try:
        yield
    finally:
        _context.reset(token)


def add_sink(sink: Sink) -> None:
    """Send every event to ``sink`` as well (after logging)."""
    if sink not in core.sinks:
        core.sinks.append(sink)


def remove_sink(sink: Sink) -> None:
    if sink in core.sinks:
        core.sinks.remove(sink)


def _at_exit() -> None:
    try:
        if core.settings.enabled:
            core.at_exit()
    except Exception as exc:
        _guard.internal_error("at_exit", exc)


def _after_fork_in_child() -> None:
    try:
        core.reset_after_fork()
        _summary_sink.clear()  # the parent's leaks are the parent's to summarise
        _retry.BUDGET.reset()
        _guard.reset()
    except Exception as exc:  # pragma: no cover
        _guard.internal_error("after_fork", exc)


def _register_process_hooks() -> None:
    global _exit_registered, _fork_registered
    if not _exit_registered:
        _exit_registered = True
        # threading's exit hooks run when the main thread ends, before atexit handlers, and so
        # before weakref.finalize's atexit pass, which would return SQLAlchemy's leaked fairies
        # to their pool and make a leak look like a clean return.
        register = getattr(threading, "_register_atexit", None)
        try:
            if register is None:
                raise RuntimeError("no threading._register_atexit")
            register(_at_exit)
        except Exception:
            import atexit

            atexit.register(_at_exit)
    if not _fork_registered and hasattr(os, "register_at_fork"):
        _fork_registered = True
        os.register_at_fork(after_in_child=_after_fork_in_child)
