"""Usage examples the type checker must accept (mypy --strict runs over this file in CI).

Not a test module: nothing here runs; it breaks the build if the public API's types change.
"""

from __future__ import annotations

import logging

import pgleak
from pgleak.testing import EventCapture, capture_events


def configure() -> pgleak.Settings:
    settings: pgleak.Settings = pgleak.install(
        leak_threshold=10, capture_stack=True, stack_depth=16, report_interval=60.0
    )
    threshold: float = settings.leak_threshold
    assert threshold > 0
    return settings


def inspect() -> list[str]:
    sites: list[str] = []
    for checkout in pgleak.checked_out(with_holder_stack=True):
        held: float = checkout.held_s
        if held > 60 and checkout.site is not None:
            sites.append(checkout.site)
    return sites


def sink(event: pgleak.LeakEvent) -> None:
    data: dict[str, object] = event.as_dict()
    logging.getLogger("app").info("%s %s", event.event, data["pool"])


def wiring() -> None:
    pgleak.add_sink(sink)
    with pgleak.allow_long_hold(seconds=600), pgleak.suppress():
        pass
    pgleak.remove_sink(sink)
    pgleak.uninstall()


def in_tests() -> list[pgleak.LeakEvent]:
    with capture_events() as events:
        captured: EventCapture = events
        return captured.wait_for("leak.suspected", timeout=5)


def errors() -> None:
    try:
        pgleak.install(leak_threshold=-1)
    except pgleak.ConfigError as exc:
        message: str = str(exc)
        assert "leak_threshold" in message
    except pgleak.AdapterUnavailable:
        pass


def opentelemetry() -> bool | None:
    from opentelemetry.sdk.metrics import MeterProvider
    from opentelemetry.sdk.trace import TracerProvider

    settings = pgleak.install(
        otel=True, tracer_provider=TracerProvider(), meter_provider=MeterProvider()
    )
    switch: bool | None = settings.otel
    return switch
