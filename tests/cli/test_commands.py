"""The ``pgleak`` command's registry: every subcommand has a description and a ``--help``."""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from pgleak.cli import COMMANDS, main
from tests.cli.clients import doctor


@pytest.mark.parametrize("path", COMMANDS)
def test_every_subcommand_describes_itself(path: str, capsys: pytest.CaptureFixture[str]) -> None:
    module = importlib.import_module(path)
    assert module.NAME
    assert module.HELP
    assert module.__doc__
    with pytest.raises(SystemExit) as exited:
        main([module.NAME, "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: pgleak {module.NAME}")
    assert module.__doc__.strip().splitlines()[0] in out


def test_pgleak_alone_lists_the_commands_and_exits_2() -> None:
    result = doctor()
    assert result.code == 2
    listed = " ".join(result.err.split())  # argparse wraps the lines
    for path in COMMANDS:
        assert importlib.import_module(path).HELP in listed


def test_demo_without_its_extra_says_what_to_install(tmp_path: Path) -> None:
    # An interpreter where the demo's libraries cannot be imported: a module named after
    # each, on the path first, that refuses to be found (as if not installed).
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text(
        "import sys\n"
        "class _Gone:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('sqlalchemy', 'psycopg'):\n"
        "            raise ModuleNotFoundError(name)\n"
        "sys.meta_path.insert(0, _Gone())\n"
    )
    done = subprocess.run(
        [sys.executable, "-m", "pgleak", "demo"],
        capture_output=True,
        text=True,
        timeout=60,
        env={**os.environ, "PYTHONPATH": str(tmp_path)},
        check=False,
    )
    assert done.returncode == 2
    assert done.stderr.strip() == (
        "pgleak demo needs sqlalchemy and psycopg, which are not installed: "
        "pip install 'pgleak[demo]'"
    )
