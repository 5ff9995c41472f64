"""Every example app in ``integrations/`` runs with its documented command and names its leak.

The examples are found, not listed: every directory ``integrations/<name>/`` with a line
ending in ``# <- the leaking line`` in one of its ``.py`` files is run as
``python integrations/<name>/app.py`` (its own PostgreSQL, its own pgleak set-up), and its
output must hold pgleak's reports naming that line and end with the example's verdict,
``pgleak named the leaking line: <file>:<line> in <function>``. The conventions are spelled out
in ``integrations/README.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent
INTEGRATIONS = REPO / "integrations"
LEAK_MARKER = "# <- the leaking line"
SETUP_MARKER = "# <- the one line of set-up"
VERDICT = "pgleak named the leaking line: "
TIMEOUT_S = 90

#: The events whose reports must name the planted line, per example. An example not listed
#: here must have at least one report of a kind in ANY_REPORT naming it.
EXPECTED_EVENTS: dict[str, tuple[str, ...]] = {
    "asyncpg_worker": ("leak.suspected", "pool.exhausted", "leak.at_exit"),
    "flask_sqlalchemy": ("leak.suspected", "pool.exhausted", "leak.returned"),
    "psycopg_pool_script": ("leak.suspected", "pool.exhausted", "leak.at_exit"),
}
ANY_REPORT = ("leak.suspected", "leak.collected", "leak.at_exit", "pool.exhausted")

# A record's first line holds "pgleak: <event>: ", whatever the log format puts before it;
# the lines after it that start with whitespace belong to it.
_HEAD = re.compile(r"\bpgleak: (?P<event>[a-z_]+\.[a-z_]+): ")
_SITE = re.compile(r"^(?P<file>.+):(?P<line>\d+) in (?P<func>[^\s\[]+)")
_HOLDER = re.compile(r"^\s+#\d+ held ")


@dataclass(frozen=True)
class Site:
    file: Path
    line: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}"


def _markers(directory: Path, marker: str) -> list[Site]:
    found = []
    for path in sorted(directory.rglob("*.py")):
        for number, text in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if text.rstrip().endswith(marker):
                found.append(Site(path.resolve(), number))
    return found


def _examples() -> list[str]:
    if not INTEGRATIONS.is_dir():
        return []
    return [
        d.name for d in sorted(INTEGRATIONS.iterdir()) if d.is_dir() and _markers(d, LEAK_MARKER)
    ]


def _site(text: str) -> Site | None:
    """Parse ``file:line in function`` at the start of ``text``."""
    match = _SITE.match(text)
    if match is None:
        return None
    file = Path(match["file"])
    return Site((file if file.is_absolute() else REPO / file).resolve(), int(match["line"]))


def _checked_out_at(line: str) -> Site | None:
    """The site after the last "checked out at " in a report line."""
    return _site(line.rsplit("checked out at ", 1)[1]) if "checked out at " in line else None


def _records(output: str) -> list[tuple[str, list[str]]]:
    """pgleak's log records in ``output``: (event, lines), continuation lines included."""
    records: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in output.splitlines():
        head = _HEAD.search(line)
        if head:
            current = [line]
            records.append((head["event"], current))
        elif current is not None and line[:1].isspace():
            current.append(line)
        else:
            current = None
    return records


def _named_sites(event: str, lines: list[str]) -> list[Site | None]:
    """The checkouts a record is about: its own, or every holder of an exhausted pool."""
    if event == "pool.exhausted":
        return [_checked_out_at(line) for line in lines if _HOLDER.match(line)]
    return [_checked_out_at(lines[0])]


def test_the_examples_are_found() -> None:
    assert set(EXPECTED_EVENTS) <= set(_examples())


def test_the_quickstart_quotes_the_planted_lines_as_they_are() -> None:
    """docs/quickstart.md shows captured output: its verdicts must match the examples now."""
    quickstart = (REPO / "docs" / "quickstart.md").read_text(encoding="utf-8")
    quoted = re.findall(re.escape(VERDICT) + r"(integrations/.+)", quickstart)
    assert quoted, "docs/quickstart.md quotes no example's verdict"
    for text in quoted:
        name = Path(text.split(":", 1)[0]).parts[1]  # integrations/<name>/..., any depth
        assert [_site(text)] == _markers(INTEGRATIONS / name, LEAK_MARKER), (
            f"docs/quickstart.md quotes `{VERDICT}{text}`: re-capture the output of {name}"
        )


@pytest.mark.parametrize("name", _examples())
def test_example_runs_and_its_report_names_the_planted_line(name: str) -> None:
    directory = INTEGRATIONS / name
    entry = directory / "app.py"
    assert entry.is_file(), f"{name}: the entry point must be integrations/{name}/app.py"
    marked = _markers(directory, LEAK_MARKER)
    assert len(marked) == 1, f"{name}: more than one line marked as the leaking line"
    planted = marked[0]
    assert len(_markers(directory, SETUP_MARKER)) == 1, f"{name}: mark the set-up line once"
    command = f"python integrations/{name}/app.py"
    readme = (INTEGRATIONS / "README.md").read_text(encoding="utf-8")
    assert command in readme, f"integrations/README.md does not document `{command}`"

    env = {k: v for k, v in os.environ.items() if not k.startswith("PGLEAK_")}
    if "PGLEAK_PG_BINDIR" in os.environ:  # which PostgreSQL to start, not a pgleak setting
        env["PGLEAK_PG_BINDIR"] = os.environ["PGLEAK_PG_BINDIR"]
    started = time.monotonic()
    result = subprocess.run(
        [sys.executable, str(entry)],
        cwd=REPO,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
        check=False,
    )
    elapsed = time.monotonic() - started
    output = result.stdout + result.stderr
    assert result.returncode == 0, f"{name} exited {result.returncode}:\n{output}"

    lines = result.stdout.rstrip().splitlines()
    assert lines, f"{name} printed nothing:\n{output}"
    assert lines[-1].startswith(VERDICT), f"{name}: the last line is not the verdict:\n{output}"
    assert _site(lines[-1].removeprefix(VERDICT)) == planted, f"the verdict is not {planted}"

    records = _records(result.stdout)
    naming = {kind for kind, record in records if planted in _named_sites(kind, record)}
    expected = EXPECTED_EVENTS.get(name)
    if expected is None:
        assert naming & set(ANY_REPORT), f"{name}: no report names {planted}:\n{output}"
    else:
        missing = sorted(set(expected) - naming)
        assert not missing, f"{name}: no {', '.join(missing)} report names {planted}:\n{output}"
        for kind, record in records:  # every holder of the exhausted pool is the planted line
            if kind == "pool.exhausted":
                assert set(_named_sites(kind, record)) == {planted}, "\n".join(record)
    assert elapsed < 60, f"{name} took {elapsed:.1f}s"
