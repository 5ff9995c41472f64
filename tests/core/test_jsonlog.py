"""``pgleak.logging.JSONFormatter``: a report as one JSON line that ``pgleak summary`` reads."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import Iterator

import pytest

import pgleak
import pgleak.logging
from pgleak.cli.summary import sites_from
from pgleak.testing import EventCapture
from tests.conftest import Server


@pytest.fixture
def json_log() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(pgleak.logging.JSONFormatter())
    logger = logging.getLogger("pgleak")
    logger.addHandler(handler)
    try:
        yield stream
    finally:
        logger.removeHandler(handler)


def test_a_report_is_one_json_line_with_its_event(
    pg: Server, events: EventCapture, json_log: io.StringIO
) -> None:
    import gc

    from psycopg_pool import ConnectionPool

    with ConnectionPool(pg.dsn, min_size=0, max_size=2) as pool:
        pool.getconn()  # DROPPED
        gc.collect()
        events.wait_for("leak.collected")
    lines = [json.loads(line) for line in json_log.getvalue().splitlines()]
    [record] = [r for r in lines if r.get("pgleak", {}).get("event") == "leak.collected"]
    assert record["level"] == "ERROR"
    assert record["logger"] == "pgleak"
    assert record["time"].endswith("Z")
    assert record["message"].startswith("leak.collected: ")
    assert "\n" in record["message"]  # the stacks, escaped inside one line
    [site] = sites_from(json_log.getvalue().splitlines())
    assert site["counts"] == {"leak.collected": 1}
    assert site["site"] == record["pgleak"]["stack"][-1]


def test_other_records_and_exceptions() -> None:
    formatter = pgleak.logging.JSONFormatter()
    try:
        raise ValueError("boom")
    except ValueError:
        import sys

        record = logging.LogRecord(
            "app", logging.WARNING, __file__, 1, "x=%s", (1,), sys.exc_info()
        )
    data = json.loads(formatter.format(record))
    assert data["message"] == "x=1"
    assert "pgleak" not in data
    assert "ValueError: boom" in data["exc"]
