"""Every adapter installs itself when its library is imported after ``pgleak.install()``."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from pgleak.integrations import ADAPTERS


@pytest.mark.parametrize("name", sorted(ADAPTERS))
def test_library_imported_after_install_is_patched_on_import(name: str) -> None:
    module = ADAPTERS[name][0]
    pytest.importorskip(module)
    code = textwrap.dedent(
        f"""\
        import sys, pgleak
        pgleak.install()
        assert {module!r} not in sys.modules
        print("before", {name!r} in pgleak.installed())
        import {module}
        adapter = pgleak._adapters[{name!r}]
        patched = [owner.__dict__[attr] is not original
                   for owner, attr, original in adapter.originals()]
        print("after", {name!r} in pgleak.installed(), len(patched) > 0 and all(patched))
        print("loader", type({module}.__spec__.loader).__name__)
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "before False" in result.stdout
    assert "after True True" in result.stdout
    # The import hook leaves no trace on the module it watched.
    assert "loader _Loader" not in result.stdout


def test_install_says_what_it_tracks_and_what_waits_for_an_import() -> None:
    code = textwrap.dedent(
        """\
        import logging, sys
        logging.basicConfig(level=logging.INFO, stream=sys.stdout, format="%(message)s")
        import pgleak
        pgleak.install(leak_threshold=5)
        print("pending", pgleak.pending())
        import psycopg_pool
        print("after", pgleak.installed(), pgleak.pending())
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[0].startswith("pgleak ")
    assert (
        "installed: leak_threshold=5s, stack depth 16; tracking nothing yet; waiting for"
        in (lines[0])
    )
    assert "psycopg_pool" in lines[0]
    assert "'psycopg_pool'" in lines[1]
    after = lines[2]
    assert after.startswith("after ['psycopg', 'psycopg_pool'] [")
    assert "'psycopg_pool'" not in after.split("] [", 1)[1]
