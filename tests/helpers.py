"""Assertions shared by the tests: "the report names this line of this test"."""

from __future__ import annotations

import contextlib
import linecache
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest


def site_of(marker: str, depth: int = 1) -> str:
    """``"file:line"`` of the line in the caller's file that carries ``# <marker>``.

    Tests compare it with the ``file:line`` prefix of a reported stack entry, so a report that
    names any other line (pgleak's, SQLAlchemy's, the fixture's) fails the test.
    """
    frame = sys._getframe(depth)
    filename = frame.f_code.co_filename
    lines = linecache.getlines(filename)
    hits = [n for n, text in enumerate(lines, 1) if text.rstrip().endswith(f"# {marker}")]
    if len(hits) > 1:
        # The same marker in several tests: take the one inside the calling function.
        own = {line for _, _, line in frame.f_code.co_lines() if line is not None}
        hits = [n for n in hits if n in own]
    assert len(hits) == 1, f"marker {marker!r} found {len(hits)} times in {filename}"
    return f"{filename}:{hits[0]}"


def assert_site(stack: list[str], marker: str) -> None:
    """The newest frame of ``stack`` is the line marked ``# <marker>`` in the calling file."""
    expected = site_of(marker, depth=2)
    assert stack, "empty stack"
    assert stack[-1].startswith(expected + " in "), f"{stack[-1]!r} is not {expected}"


def doc_block(path: str | os.PathLike[str], contains: str) -> str:
    """The one fenced ```python block of the Markdown file ``path`` holding ``contains``.

    Tests run documented code as it is written, so a doc that drifts from the code fails.
    """
    text = Path(path).read_text(encoding="utf-8")
    blocks = re.findall(r"^```python\n(.*?)^```$", text, flags=re.DOTALL | re.MULTILINE)
    found: list[str] = [block for block in blocks if contains in block]
    assert len(found) == 1, f"{len(found)} python blocks of {path} hold {contains!r}"
    return found[0]


class BlockObserver:
    """An observer that writes down a traced block's enter and exit (what :meth:`note` makes of
    each, in order) and raises from both once ``broken``; its other hooks do nothing. The C
    block wrappers' tests compare what it saw through them and through the Python functions."""

    def __init__(self) -> None:
        self.seen: list[object] = []
        self.last: object = None
        self.broken = False

    def enter(self, lease: object) -> None:
        self._told("enter", lease)

    def exit(self, lease: object) -> None:
        self._told("exit", lease)

    def _told(self, what: str, lease: object) -> None:
        if self.broken:
            raise RuntimeError("pgleak's own fault")
        self.seen.append(self.note(what, lease))
        self.last = lease

    def note(self, what: str, lease: object) -> object:
        raise NotImplementedError

    def __getattr__(self, name: str) -> object:
        return lambda *args: None


@contextlib.contextmanager
def observed_by(
    monkeypatch: pytest.MonkeyPatch, c: bool, observer: Any, blocks: Any, names: tuple[str, ...]
) -> Iterator[list[tuple[str, str]]]:
    """pgleak installed with ``observer`` as its observer and the C wrappers (``c``) or the
    Python ones, checked on ``blocks``' methods ``names``; yields a list the faults swallowed
    meanwhile are put in at the end (as ``(site, repr(exc))``)."""
    import pgleak
    from pgleak import _adapter, _guard, _stack
    from pgleak._core import core

    faults: list[tuple[str, str]] = []
    with monkeypatch.context() as patched:
        patched.setattr(_adapter, "use_c_wrappers", c)
        pgleak.install(leak_threshold=60, report_interval=60)
        try:
            patched.setattr(core, "observer", observer)
            core.observer_started()  # the block's wrappers go in with an observer
            for name in names:
                wrapper = vars(blocks)[name]
                assert (type(wrapper) is _stack._fast.Tracked) is c
            yield faults
            faults.extend((site, repr(exc)) for site, exc in _guard.swallowed)
        finally:
            pgleak.uninstall()
            _guard.reset()
