"""Pool metrics for every pool API: the ``db.client.connection.*`` conventions and pgleak's own.

Values are read the way an exporter reads them (the SDK's in-memory reader, collected on
demand) and compared with what the test did to a real pool: connections held, returned, a
leak reported.
"""

from __future__ import annotations

import asyncio
import contextlib
import uuid
from typing import Any

import pytest
from opentelemetry.sdk.metrics.export import Histogram, Sum

import pgleak
from pgleak import _otel_names
from pgleak._core import core
from pgleak.testing import EventCapture
from tests.conftest import Server
from tests.integrations.kits import ASYNC_KITS, SYNC_KITS, Kit
from tests.otel.conftest import Otel

SIZE = 3

#: What each kit's pool is configured to keep (see kits.py): (idle.max, idle.min, idle once
#: two connections came back). ``None``: the library has no such setting.
EXPECTED: dict[str, tuple[int | None, int | None, int]] = {
    "sqlalchemy": (SIZE, None, 2),
    "sqlalchemy-async": (SIZE, None, 2),
    "psycopg_pool": (SIZE, 1, 2),
    "psycopg_pool-async": (SIZE, 1, 2),
    "psycopg_pool-null": (0, 0, 0),
    "psycopg_pool-async-null": (0, 0, 0),
    "psycopg2-simple": (0, None, 0),  # minconn=0: a returned connection is closed
    "psycopg2-threaded": (0, None, 0),
    "asyncpg": (SIZE, 0, 2),
}


#: The pools' checkout wait: long, so a connection slow to open on a loaded machine is no
#: timeout (these tests count, they do not time out; timeouts are tested in test_spans_*).
WAIT = 10.0


@pytest.fixture
def leak_threshold() -> float:
    return 30.0


def own_name(kit: Kit, pool: Any) -> None:
    """Name a SQLAlchemy pool uniquely: pgleak names it by URL, and an engine on the same URL
    left alive by another test (the SQLAlchemy instrumentation keeps every engine it saw)
    would be added to this one's figures."""
    if kit.library == "sqlalchemy":
        engine = getattr(pool, "sync_engine", pool)
        core.pool(engine.pool, "sqlalchemy").rename(f"metrics-{uuid.uuid4()}")


class Snapshot:
    """The pool-state metrics of one pool, at one collection."""

    def __init__(self, otel: Otel, pool: str) -> None:
        self.points = otel.collect()
        self.pool = pool

    def get(self, name: str, **attrs: str) -> Any:
        found = [
            p
            for p in self.points.get(name, [])
            if p.attributes.get(_otel_names.POOL_NAME) == self.pool
            and all(p.attributes.get(k.replace("__", ".")) == v for k, v in attrs.items())
        ]
        if not found:
            return None
        [point] = found
        return point.count if hasattr(point, "bucket_counts") else point.value

    def used(self) -> Any:
        return self.get(_otel_names.COUNT, db__client__connection__state="used")

    def idle(self) -> Any:
        return self.get(_otel_names.COUNT, db__client__connection__state="idle")


def check_held(kit: Kit, snap: Snapshot) -> None:
    idle_max, idle_min, _ = EXPECTED[kit.name]
    assert snap.used() == 2
    assert snap.get(_otel_names.MAX) == SIZE
    assert snap.get(_otel_names.IDLE_MAX) == idle_max
    assert snap.get(_otel_names.IDLE_MIN) == idle_min
    assert snap.get(_otel_names.PENDING_REQUESTS) == 0
    assert snap.get(_otel_names.SUSPECTED_NOW) == 0
    assert snap.get(_otel_names.WAIT_TIME) == 2
    assert snap.get(_otel_names.CREATE_TIME) >= 2
    assert snap.get(_otel_names.USE_TIME) is None  # nothing returned yet


def check_returned(kit: Kit, snap: Snapshot) -> None:
    assert snap.used() == 0
    assert snap.idle() == EXPECTED[kit.name][2]
    assert snap.get(_otel_names.USE_TIME) == 2
    assert snap.get(_otel_names.TIMEOUTS) is None
    assert snap.get(_otel_names.LEAKS) is None


@pytest.mark.parametrize("kit", SYNC_KITS, ids=str)
def test_sync_pool_state_and_times(kit: Kit, pg: Server, otel: Otel) -> None:
    pool = kit.open(pg, SIZE, WAIT)
    own_name(kit, pool)
    try:
        held = [kit.take(pool), kit.take(pool)]
        name = pgleak.checked_out()[0].pool
        check_held(kit, Snapshot(otel, name))
        for conn in held:
            kit.give(pool, conn)
        check_returned(kit, Snapshot(otel, name))
    finally:
        kit.close(pool)
    # A closed pool is no longer reported (SQLAlchemy's disposed pool is replaced).
    if kit.library != "sqlalchemy":
        assert Snapshot(otel, name).used() is None


@pytest.mark.parametrize("kit", ASYNC_KITS, ids=str)
def test_async_pool_state_and_times(kit: Kit, pg: Server, otel: Otel) -> None:
    async def main() -> str:
        pool = kit.open(pg, SIZE, WAIT)
        if asyncio.iscoroutine(pool):
            pool = await pool
        own_name(kit, pool)
        try:
            held = [await kit.take(pool), await kit.take(pool)]
            name = pgleak.checked_out()[0].pool
            check_held(kit, Snapshot(otel, name))
            for conn in held:
                await kit.give(pool, conn)
            check_returned(kit, Snapshot(otel, name))
            return name
        finally:
            await kit.close(pool)

    name = asyncio.run(main())
    if kit.library != "sqlalchemy":
        assert Snapshot(otel, name).used() is None


@pytest.mark.parametrize("kit", SYNC_KITS[:1] + ASYNC_KITS[-1:], ids=str)
def test_suspected_checkouts_and_leaks_by_kind(
    kit: Kit, pg: Server, otel: Otel, otel_events: EventCapture
) -> None:
    pgleak.install(
        leak_threshold=0.2,
        tracer_provider=otel.tracer_provider,
        meter_provider=otel.meter_provider,
    )
    seen: list[Any] = []

    async def hold(pool: Any) -> None:
        conn = await kit.take(pool) if kit.is_async else kit.take(pool)
        name = pgleak.checked_out()[0].pool
        await asyncio.to_thread(otel_events.wait_for, "leak.suspected")
        seen.append(Snapshot(otel, name))
        await kit.give(pool, conn) if kit.is_async else kit.give(pool, conn)
        await asyncio.to_thread(otel_events.wait_for, "leak.returned")
        seen.append(Snapshot(otel, name))

    async def main() -> None:
        pool = kit.open(pg, SIZE, WAIT)
        if asyncio.iscoroutine(pool):
            pool = await pool
        try:
            await hold(pool)
        finally:
            closed = kit.close(pool)
            if asyncio.iscoroutine(closed):
                await closed

    asyncio.run(main())
    during, after = seen
    assert during.get(_otel_names.SUSPECTED_NOW) == 1
    assert during.get(_otel_names.LEAKS, pgleak__leak__kind="suspected") == 1
    assert after.get(_otel_names.SUSPECTED_NOW) == 0
    assert after.get(_otel_names.LEAKS, pgleak__leak__kind="suspected") == 1


def test_instruments_follow_the_conventions(pg: Server, otel: Otel) -> None:
    """Instrument types, units and buckets, as an exporter sees them."""
    kit = SYNC_KITS[0]
    pool = kit.open(pg, SIZE, WAIT)
    try:
        kit.give(pool, kit.take(pool))
        metrics = otel.metrics()
    finally:
        kit.close(pool)
    for name in (
        _otel_names.COUNT,
        _otel_names.MAX,
        _otel_names.IDLE_MAX,
        _otel_names.PENDING_REQUESTS,
        _otel_names.SUSPECTED_NOW,
    ):
        data = metrics[name].data
        assert isinstance(data, Sum), name
        assert not data.is_monotonic, name
    assert metrics[_otel_names.COUNT].unit == "{connection}"
    assert metrics[_otel_names.PENDING_REQUESTS].unit == "{request}"
    for name in (_otel_names.WAIT_TIME, _otel_names.USE_TIME, _otel_names.CREATE_TIME):
        metric = metrics[name]
        assert metric.unit == "s"
        assert isinstance(metric.data, Histogram)
        assert tuple(metric.data.data_points[0].explicit_bounds) == _otel_names.BUCKETS


def test_installed_again_the_pools_are_reported_once(pg: Server, otel: Otel) -> None:
    kit = SYNC_KITS[0]
    pool = kit.open(pg, SIZE, WAIT)
    own_name(kit, pool)
    try:
        conn = kit.take(pool)
        name = pgleak.checked_out()[0].pool
        for _ in range(2):  # same providers: the same instruments, not a second set
            pgleak.install(
                leak_threshold=30,
                tracer_provider=otel.tracer_provider,
                meter_provider=otel.meter_provider,
            )
        assert Snapshot(otel, name).used() == 1
        pgleak.uninstall()
        # Instruments cannot be unregistered: uninstalled, they go quiet.
        assert Snapshot(otel, name).used() is None
        kit.give(pool, conn)
    finally:
        with contextlib.suppress(Exception):
            kit.close(pool)
