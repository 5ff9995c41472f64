"""The ``pgleak`` command: one module per subcommand, listed once in :data:`COMMANDS`.

A subcommand module defines ``NAME``, ``HELP`` (one line for ``pgleak --help``), a module
docstring (its ``--help`` description), ``configure(parser)`` to add its options and
``run(args) -> int`` returning the exit code. Adding a command is a new module plus one line in
:data:`COMMANDS`. Exit code 2 means bad arguments or no connection, for every command.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from types import ModuleType

import pgleak

__all__ = ["COMMANDS", "main"]

#: The subcommand modules, in the order ``pgleak --help`` lists them.
COMMANDS = (
    "pgleak.cli.demo",
    "pgleak.cli.doctor",
    "pgleak.cli.capacity",
    "pgleak.cli.run",
    "pgleak.cli.summary",
)


def _parser() -> tuple[argparse.ArgumentParser, dict[str, ModuleType]]:
    parser = argparse.ArgumentParser(
        prog="pgleak",
        description="Find the code that leaks PostgreSQL connections.",
    )
    parser.add_argument("--version", action="version", version=f"pgleak {pgleak.__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    modules: dict[str, ModuleType] = {}
    for path in COMMANDS:
        module = importlib.import_module(path)
        command = sub.add_parser(
            module.NAME,
            help=module.HELP,
            description=module.__doc__,
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.configure(command)
        modules[module.NAME] = module
    return parser, modules


def main(argv: list[str] | None = None) -> int:
    """Run ``pgleak``; returns the exit code (argparse exits 2 itself on bad arguments)."""
    parser, modules = _parser()
    args = parser.parse_args(argv)
    module = modules.get(args.command) if args.command else None
    if module is None:
        parser.print_help(sys.stderr)
        return 2
    code: int = module.run(args)
    return code


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
