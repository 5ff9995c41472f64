"""Turning OpenTelemetry on and off: the ``otel`` setting, no API, no SDK yet, exact uninstall,
and a broken tracer that must not break the application.

Tests that need the process-wide providers unset and then set, or the API missing, run in a
subprocess: a process can set its global providers only once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from opentelemetry.sdk.trace import TracerProvider

import pgleak
from pgleak import _otel, _otel_names
from pgleak._core import core
from pgleak._settings import ConfigError, build_settings
from pgleak.testing import capture_events
from tests.conftest import Server
from tests.otel.conftest import Otel


def run(code: str, pg: Server, **env: str) -> str:
    """Run ``code`` in a fresh interpreter against the test server; its stdout."""
    environ = {
        key: value for key, value in os.environ.items() if not key.startswith(("PGLEAK_", "OTEL_"))
    }
    environ.update(env, PGLEAK_TEST_DSN_FOR_CHILD=pg.dsn)
    done = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=environ,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode == 0, done.stderr + done.stdout
    return done.stdout


# -- the setting --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("auto", None), ("", None), ("1", True), ("yes", True), ("off", False), ("0", False)],
)
def test_the_otel_setting_from_the_environment(raw: str, expected: bool | None) -> None:
    assert build_settings({}, {"PGLEAK_OTEL": raw}).otel is expected


def test_an_invalid_otel_setting_is_refused_naming_it() -> None:
    with pytest.raises(ConfigError, match=r"otel \(PGLEAK_OTEL\): 'maybe'"):
        build_settings({}, {"PGLEAK_OTEL": "maybe"})
    assert build_settings({"otel": False}, {"PGLEAK_OTEL": "1"}).otel is False


@pytest.fixture
def uninstalled() -> Iterator[None]:
    yield
    pgleak.uninstall()


def test_otel_false_leaves_no_observer(pg: Server, uninstalled: None) -> None:
    otel = Otel()
    pgleak.install(
        otel=False, tracer_provider=otel.tracer_provider, meter_provider=otel.meter_provider
    )
    assert core.observer is None
    from psycopg_pool import ConnectionPool

    with ConnectionPool(pg.dsn, min_size=0, max_size=1) as pool, pool.connection() as conn:
        conn.execute("select 1")
        assert pgleak.checked_out()
    assert otel.spans(None) == []
    assert otel.collect() == {}
    # Turned on by a second install(), as every setting is.
    pgleak.install(tracer_provider=otel.tracer_provider)
    assert isinstance(core.observer, _otel.Telemetry)
    pgleak.uninstall()
    assert core.observer is None


def test_metrics_without_spans(pg: Server, uninstalled: None) -> None:
    """The API's no-op tracer provider, passed on purpose, turns the spans off for good."""
    from opentelemetry.trace import NoOpTracerProvider
    from psycopg_pool import ConnectionPool

    otel = Otel()
    pgleak.install(tracer_provider=NoOpTracerProvider(), meter_provider=otel.meter_provider)
    with ConnectionPool(pg.dsn, min_size=0, max_size=1) as pool:
        with pool.connection():
            [lease] = list(core.leases.values())
            assert lease.otel is None
        name = lease.pool.name
        assert otel.value(_otel_names.USE_TIME, name) == 1
    assert otel.spans(None) == []


def test_an_unsampled_checkout_records_nothing(pg: Server, uninstalled: None) -> None:
    """Under a sampler that keeps nothing, the checkout's span does not record: no attribute is
    built, nothing is exported, and the block still runs under it (its trace context)."""
    from opentelemetry import trace
    from opentelemetry.sdk.trace.sampling import ALWAYS_OFF
    from psycopg_pool import ConnectionPool

    otel = Otel()
    unsampled = TracerProvider(sampler=ALWAYS_OFF)
    pgleak.install(tracer_provider=unsampled, meter_provider=otel.meter_provider)
    with ConnectionPool(pg.dsn, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            span = trace.get_current_span()
            conn.execute("select 1")
            [lease] = list(core.leases.values())
        assert span is lease.otel.span
        assert not span.is_recording()
        assert trace.get_current_span() is trace.INVALID_SPAN
        assert otel.value(_otel_names.USE_TIME, lease.pool.name) == 1  # the metrics still count
    assert otel.spans(None) == []


def test_no_op_providers_for_both_leave_nothing_to_wake(uninstalled: None) -> None:
    from opentelemetry.metrics import NoOpMeterProvider
    from opentelemetry.trace import NoOpTracerProvider

    pgleak.install(tracer_provider=NoOpTracerProvider(), meter_provider=NoOpMeterProvider())
    assert core.observer is None
    assert core.waker is None


def test_api_only_does_nothing_per_checkout(pg: Server, uninstalled: None) -> None:
    """With no SDK set up (the global providers unset, as in this process), a checkout gets no
    tracing state at all: the API's no-op calls are not even made."""
    from opentelemetry import trace

    # The suite sets global providers only in child processes: this one has none.
    assert isinstance(trace.get_tracer_provider(), trace.ProxyTracerProvider)
    before = _scope_attributes()
    pgleak.install()
    # Only a waker: every hook but the checkout's sees no observer at all.
    assert core.observer is None
    assert core.waker is not None
    from psycopg_pool import ConnectionPool

    with ConnectionPool(pg.dsn, min_size=0, max_size=1) as pool, pool.connection():
        [lease] = list(core.leases.values())
        assert lease.otel is None
        assert trace.get_current_span() is trace.INVALID_SPAN
    assert core.observer is None
    # Nor are the wrappers that make a span current in the user's block in place: they go in
    # when an SDK is set up (the next test), and until then no checkout passes through them.
    assert _scope_attributes() == before


def test_the_block_wrappers_go_in_when_an_observer_starts(uninstalled: None) -> None:
    before = _scope_attributes()
    pgleak.install()
    assert _scope_attributes() == before
    pgleak.install(tracer_provider=TracerProvider())
    during = _scope_attributes()
    assert all(getattr(during[key], "__pgleak_wrapped__", False) for key in before)
    pgleak.uninstall()
    assert _scope_attributes() == before


def test_the_first_checkout_after_the_sdk_is_set_up_is_traced(pg: Server) -> None:
    out = run(
        """
        import os
        from opentelemetry import metrics, trace
        from opentelemetry.sdk.metrics import MeterProvider
        from opentelemetry.sdk.metrics.export import InMemoryMetricReader
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import SimpleSpanProcessor
        from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
        import pgleak
        from psycopg_pool import ConnectionPool

        pgleak.install()  # first line of the app; the SDK is set up later
        pool = ConnectionPool(os.environ["PGLEAK_TEST_DSN_FOR_CHILD"], min_size=0, max_size=2)
        with pool.connection():
            pass
        exporter = InMemorySpanExporter()
        tracers = TracerProvider()
        tracers.add_span_processor(SimpleSpanProcessor(exporter))
        trace.set_tracer_provider(tracers)
        reader = InMemoryMetricReader()
        metrics.set_meter_provider(MeterProvider(metric_readers=[reader]))
        with pool.connection():  # wakes pgleak up (its span is not current, it is recorded)
            pass
        with pool.connection():
            print("current", trace.get_current_span().name)
        pool.close()
        print("spans", [s.name for s in exporter.get_finished_spans()])
        names = sorted(
            m.name
            for rm in reader.get_metrics_data().resource_metrics
            for sm in rm.scope_metrics
            for m in sm.metrics
        )
        print("metrics", names)
        """,
        pg,
    )
    assert "current pgleak.checkout" in out
    assert "spans ['pgleak.checkout', 'pgleak.checkout']" in out  # not the one before
    assert "'db.client.connection.wait_time'" in out
    assert "'db.client.connection.use_time'" in out


def test_without_the_api_pgleak_works_and_otel_true_says_why_not(pg: Server) -> None:
    out = run(
        """
        import os, sys

        class NoOpenTelemetry:
            def find_spec(self, name, path=None, target=None):
                if name == "opentelemetry" or name.startswith("opentelemetry."):
                    raise ImportError(f"no module named {name!r} (hidden by the test)")

        sys.meta_path.insert(0, NoOpenTelemetry())
        import pgleak
        from pgleak._core import core
        from pgleak.testing import capture_events
        from psycopg_pool import ConnectionPool

        settings = pgleak.install(leak_threshold=0.1)
        print("otel", settings.otel, core.observer)
        dsn = os.environ["PGLEAK_TEST_DSN_FOR_CHILD"]
        with capture_events() as events:
            with ConnectionPool(dsn, min_size=0, max_size=1) as pool, pool.connection():
                events.wait_for("leak.suspected")
        print("reported", [e.event for e in events.events][:1])
        try:
            pgleak.install(otel=True)
        except pgleak.AdapterUnavailable as exc:
            print("refused", exc)
        print("imported", sorted(m for m in sys.modules if m.startswith("opentelemetry")))
        """,
        pg,
    )
    assert "otel None None" in out
    assert "reported ['leak.suspected']" in out
    assert "refused otel=True, but opentelemetry-api is not installed" in out
    assert "imported []" in out


def test_sqlalchemy_asyncio_is_patched_when_imported_not_before(pg: Server) -> None:
    out = run(
        """
        import sys
        import sqlalchemy
        import pgleak

        from opentelemetry.sdk.trace import TracerProvider

        pgleak.install(tracer_provider=TracerProvider())  # the scope wrappers go in at once
        print("imported at install", "sqlalchemy.ext.asyncio" in sys.modules)
        from sqlalchemy.ext.asyncio import AsyncConnection
        print("patched", getattr(AsyncConnection.__dict__.get("__aenter__"),
                                 "__pgleak_wrapped__", False))
        pgleak.uninstall()
        print("own after uninstall", "__aenter__" in AsyncConnection.__dict__)
        """,
        pg,
    )
    assert "imported at install False" in out
    assert "patched True" in out
    assert "own after uninstall False" in out


def _scope_attributes() -> dict[tuple[Any, str], Any]:
    from asyncpg.pool import PoolAcquireContext
    from psycopg_pool import AsyncConnectionPool, ConnectionPool
    from sqlalchemy.engine import Connection
    from sqlalchemy.ext.asyncio import AsyncConnection

    return {
        (owner, attr): owner.__dict__.get(attr)
        for owner, attr in [
            (Connection, "__enter__"),
            (Connection, "__exit__"),
            (AsyncConnection, "__aenter__"),
            (AsyncConnection, "__aexit__"),
            (ConnectionPool, "connection"),
            (AsyncConnectionPool, "connection"),
            (PoolAcquireContext, "__aenter__"),
            (PoolAcquireContext, "__aexit__"),
        ]
    }


def test_uninstall_restores_the_block_wrappers_exactly(uninstalled: None) -> None:
    before = _scope_attributes()
    for _ in range(3):
        pgleak.install(tracer_provider=TracerProvider())
    during = _scope_attributes()
    assert all(during[key] is not before[key] for key in before)
    pgleak.uninstall()
    assert _scope_attributes() == before


@pytest.mark.internal_errors
def test_a_broken_tracer_does_not_break_the_application(pg: Server, uninstalled: None) -> None:
    """A fault in the tracing pipeline is pgleak's to swallow: the user's block runs, the
    connection goes back, and the logging reports still come."""
    from pgleak import _guard

    class Broken(TracerProvider):
        def get_tracer(self, *args: Any, **kwargs: Any) -> Any:
            tracer = super().get_tracer(*args, **kwargs)

            def start_span(*a: Any, **k: Any) -> Any:
                raise RuntimeError("exporter on fire")

            tracer.start_span = start_span  # type: ignore[method-assign]
            return tracer

    pgleak.install(leak_threshold=0.1, tracer_provider=Broken())
    from psycopg_pool import ConnectionPool

    with capture_events() as events, ConnectionPool(pg.dsn, min_size=0, max_size=1) as pool:
        with pool.connection() as conn:
            assert conn.execute("select 1").fetchone() == (1,)
            events.wait_for("leak.suspected")
        events.wait_for("leak.returned")
        assert pgleak.checked_out() == []
    sites = {site for site, _ in _guard.swallowed}
    assert "psycopg_pool.scope" in sites
    assert all(isinstance(exc, RuntimeError) for _, exc in _guard.swallowed)


@pytest.mark.internal_errors
def test_a_broken_observer_does_not_break_a_sqlalchemy_block(
    pg: Server, uninstalled: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``Connection.__enter__`` / ``__exit__`` tell the observer themselves: a fault there is
    swallowed at ``sqlalchemy.scope``, and the block, its query and the checkin go on."""
    import sqlalchemy as sa

    from pgleak import _guard

    def broken(self: Any, lease: Any) -> None:
        raise RuntimeError("observer on fire")

    monkeypatch.setattr(_otel.Telemetry, "enter", broken)
    monkeypatch.setattr(_otel.Telemetry, "exit", broken)
    pgleak.install(tracer_provider=TracerProvider())
    engine = sa.create_engine(pg.url("psycopg"), pool_size=1)
    try:
        with engine.connect() as conn:
            assert conn.execute(sa.text("select 1")).scalar() == 1
            assert len(pgleak.checked_out()) == 1
        assert pgleak.checked_out() == []
    finally:
        engine.dispose()
    assert [(site, str(exc)) for site, exc in _guard.swallowed] == [
        ("sqlalchemy.scope", "observer on fire"),
        ("sqlalchemy.scope", "observer on fire"),
    ]


def test_a_connection_still_out_at_exit_ends_its_span_before_the_sdk_shuts_down(
    pg: Server,
) -> None:
    """pgleak's exit report runs before ``atexit`` handlers, the SDK's flush among them: the
    leaked checkout's error span is exported by the ``BatchSpanProcessor`` on its way out."""
    out = run(
        """
        import json, os
        from opentelemetry import trace
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, ConsoleSpanExporter
        import pgleak
        from psycopg_pool import ConnectionPool

        one_line = lambda span: span.to_json(indent=None) + "\\n"
        provider = TracerProvider()
        provider.add_span_processor(BatchSpanProcessor(ConsoleSpanExporter(formatter=one_line)))
        trace.set_tracer_provider(provider)
        pgleak.install()
        pool = ConnectionPool(os.environ["PGLEAK_TEST_DSN_FOR_CHILD"], min_size=0, max_size=1)
        kept = pool.getconn()  # never returned
        """,
        pg,
    )
    [span] = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    assert span["name"] == "pgleak.checkout"
    assert span["status"]["status_code"] == "ERROR"
    assert span["attributes"]["error.type"] == "leak.at_exit"
    assert [e["name"] for e in span["events"]] == ["leak.at_exit"]
    assert span["events"][0]["attributes"]["pgleak.detail"] == "process exit"
