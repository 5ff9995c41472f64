"""The pool metrics: ``db.client.connection.*`` instruments, registered once per meter provider.

Split from :mod:`pgleak._otel` (which holds the observer and the spans): the observable
instruments read the pools only when the SDK collects, on the reader's thread, and the two
histograms that follow checkouts are queued by the observer and handed over here at collection
(see :class:`_Instruments`). Nothing here runs on a checkout's own path but ``later()``.
"""

from __future__ import annotations

import collections
import threading
import weakref
from collections import Counter
from collections.abc import Iterable
from typing import Any

from opentelemetry.metrics import CallbackOptions, Meter, Observation

from pgleak._core import PoolHandle, PoolStats, core
from pgleak._guard import internal_error
from pgleak._otel_names import (
    BUCKETS,
    COUNT,
    CREATE_TIME,
    IDLE,
    IDLE_MAX,
    IDLE_MIN,
    LEAKS,
    MAX,
    PENDING_REQUESTS,
    POOL_NAME,
    SCHEMA_URL,
    SCOPE,
    STATE,
    SUSPECTED_NOW,
    TIMEOUTS,
    USE_TIME,
    USED,
    WAIT_TIME,
)


class _PoolInfo:
    """What Telemetry derives once per pool (kept in ``PoolHandle.observed``)."""

    __slots__ = ("metric", "sites", "span")

    def __init__(self, name: str) -> None:
        self.metric = {POOL_NAME: name}
        self.span: dict[str, Any] | None = None
        #: The span attributes of a checkout at a given line: ``span`` and its ``code.*``,
        #: by (id of the code, offset) of the line, with the code (``pgleak._otel``'s
        #: ``Telemetry._base``); ``None``: no stack was recorded.
        self.sites: dict[tuple[int, int] | None, tuple[Any, dict[str, Any]]] = {}


def _pool_info(pool: PoolHandle) -> _PoolInfo:
    info = pool.observed
    if not isinstance(info, _PoolInfo):
        info = pool.observed = _PoolInfo(pool.name)
    return info


class _Instruments:
    """The instruments of one meter provider; observable ones read the pools when collected.

    Their callbacks answer only while the installed :class:`Telemetry` uses these very
    instruments: instruments cannot be unregistered, so after ``uninstall()`` (or an
    ``install()`` with another meter provider) they go quiet instead.

    The wait and use times of checkouts are not recorded on the checkout's thread: the SDK
    spends several microseconds on each ``record()`` (a measurement object, its attributes
    checked and hashed), twice per checkout. They are queued instead and recorded by the first
    observable callback of each collection, on the reader's thread, just before the SDK reads
    the histograms (callbacks run first; a later SDK that ran them after would only delay the
    values by one collection). The price: no exemplars for them. The queue is bounded, for a
    meter provider nobody ever collects.
    """

    def __init__(self, meter: Meter) -> None:
        self._queued: collections.deque[tuple[Any, float, dict[str, str]]] = collections.deque(
            maxlen=100_000
        )
        self.wait_time = _histogram(
            meter, WAIT_TIME, "The time it took to obtain an open connection from the pool"
        )
        self.use_time = _histogram(
            meter,
            USE_TIME,
            "The time between borrowing a connection and returning it to the pool",
        )
        self.create_time = _histogram(
            meter, CREATE_TIME, "The time it took to create a new connection"
        )
        self.timeouts = meter.create_counter(
            TIMEOUTS,
            unit="{timeout}",
            description="The number of connection timeouts that have occurred trying to "
            "obtain a connection from the pool",
        )
        self.leaks = meter.create_counter(
            LEAKS,
            unit="{leak}",
            description="Connection leaks reported by pgleak, by kind: suspected (held past "
            "the threshold), collected (garbage-collected without being returned), at_exit "
            "(still out when the pool closed or the process exited)",
        )
        #: The observable instruments by name (for tests: they are only ever read by the SDK).
        self.observable: dict[str, Any] = {}
        for name, unit, description, callback in (
            (
                COUNT,
                "{connection}",
                "The number of connections that are currently in state described by the "
                "state attribute",
                self._count,
            ),
            (MAX, "{connection}", "The maximum number of open connections allowed", self._max),
            (
                IDLE_MAX,
                "{connection}",
                "The maximum number of idle open connections allowed",
                self._idle_max,
            ),
            (
                IDLE_MIN,
                "{connection}",
                "The minimum number of idle open connections allowed",
                self._idle_min,
            ),
            (
                PENDING_REQUESTS,
                "{request}",
                "The number of current pending requests for an open connection",
                self._pending,
            ),
            (
                SUSPECTED_NOW,
                "{connection}",
                "Checkouts held longer than pgleak's leak threshold and not returned yet",
                self._suspected,
            ),
        ):
            self.observable[name] = meter.create_observable_up_down_counter(
                name, callbacks=[callback], unit=unit, description=description
            )

    def later(self, histogram: Any, value: float, attributes: dict[str, str]) -> None:
        """Record ``value`` at the next collection (see the class docstring)."""
        self._queued.append((histogram, value, attributes))

    def drain(self) -> None:
        queued = self._queued
        while True:
            try:
                histogram, value, attributes = queued.popleft()
            except IndexError:
                return
            histogram.record(value, attributes)

    # Each callback runs on the metric reader's thread, inside the SDK's own error handling;
    # pgleak's guard still catches first, so a broken pool cannot silence the others.

    def _states(self) -> list[tuple[PoolHandle, PoolStats]]:
        # Only the installed Telemetry holds these instruments (read by name: this module
        # is imported by pgleak._otel, which defines it).
        if getattr(core.observer, "instruments", None) is not self:
            return []
        held: Counter[PoolHandle] = Counter(lease.pool for lease in list(core.leases.values()))
        out = []
        for handle, obj in core.pools():
            kind = core.kinds.get(handle.kind)
            stats: PoolStats | None = PoolStats()
            if kind is not None and kind.stats is not None:
                try:
                    stats = kind.stats(obj)
                except Exception as exc:
                    internal_error(f"{handle.kind}.otel_stats", exc)
                    continue
            if stats is None:
                continue  # closed
            if stats.used is None:
                stats = stats._replace(used=held[handle])
            out.append((handle, stats))
        return out

    # Pools that share a name (two engines on one URL) are one pool to a metrics backend:
    # their values are added up, as the SDK would otherwise keep one of them at random.

    def _observe(self, field: str) -> Iterable[Observation]:
        totals: Counter[str] = Counter()
        for handle, stats in self._states():
            value = getattr(stats, field)
            if value is not None:
                totals[_pool_info(handle).metric[POOL_NAME]] += value
        return [Observation(value, {POOL_NAME: name}) for name, value in totals.items()]

    def _count(self, options: CallbackOptions) -> Iterable[Observation]:
        # The first callback of a collection: the queued times go in before it is read.
        try:
            self.drain()
        except Exception as exc:
            internal_error("otel.histograms", exc)
        totals: Counter[tuple[str, str]] = Counter()
        for handle, stats in self._states():
            name = _pool_info(handle).metric[POOL_NAME]
            if stats.idle is not None:
                totals[name, IDLE] += stats.idle
            if stats.used is not None:
                totals[name, USED] += stats.used
        return [
            Observation(value, {POOL_NAME: name, STATE: state})
            for (name, state), value in totals.items()
        ]

    def _max(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("max")

    def _idle_max(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("idle_max")

    def _idle_min(self, options: CallbackOptions) -> Iterable[Observation]:
        return self._observe("idle_min")

    def _pending(self, options: CallbackOptions) -> Iterable[Observation]:
        totals: Counter[str] = Counter()
        for handle, _ in self._states():
            totals[_pool_info(handle).metric[POOL_NAME]] += len(handle.pending)
        return [Observation(value, {POOL_NAME: name}) for name, value in totals.items()]

    def _suspected(self, options: CallbackOptions) -> Iterable[Observation]:
        states = self._states()
        if not states:
            return []
        suspected = Counter(
            lease.pool
            for lease in list(core.leases.values())
            if lease.reported and lease.t_in is None
        )
        totals: Counter[str] = Counter()
        for handle, _ in states:
            totals[_pool_info(handle).metric[POOL_NAME]] += suspected[handle]
        return [Observation(value, {POOL_NAME: name}) for name, value in totals.items()]


def _histogram(meter: Meter, name: str, description: str) -> Any:
    try:
        return meter.create_histogram(
            name, unit="s", description=description, explicit_bucket_boundaries_advisory=BUCKETS
        )
    except TypeError:  # opentelemetry-api < 1.30: no advisory; the SDK's default buckets
        return meter.create_histogram(name, unit="s", description=description)


_lock = threading.Lock()
#: One set of instruments per meter provider: registering them again would make the SDK warn
#: and, for the observable ones, report every pool twice.
_registry: weakref.WeakKeyDictionary[Any, _Instruments] = weakref.WeakKeyDictionary()
_strong: dict[int, tuple[Any, _Instruments]] = {}


def _instruments(provider: Any, version: str) -> _Instruments:
    with _lock:
        try:
            found = _registry.get(provider)
        except TypeError:  # not weakly referenceable: kept for good (providers are few)
            entry = _strong.get(id(provider))
            found = entry[1] if entry is not None and entry[0] is provider else None
        if found is not None:
            return found
        made = _Instruments(provider.get_meter(SCOPE, version, schema_url=SCHEMA_URL))
        try:
            _registry[provider] = made
        except TypeError:
            _strong[id(provider)] = (provider, made)
        return made
