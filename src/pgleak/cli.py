"""The ``pgleak`` command: ``pgleak demo`` today; ``doctor`` is planned."""

from __future__ import annotations

import argparse
import sys

import pgleak

__all__ = ["main"]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="pgleak",
        description="Find the code that leaks PostgreSQL connections.",
    )
    parser.add_argument("--version", action="version", version=f"pgleak {pgleak.__version__}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND")
    commands.add_parser(
        "demo",
        help="start a throwaway PostgreSQL, run a leaky app against it, show the reports",
    )
    args = parser.parse_args(argv)
    if args.command == "demo":
        from pgleak_demo.run import main as demo

        return demo()
    parser.print_help()
    return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
