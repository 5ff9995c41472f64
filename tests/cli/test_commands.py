"""The ``pgleak`` command's registry: every subcommand has a description and a ``--help``."""

from __future__ import annotations

import importlib

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
