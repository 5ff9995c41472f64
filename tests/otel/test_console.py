"""docs/otel.md's console-exporter recipe, run as written: it prints a pgleak checkout span.

The recipe sets the global providers, which a process can do only once, so it runs in a
subprocess of its own, as a script, against the throwaway server it starts itself.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("opentelemetry.sdk", reason="the OpenTelemetry test extras are not installed")

from pgleak._otel import SPAN_NAME
from tests.helpers import doc_block

REPO = Path(__file__).resolve().parents[2]


def _json_objects(text: str) -> list[dict[str, Any]]:
    """The JSON documents the console exporters print one after another."""
    decoder = json.JSONDecoder()
    found: list[dict[str, Any]] = []
    at = 0
    for _ in range(10_000):
        at = text.find("{", at)
        if at < 0:
            break
        value, at = decoder.raw_decode(text, at)
        found.append(value)
    return found


def test_the_console_recipe_prints_the_checkout_span_and_the_pool_metrics(
    tmp_path: Path,
) -> None:
    script = tmp_path / "console_recipe.py"
    script.write_text(doc_block(REPO / "docs" / "otel.md", "ConsoleSpanExporter()"))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=tmp_path,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    printed = _json_objects(result.stdout)
    [span] = [doc for doc in printed if doc.get("name") == SPAN_NAME]
    lines = script.read_text().splitlines()
    [checkout_line] = [n for n, text in enumerate(lines, 1) if "pool.connection()" in text]
    attributes = span["attributes"]
    assert attributes["code.file.path"] == str(script)
    assert attributes["code.line.number"] == checkout_line
    assert attributes["pgleak.outcome"] == "returned"
    metric_names = {
        metric["name"]
        for doc in printed
        for resource in doc.get("resource_metrics", [])
        for scope in resource["scope_metrics"]
        if scope["scope"]["name"] == "pgleak"
        for metric in scope["metrics"]
    }
    assert "db.client.connection.use_time" in metric_names
