"""Run a command with pgleak installed in every Python interpreter it starts: no code change.

    pgleak run -- python app.py
    pgleak run -- gunicorn -w 4 shop.wsgi
    PGLEAK_LEAK_THRESHOLD=10 pgleak run -- celery -A shop worker

Like opentelemetry-instrument and ddtrace-run: the command replaces this process (its exit
code, stdin, stdout and signals are its own), and a `sitecustomize` put first on PYTHONPATH
installs pgleak when each interpreter starts, children included, then runs any
`sitecustomize` it hides. Settings come from PGLEAK_* variables; a bad one fails here, before
the command starts. Not reached: interpreters started with -S, -E or -I.
"""

from __future__ import annotations

import argparse
import sys

NAME = "run"
HELP = "run a command with pgleak installed in every Python it starts (no code change)"


def configure(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "argv", nargs=argparse.REMAINDER, metavar="-- COMMAND [ARG ...]", help="what to run"
    )


def run(args: argparse.Namespace) -> int:
    from pgleak._run import exec_command
    from pgleak._settings import ConfigError

    argv = list(args.argv)
    if argv and argv[0] == "--":
        argv = argv[1:]
    if not argv:
        print("pgleak run: no command given (pgleak run -- COMMAND [ARG ...])", file=sys.stderr)
        return 2
    try:
        exec_command(argv)
    except ConfigError as exc:
        print(f"pgleak run: {exc}", file=sys.stderr)
        return 2
    except FileNotFoundError:
        print(f"pgleak run: command not found: {argv[0]}", file=sys.stderr)
        return 127
    except PermissionError:
        print(f"pgleak run: not executable: {argv[0]}", file=sys.stderr)
        return 126
    return 0  # pragma: no cover - exec does not return
