"""pytest plugin: a test that leaks a connection fails at teardown, naming the line.

Registered through the ``pytest11`` entry point, so every pytest run in an environment with
pgleak loads it; it stays inert (options, an ini key, a marker and the ``pgleak_events``
fixture, nothing installed or patched) until asked for with ``--pgleak``,
``--pgleak-threshold`` or ``pgleak = true`` in the ini file. See ``docs/pytest.md``.

What is "the test's": checkouts made while the test runs - during its call and the set-up
and teardown of its function-scoped fixtures, in any thread or task - but not those made while
a fixture of a wider scope (session, package, module, class) is being set up, even lazily in
the middle of the test's set-up. Lease ids only grow, so one watermark taken when the test's
set-up begins (:meth:`Core.mark`) and the ids made inside wider-scope fixture set-ups are all
the plugin keeps per test. The check runs as the item's first finalizer, so after every
function-scoped fixture is torn down and before any wider-scoped one is.

Django: a thread's connection is one ``DatabaseWrapper`` that Django keeps open for the
thread's next use, and pytest-django wraps each test in a transaction on the test thread's
connection, so its use span routinely outlives the test that opened it. A Django span still
open at the end of a test is the test's leak only when its holder thread has finished (nothing
is left that could close it); a Django connection garbage-collected during the test always is.
"""

from __future__ import annotations

import collections
import gc
import json
import threading
from collections.abc import Generator, Iterator
from typing import TYPE_CHECKING, Any

import pytest

if TYPE_CHECKING:
    from pgleak._core import Lease
    from pgleak._events import LeakEvent
    from pgleak.testing import EventCapture

__all__ = ["LeakGuard", "pgleak_events"]

_GUARD = "pgleak-guard"
#: The key of the ``user_properties`` entry that carries a test's leaks (a JSON string) from
#: an xdist worker to the controller's summary and report.
_PROPERTY = "pgleak"
#: The same for the leaks of a test marked ``pgleak_allow``: listed, not failed.
_ALLOWED = "pgleak_allowed"
#: Leaks of one test shown in full in its failure; a loop that leaks 1,000 gives a count.
_MAX_SHOWN = 5


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("pgleak", "pgleak: fail tests that leak PostgreSQL connections")
    group.addoption(
        "--pgleak",
        action="store_true",
        default=False,
        help="fail a test that leaves a connection checked out or lets one be garbage-collected",
    )
    group.addoption(
        "--pgleak-threshold",
        type=float,
        default=None,
        metavar="S",
        help="also fail a test that held one connection longer than S seconds (implies --pgleak)",
    )
    group.addoption(
        "--pgleak-report",
        default=None,
        metavar="PATH",
        help="write every leaking test and its events to PATH as JSON (implies --pgleak)",
    )
    parser.addini("pgleak", "turn the pgleak leak check on (like --pgleak)", type="bool")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "pgleak_allow(reason=None): pgleak's leak check does not fail this test",
    )
    threshold = config.getoption("pgleak_threshold")
    report = config.getoption("pgleak_report")
    wanted = config.getoption("pgleak") or config.getini("pgleak")
    if wanted or threshold is not None or report is not None:
        if threshold is not None and not threshold > 0:
            raise pytest.UsageError(f"--pgleak-threshold: expected seconds > 0, got {threshold}")
        config.pluginmanager.register(LeakGuard(config, threshold, report), _GUARD)


@pytest.fixture
def pgleak_events(request: pytest.FixtureRequest) -> Iterator[EventCapture]:
    """The pgleak events emitted while this test runs, to assert on.

    With the leak check on, the test's own capture; without it, pgleak is installed for this
    test only (unless the suite installed it already) and removed afterwards.
    """
    guard = request.config.pluginmanager.get_plugin(_GUARD)
    window = guard.window if isinstance(guard, LeakGuard) else None
    if window is not None:
        yield window.capture
        return
    import pgleak
    from pgleak.testing import capture_events

    own = not pgleak.settings().enabled
    if own:
        pgleak.install()
    try:
        with capture_events() as events:
            yield events
    finally:
        if own:
            pgleak.uninstall()


class _Window:
    """One test's share of the ledger: its watermark, its exclusions, its events."""

    def __init__(self, item: pytest.Item) -> None:
        from pgleak._core import core
        from pgleak.testing import EventCapture

        self.item = item
        self.scheduled = False
        #: Ids of leases made while a wider-scoped fixture was being set up.
        self.excluded: set[int] = set()
        self.capture = EventCapture()
        self.thread = threading.get_ident()
        core.sinks.append(self.capture)
        self.mark = core.mark()

    def close(self) -> None:
        from pgleak._core import core

        if self.capture in core.sinks:
            core.sinks.remove(self.capture)

    def ours(self, checkout_id: int) -> bool:
        return checkout_id > self.mark and checkout_id not in self.excluded

    def leaks(self, threshold: float | None) -> list[LeakEvent]:
        """What the test leaked: reported events about its checkouts, then those still out."""
        from pgleak._core import core
        from pgleak._events import AT_EXIT, COLLECTED, SUSPECTED, LeakEvent

        gc.collect()  # reference cycles holding a lost connection: found now, not later
        core.deliver()
        found: dict[int, LeakEvent] = {}
        kinds = {COLLECTED, AT_EXIT} | ({SUSPECTED} if threshold is not None else set())
        for event in list(self.capture.events):
            c = event.checkout
            if (
                event.event in kinds
                and c is not None
                and self.ours(c.checkout_id)
                and (c.checkout_id not in found or event.event != SUSPECTED)
            ):
                found[c.checkout_id] = event
        detail = f"the end of test {self.item.nodeid}"
        for lease in core.open_leases():
            if not self.ours(lease.id) or not _left_out(lease):
                continue
            checkout = core.describe(lease, with_holder_stack=lease.thread[0] != self.thread)
            found[lease.id] = LeakEvent(
                AT_EXIT, lease.pool.name, checkout, threshold_s=lease.threshold, detail=detail
            )
        return [found[key] for key in sorted(found)]


def _left_out(lease: Lease) -> bool:
    """Whether a lease still in the ledger at the end of a test is a leak (see the docstring)."""
    import math

    if lease.deadline == math.inf:
        return False  # a checkout the pool returns by itself (asyncpg's pool.fetch())
    if lease.ref is not None and lease.ref() is None:
        return False  # collected: its leak.collected is the report
    if lease.pool.kind == "django":
        thread = lease.thread[2]()
        return thread is None or not thread.is_alive()
    return True


#: Test-runner packages whose frames sit between a test's line and the pool library: left out
#: of checkout stacks, so the test's (or the fixture's) line is the one shown.
_RUNNERS = ("_pytest", "pluggy", "pytest_asyncio", "pytest_django", "xdist", "execnet")


def _skip_test_runner_frames() -> None:
    import os
    import sys

    from pgleak import _stack

    for name in _RUNNERS:
        module = sys.modules.get(name)
        path = getattr(module, "__file__", None)
        if path:
            _stack.register_library(os.path.dirname(path))


class LeakGuard:
    """The active plugin: installs pgleak for the run and checks every test at its end."""

    def __init__(self, config: pytest.Config, threshold: float | None, report: str | None) -> None:
        import pgleak

        self.config = config
        self.threshold = threshold
        self.report = config.invocation_params.dir / report if report else None
        self.window: _Window | None = None
        #: (nodeid, events as dicts) of every leaking test, from this process or xdist workers.
        self.leaking: list[tuple[str, list[dict[str, Any]]]] = []
        #: (nodeid, {"reason", "events"}) of every test whose leaks ``pgleak_allow`` excused.
        self.allowed: list[tuple[str, dict[str, Any]]] = []
        self._installed_here = not pgleak.settings().enabled
        _skip_test_runner_frames()
        if self._installed_here or threshold is not None:
            try:
                pgleak.install(**({} if threshold is None else {"leak_threshold": threshold}))
            except pgleak.ConfigError as exc:  # a bad PGLEAK_* variable: say so, no traceback
                raise pytest.UsageError(f"pgleak: {exc}") from exc

    def pytest_unconfigure(self, config: pytest.Config) -> None:
        import pgleak

        if self._installed_here:
            pgleak.uninstall()

    # Old-style hook wrappers (``hookwrapper=True``): the module is imported by every pytest in
    # an environment with pgleak, including versions that predate ``wrapper=True``.

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_setup(self, item: pytest.Item) -> Generator[None, object, None]:
        if self.window is not None:
            self.window.close()
        self.window = _Window(item)
        yield

    @pytest.hookimpl(hookwrapper=True)
    def pytest_fixture_setup(
        self, fixturedef: pytest.FixtureDef[Any], request: pytest.FixtureRequest
    ) -> Generator[None, object, None]:
        window = self.window
        if window is None or fixturedef.scope == "function":
            if window is not None and not window.scheduled:
                # Before this fixture's own finalizer: the check runs after its teardown.
                self._schedule(window)
            yield
            return
        from pgleak._core import core

        before = {lease.id for lease in core.open_leases()}
        yield  # an old-style wrapper: the fixture's exception, if any, is not raised here
        window.excluded.update(lease.id for lease in core.open_leases() if lease.id not in before)

    @pytest.hookimpl(hookwrapper=True, tryfirst=True)
    def pytest_runtest_teardown(self, item: pytest.Item) -> Generator[None, object, None]:
        window = self.window
        if window is not None and not window.scheduled:
            self._schedule(window)  # no function-scoped fixture: nothing to wait for
        yield
        if window is not None:
            window.close()
        self.window = None

    def _schedule(self, window: _Window) -> None:
        try:
            window.item.addfinalizer(lambda: self._check(window))
        except AssertionError:
            return  # the item never got set up (a collector's set-up failed): nothing ran
        window.scheduled = True

    def _check(self, window: _Window) -> None:
        from pgleak._guard import internal_error
        from pgleak._report import format_event

        try:
            leaks = window.leaks(self.threshold)
        except Exception as exc:  # pgleak's own fault must not fail the user's test
            internal_error("pytest.check", exc)
            leaks = []
        window.close()
        if not leaks:
            return
        data = [event.as_dict() for event in leaks]
        allow = window.item.get_closest_marker("pgleak_allow")
        if allow is not None:
            reason = allow.kwargs.get("reason", allow.args[0] if allow.args else None)
            entry = {"reason": None if reason is None else str(reason), "events": data}
            window.item.user_properties.append((_ALLOWED, json.dumps(entry)))
            return
        window.item.user_properties.append((_PROPERTY, json.dumps(data)))
        nodeid = window.item.nodeid
        text = "\n\n".join(format_event(event) for event in leaks[:_MAX_SHOWN])
        if len(leaks) > _MAX_SHOWN:
            text += f"\n\n... and {len(leaks) - _MAX_SHOWN} more (--pgleak-report has them all)"
        pytest.fail(f"pgleak: {nodeid} leaked {len(leaks)} connection(s):\n{text}", pytrace=False)

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        if report.when != "teardown":
            return
        for name, value in report.user_properties:
            if name == _PROPERTY:
                self.leaking.append((report.nodeid, json.loads(str(value))))
            elif name == _ALLOWED:
                self.allowed.append((report.nodeid, json.loads(str(value))))

    def pytest_terminal_summary(self, terminalreporter: Any) -> None:
        if not (self.leaking or self.allowed) or hasattr(self.config, "workerinput"):
            return
        terminalreporter.section(f"pgleak: {len(self.leaking)} test(s) leaked connections")
        for nodeid, events in self.leaking:
            sites = collections.Counter(
                (event["event"], event["stack"][-1] if event["stack"] else "?") for event in events
            )
            for (kind, site), count in sites.items():
                times = f" ({count} times)" if count > 1 else ""
                terminalreporter.line(f"{nodeid}: {kind} at {site}{times}")
        for nodeid, entry in self.allowed:
            why = f": {entry['reason']}" if entry["reason"] else ""
            count = len(entry["events"])
            terminalreporter.line(f"{nodeid}: {count} leak(s) allowed by pgleak_allow{why}")

    def pytest_sessionfinish(self, session: pytest.Session) -> None:
        if self.report is None or hasattr(self.config, "workerinput"):
            return
        tests = [{"nodeid": nodeid, "events": events} for nodeid, events in self.leaking]
        allowed = [{"nodeid": nodeid, **entry} for nodeid, entry in self.allowed]
        body = {"leaking_tests": len(tests), "leaks": sum(len(t["events"]) for t in tests)}
        self.report.parent.mkdir(parents=True, exist_ok=True)
        text = json.dumps({**body, "tests": tests, "allowed": allowed}, indent=2)
        self.report.write_text(text + "\n")
