"""pgleak and the wrapt-based OpenTelemetry instrumentations, patching the same attributes, in
every order of ``install()`` / ``uninstall()`` against ``instrument()`` / ``uninstrument()``.

OpenTelemetry's ``unwrap()`` only removes a wrapt proxy, by setting the attribute to the
proxy's ``__wrapped__``. pgleak puts its wrappers beneath any proxy it finds and takes them out
from beneath any put on top (``Adapter.patch`` / ``Adapter.uninstall``), so that each side
removes its own layer and nothing else (docs/design.md, "Co-existing with wrapt-based
instrumentations"). After every step each test checks what the attribute holds and what
actually runs: the instrumentation's spans appear exactly while it is instrumented, pgleak's
tracking (a held checkout: ``leak.suspected``) exactly while pgleak is installed.

Same-attribute overlap is exercised with ``Probe``, a test-only adapter that patches exactly
what each instrumentation wraps (``psycopg.Connection.connect``, a classmethod, among them) and
records that its wrapper ran; the real adapters' patches sit on the same call paths.
"""

from __future__ import annotations

import asyncio
import inspect
import itertools
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest
import sqlalchemy.ext.asyncio  # before instrumenting: see tests/otel/test_contrib.py, ORDERS

pytest.importorskip("opentelemetry.instrumentation.psycopg", reason="OpenTelemetry test extras")

import asyncpg
import asyncpg.connection
import psycopg
import psycopg_pool
import sqlalchemy as sa
import sqlalchemy.engine.base
from opentelemetry.instrumentation.asyncpg import AsyncPGInstrumentor
from opentelemetry.instrumentation.psycopg import PsycopgInstrumentor
from opentelemetry.instrumentation.sqlalchemy import SQLAlchemyInstrumentor

import pgleak
from pgleak._adapter import Adapter, _is_proxy
from pgleak.testing import EventCapture, capture_events
from tests.conftest import Server
from tests.otel.conftest import Otel, statement

LEAK_THRESHOLD = 0.1
QUERY = "SELECT 42"

#: Every order of the four calls in which each side is switched on before it is switched off.
ORDERS = [
    order
    for order in itertools.permutations(("install", "uninstall", "instrument", "uninstrument"))
    if order.index("install") < order.index("uninstall")
    and order.index("instrument") < order.index("uninstrument")
]


class Probe(Adapter):
    """Patches ``targets`` as a pgleak adapter does, and records which of its wrappers ran."""

    name = "probe"
    module = "pgleak"
    distribution = "pgleak"

    def __init__(self, targets: list[tuple[Any, str]]) -> None:
        super().__init__()
        self.targets = targets
        self.ran: list[str] = []

    def _install(self) -> None:
        for owner, attr in self.targets:
            self.patch(owner, attr, self._make(attr_key(owner, attr)))

    def _make(self, label: str) -> Callable[[Any], Any]:
        ran = self.ran

        def make(original: Any) -> Any:
            if inspect.iscoroutinefunction(original):

                async def probe_async(*args: Any, **kwargs: Any) -> Any:
                    ran.append(label)
                    return await original(*args, **kwargs)

                return probe_async

            def probe(*args: Any, **kwargs: Any) -> Any:
                ran.append(label)
                return original(*args, **kwargs)

            return probe

        return make


@dataclass
class Seen:
    """What one round of the scenario's workload showed."""

    spans: int  # the instrumentation's spans of QUERY
    probed: set[str]  # the Probe wrappers that ran
    tracked: bool  # pgleak tracked the held checkout (and reported it as a leak)


class Scenario:
    """One instrumentation, the attributes it wraps, and a workload that uses each of them."""

    name: str
    instrumentor: Any
    #: What the instrumentation wraps and the Probe patches too.
    targets: list[tuple[Any, str]]
    #: The workload's query spans while instrumented.
    spans: int

    def instrument(self, otel: Otel) -> None:
        self.instrumentor.instrument(tracer_provider=otel.tracer_provider)

    def run(self, pg: Server, held: Callable[[], None]) -> None:
        """Use every target; ``held()`` is called while a pool checkout is held."""
        raise NotImplementedError


class PsycopgScenario(Scenario):
    name = "psycopg"
    targets = [
        (psycopg, "connect"),
        (psycopg.Connection, "connect"),
        (psycopg.AsyncConnection, "connect"),
    ]
    spans = 4

    def __init__(self) -> None:
        self.instrumentor = PsycopgInstrumentor()

    def run(self, pg: Server, held: Callable[[], None]) -> None:
        with psycopg.connect(pg.dsn) as conn:
            conn.execute(QUERY).fetchone()
        with psycopg.Connection.connect(pg.dsn) as conn:
            conn.execute(QUERY).fetchone()

        async def run_async() -> None:
            async with await psycopg.AsyncConnection.connect(pg.dsn) as aconn:
                await (await aconn.execute(QUERY)).fetchone()

        asyncio.run(run_async())
        # The pool opens its connection with Connection.connect.
        with psycopg_pool.ConnectionPool(pg.dsn, min_size=1, max_size=1, open=True) as pool:
            conn = pool.getconn()
            try:
                conn.execute(QUERY).fetchone()
                held()
            finally:
                pool.putconn(conn)


class AsyncpgScenario(Scenario):
    name = "asyncpg"
    targets = [
        (asyncpg.connection.Connection, "fetchval"),
        (asyncpg.connection.Connection, "execute"),
    ]
    spans = 2

    def __init__(self) -> None:
        self.instrumentor = AsyncPGInstrumentor()  # type: ignore[no-untyped-call]

    def run(self, pg: Server, held: Callable[[], None]) -> None:
        async def main() -> None:
            pool = await asyncpg.create_pool(
                host=pg.host, port=pg.port, user=pg.user, database=pg.dbname, min_size=1, max_size=1
            )
            try:
                conn = await pool.acquire()
                try:
                    assert await conn.fetchval(QUERY) == 42
                    await conn.execute(QUERY)
                    held()
                finally:
                    await pool.release(conn)
            finally:
                await pool.close()

        asyncio.run(main())


class SQLAlchemyScenario(Scenario):
    name = "sqlalchemy"
    targets = [(sa, "create_engine"), (sqlalchemy.engine.base.Engine, "connect")]
    spans = 1

    def __init__(self) -> None:
        self.instrumentor = SQLAlchemyInstrumentor()

    def instrument(self, otel: Otel) -> None:
        # 0.66b1 accepts SQLAlchemy < 2.1 only; forced, it works on 2.1 (test_contrib.py).
        self.instrumentor.instrument(tracer_provider=otel.tracer_provider, skip_dep_check=True)

    def run(self, pg: Server, held: Callable[[], None]) -> None:
        engine = sa.create_engine(pg.url("psycopg"), pool_size=1)
        try:
            with engine.connect() as conn:
                conn.exec_driver_sql(QUERY).scalar()
                held()
        finally:
            engine.dispose()


SCENARIOS = [PsycopgScenario, AsyncpgScenario, SQLAlchemyScenario]


def _chain(obj: Any) -> list[Any]:
    """``obj`` and what each wrapt proxy below it wraps, outermost first."""
    chain = [obj]
    while _is_proxy(chain[-1]) and len(chain) < 10:
        chain.append(chain[-1].__wrapped__)
    return chain


def _pgleaks(obj: Any) -> bool:
    """Whether a pgleak wrapper is in the proxy chain of ``obj``."""
    for link in _chain(obj):
        func = getattr(link, "__func__", link)
        if getattr(func, "__pgleak_wrapped__", False):
            return True
    return False


def _as_otel_leaves(original: Any, owner: Any) -> Any:
    """What ``uninstrument()`` leaves of ``original`` when pgleak is not under it.

    It restores a wrapped classmethod with ``setattr(owner, attr, getattr(owner, attr)
    .__wrapped__)``: the method bound to the class, not the classmethod (it does this without
    pgleak too; a subclass's ``connect()`` then makes a base-class connection).
    """
    if isinstance(original, classmethod):
        return types.MethodType(original.__func__, owner)
    return original


class Run:
    """The state of one test: who is on, what the attributes should hold, what was seen."""

    def __init__(self, scenario: Scenario, otel: Otel, pg: Server) -> None:
        self.scenario = scenario
        self.otel = otel
        self.pg = pg
        self.probe = Probe(scenario.targets)
        self.pgleak_on = False
        self.otel_on = False
        #: What each attribute holds with both off; OpenTelemetry may change it (see above).
        self.baseline = {attr_key(o, a): o.__dict__[a] for o, a in scenario.targets}

    def step(self, call: str) -> None:
        if call == "install":
            pgleak.install(leak_threshold=LEAK_THRESHOLD, report_interval=60, otel=False)
            self.probe.install()
            self.pgleak_on = True
        elif call == "uninstall":
            self.probe.uninstall()
            pgleak.uninstall()
            self.pgleak_on = False
        elif call == "instrument":
            self.scenario.instrument(self.otel)
            self.otel_on = True
        else:
            self.scenario.instrumentor.uninstrument()
            self.otel_on = False
        self.check_attributes(call)
        self.check_behaviour(call)

    def check_attributes(self, after: str) -> None:
        for owner, attr in self.scenario.targets:
            key = attr_key(owner, attr)
            where = f"after {after}: {key}"
            current = owner.__dict__[attr]
            if not self.pgleak_on and not self.otel_on:
                if after == "uninstrument":
                    assert current == _as_otel_leaves(self.baseline[key], owner), where
                    self.baseline[key] = current
                else:  # pgleak put back exactly what it found
                    assert current is self.baseline[key], where
                continue
            assert _pgleaks(current) is self.pgleak_on, where
            assert _is_proxy(current) is self.otel_on, where

    def check_behaviour(self, after: str) -> None:
        self.otel.collector.clear()
        self.probe.ran.clear()
        tracked: list[bool] = []

        def held(events: EventCapture) -> None:
            out = pgleak.checked_out()
            if self.pgleak_on:
                events.wait_for("leak.suspected")
            tracked.append(bool(out))

        with capture_events() as events:
            self.scenario.run(self.pg, lambda: held(events))
        seen = Seen(
            spans=len([s for s in self.otel.spans(None) if QUERY in statement(s)]),
            probed=set(self.probe.ran),
            tracked=tracked == [True],
        )
        expected = Seen(
            spans=self.scenario.spans if self.otel_on else 0,
            probed={attr_key(*target) for target in self.scenario.targets}
            if self.pgleak_on
            else set(),
            tracked=self.pgleak_on,
        )
        assert seen == expected, f"after {after}"

    def close(self) -> None:
        """Switch off whatever a failed step left on (the ``scenario`` fixture then puts every
        attribute back as it was)."""
        if self.otel_on:
            self.scenario.instrumentor.uninstrument()
        if self.pgleak_on:
            self.probe.uninstall()
            pgleak.uninstall()


def attr_key(owner: Any, attr: str) -> str:
    return f"{getattr(owner, '__qualname__', getattr(owner, '__name__', owner))}.{attr}"


@pytest.fixture(params=SCENARIOS, ids=lambda cls: cls.name)
def scenario(request: pytest.FixtureRequest) -> Iterator[Scenario]:
    """The scenario, with its targets' original objects put back afterwards (OpenTelemetry's
    ``uninstrument()`` leaves a bound method where a classmethod was)."""
    made: Scenario = request.param()
    originals = [(owner, attr, owner.__dict__[attr]) for owner, attr in made.targets]
    try:
        yield made
    finally:
        for owner, attr, original in originals:
            setattr(owner, attr, original)


@pytest.mark.parametrize("order", ORDERS, ids=",".join)
def test_every_order_leaves_the_other_working_and_restores_the_original(
    order: tuple[str, ...], scenario: Scenario, telemetry: Otel, pg: Server
) -> None:
    run = Run(scenario, telemetry, pg)
    try:
        run.check_behaviour("start")
        for call in order:
            run.step(call)
    finally:
        run.close()
